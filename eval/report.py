"""Reports of evaluation results: markdown tables and matplotlib plots (PNG), for any evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

Column = tuple[str, str, Callable[[object], str]]  # (key, header, format)


def pct(v: object) -> str:
    return "" if v is None else f"{100 * float(v):.1f}"


def num(digits: int = 1) -> Callable[[object], str]:
    return lambda v: "" if v is None else f"{float(v):,.{digits}f}"


def text(v: object) -> str:
    return "" if v is None else str(v)


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _, fmt in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body]) + "\n"


def scatter_plot(rows: Sequence[dict], x: str, y: str, label: str, path: Path | str, *,
                 title: str = "", xlabel: str = "", ylabel: str = "",
                 refs: Sequence[tuple[str, float, float]] = ()) -> Path:
    """One labelled point per row (x, y as fractions shown in %), plus optional reference points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for r in rows:
        ax.scatter(100 * r[x], 100 * r[y], s=40)
        ax.annotate(str(r[label]), (100 * r[x], 100 * r[y]), textcoords="offset points", xytext=(5, 4),
                    fontsize=9)
    for name, rx, ry in refs:
        ax.scatter(100 * rx, 100 * ry, marker="x", color="grey", s=30)
        ax.annotate(name, (100 * rx, 100 * ry), textcoords="offset points", xytext=(5, -10), fontsize=7,
                    color="grey")
    ax.set_xlabel(xlabel or f"{x} (%)")
    ax.set_ylabel(ylabel or f"{y} (%)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
