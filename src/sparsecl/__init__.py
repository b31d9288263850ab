"""sparsecl: efficient continual learning of sparse neural networks."""

__version__ = "0.1.0"


class SparseCLError(Exception):
    """An error caused by the user's input or data, reported as one clear line (no traceback)."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type where it has none), to quote it in one
    error line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def import_extra(module: str, extra: str, feature: str):
    """Import ``module`` from the optional extra ``extra`` (``pip install 'sparsecl[extra]'``).
    Where it is missing: a :class:`SparseCLError` naming that pip command, so that the user sees one
    line before anything runs. ``feature`` names what needs it, e.g. ``--wandb``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise SparseCLError(f"{feature} needs the optional '{extra}' extra: pip install 'sparsecl[{extra}]'") from None
