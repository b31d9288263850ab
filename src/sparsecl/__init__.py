"""sparsecl: efficient continual learning of sparse neural networks."""

__version__ = "0.1.0"


class SparseCLError(Exception):
    """An error caused by the user's input or data, reported as one clear line (no traceback)."""
