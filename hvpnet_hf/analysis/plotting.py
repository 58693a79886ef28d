"""matplotlib, imported only when a figure is drawn (it is the optional `analysis` extra)."""

from types import ModuleType


def pyplot() -> ModuleType:
    """`matplotlib.pyplot` on the file-only Agg backend, or a clear error naming the extra to install."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("the plots need matplotlib: pip install 'hvpnet_hf[analysis]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
