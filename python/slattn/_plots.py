"""matplotlib as an optional dependency: the headless pyplot module, or None
when matplotlib is missing, and saving a figure the way every slattn plot is saved."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), or None if matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(plt, fig, path: str, dpi: int) -> None:
    """Lays the figure out, writes it to `path` and releases it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
