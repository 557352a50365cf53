"""One module per fused op: Triton kernels, launchers, ``autograd.Function``s, the CUDA op wrappers and their fake
kernels, the chunked torch backend. Ops import ``ivl_kernels._backends`` (availability, dispatch, the extension
loader); ``_backends`` never imports ``ops``."""
