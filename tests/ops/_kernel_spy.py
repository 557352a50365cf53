"""A stand-in for a Triton kernel that records its launches, then launches the real kernel."""


class KernelSpy:
    """``spy[grid](*args, **kwargs)``: appends the kernel's name to ``names`` and, given ``modes``, the launch's
    ``MODE`` to it; then launches ``kernel``."""

    def __init__(self, kernel, names: list, modes: list = None):
        self.kernel, self.names, self.modes = kernel, names, modes

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.names.append(self.kernel.__name__)
            if self.modes is not None:
                self.modes.append(kwargs["MODE"])
            return self.kernel[grid](*args, **kwargs)
        return launch
