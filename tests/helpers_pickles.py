"""A pickle that runs code when unpickled unsafely: what the loaders must refuse without running it."""


class Evil:
    """Pickles as a call to ``func(*args)``: what torch.load(weights_only=False) would run."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args
