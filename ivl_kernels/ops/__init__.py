"""One module per fused op: Triton kernels, launchers, ``autograd.Function``s and the CUDA op wrappers."""
