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


def scatter_plot(
    rows: Sequence[dict],
    x: str,
    y: str,
    label: str,
    path: Path | str,
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    refs: Sequence[tuple[str, float, float]] = (),
    series: str | None = None,
) -> Path:
    """One labelled point per row (x, y as fractions shown in %), plus optional reference points.

    Rows sharing a `series` value share a colour and a line (in row order) and a legend entry.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    groups: dict[object, list[dict]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r[series] if series is not None else i, []).append(r)
    for name, points in groups.items():
        xs, ys = [100 * r[x] for r in points], [100 * r[y] for r in points]
        color = ax.plot(
            xs,
            ys,
            "o-" if len(points) > 1 else "o",
            ms=6,
            lw=1,
            label=str(name) if series is not None else None,
        )[0].get_color()
        for r, px, py in zip(points, xs, ys, strict=True):
            ax.annotate(
                str(r[label]),
                (px, py),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
                color=color if series is not None else "black",
            )
    for name, rx, ry in refs:
        ax.scatter(100 * rx, 100 * ry, marker="x", color="grey", s=30)
        ax.annotate(
            name,
            (100 * rx, 100 * ry),
            textcoords="offset points",
            xytext=(5, -10),
            fontsize=7,
            color="grey",
        )
    ax.set_xlabel(xlabel or f"{x} (%)")
    ax.set_ylabel(ylabel or f"{y} (%)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if series is not None:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
