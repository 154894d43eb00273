"""`kvrag eval qa --report DIR`: report.md and three PNG plots from the evaluation's result.

ttft.png: TTFT (p50, with p95 whiskers) against the recompute ratio, full and reuse as
references; fidelity.png: fidelity F1 and identical share against the ratio; quality.png:
EM and F1 against the gold answers per mode.
"""

from __future__ import annotations

from pathlib import Path

from eval.report import markdown_table, num, pct, text


def mode_rows(result: dict) -> list[dict]:
    """One row per mode entry (full, each blend ratio, reuse), with its label and TTFT speedup."""
    modes = result["modes"]
    blends = modes.get("blend", [])
    entries = [("full", modes["full"])]
    entries += [
        (f"blend {b['ratio']:g}" + (f" + repair {b['repair']}" if b.get("repair") else ""), b)
        for b in (blends if isinstance(blends, list) else [blends])
    ]
    if "reuse" in modes:
        entries.append(("reuse", modes["reuse"]))
    full_ttft = modes["full"]["ttft_ms_p50"]
    rows = []
    for label, e in entries:
        speedup = full_ttft / e["ttft_ms_p50"] if e.get("ttft_ms_p50") else None
        rows.append({"label": label, **e, "speedup": speedup})
    return rows


COLUMNS = (
    ("label", "mode", text),
    ("em", "EM %", pct),
    ("f1", "F1 %", pct),
    ("fidelity_f1", "fidelity F1 %", pct),
    ("identical", "identical %", pct),
    ("top1", "top-1 %", pct),
    ("kl_mean", "KL", num(4)),
    ("ttft_ms_p50", "TTFT p50 ms", num(0)),
    ("ttft_ms_p95", "TTFT p95 ms", num(0)),
    ("speedup", "full / mode TTFT", num(2)),
)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _blend_rows(rows: list[dict]) -> list[dict]:
    return sorted((r for r in rows if r["label"].startswith("blend")), key=lambda r: r["ratio"])


def plot_ttft(rows: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    blends = _blend_rows(rows)
    if blends:
        xs = [100 * r["ratio"] for r in blends]
        p50 = [r["ttft_ms_p50"] for r in blends]
        p95 = [r["ttft_ms_p95"] for r in blends]
        ax.errorbar(
            xs,
            p50,
            yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p95, strict=True)]],
            fmt="o-",
            capsize=3,
            label="blend (p50, whisker to p95)",
        )
        for x, y, r in zip(xs, p50, blends, strict=True):
            if r["speedup"]:
                ax.annotate(
                    f"{r['speedup']:.1f}x",
                    (x, y),
                    textcoords="offset points",
                    xytext=(5, 5),
                    fontsize=8,
                )
    full = next(r for r in rows if r["label"] == "full")
    ax.axhline(full["ttft_ms_p50"], color="black", ls="--", lw=1, label="full prefill (p50)")
    reuse = next((r for r in rows if r["label"] == "reuse"), None)
    if reuse:
        ax.scatter(
            [0], [reuse["ttft_ms_p50"]], marker="x", color="red", zorder=3, label="reuse (p50)"
        )
    ax.set_xlabel("recompute ratio (% of reused tokens)")
    ax.set_ylabel("time to first token (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title("TTFT against recompute ratio (chunk K/V already stored)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_fidelity(rows: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 5.0), dpi=120)
    blends = _blend_rows(rows)
    xs = [100 * r["ratio"] for r in blends]
    for key, name, style in (
        ("fidelity_f1", "fidelity F1 (token F1 vs full's answer)", "o-"),
        ("identical", "identical answers (share)", "s-"),
        ("top1", "top-1 agreement (question + first answer tokens)", "^--"),
    ):
        ax.plot(xs, [100 * r[key] for r in blends], style, label=name)
    reuse = next((r for r in rows if r["label"] == "reuse"), None)
    if reuse:
        ax.scatter(
            [0, 0],
            [100 * reuse["fidelity_f1"], 100 * reuse["identical"]],
            marker="x",
            color="red",
            zorder=3,
            label="reuse",
        )
    ax.set_xlabel("recompute ratio (% of reused tokens)")
    ax.set_ylabel("agreement with full prefill (%)")
    ax.set_ylim(0, 102)
    ax.set_title("Fidelity to full prefill against recompute ratio")
    ax.grid(alpha=0.3)
    # Below the axes: the lines span the whole height.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_quality(rows: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    width = 0.38
    xs = range(len(rows))
    for j, (key, name) in enumerate((("em", "exact match"), ("f1", "token F1"))):
        vals = [100 * (r[key] or 0) for r in rows]
        bars = ax.bar([x + (j - 0.5) * width for x in xs], vals, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(list(xs), [r["label"] for r in rows], rotation=20)
    ax.set_ylabel("score against the gold answers (%)")
    ax.set_title("Answer quality per mode (SQuAD EM / F1)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def render_markdown(result: dict, rows: list[dict]) -> str:
    c, ret = result.get("config", {}), result["retrieval"]
    lines = [
        "# kvrag eval qa",
        "",
        f"`{c.get('command', 'kvrag eval qa')}`",
        "",
        f"{result['n']} questions of {c.get('dataset', '?')}; chunker {result['chunker']}, "
        f"k = {result['k']}, {c.get('chunks', '?')} chunks; greedy answers of up to "
        f"{c.get('max_tokens', '?')} tokens; dtype {c.get('dtype', '?')}, "
        f"{c.get('threads', '?')} threads, {c.get('date', '')}; {c.get('seconds', '?')} s.",
        "",
        f"Retrieval: hit@{result['k']} {100 * ret['hit_at_k']:.1f}%, MRR {ret['mrr']:.3f}.",
        "",
        markdown_table(rows, COLUMNS),
        "TTFT: the service's, request start (retrieval included) to the first token, with the "
        "question's chunk K/V already in the store's memory tier. Fidelity: the mode's greedy "
        f"answer against full prefill's; KL and top-1 over the question positions and the first "
        f"{c.get('kl_answer_tokens', '?')} answer tokens.",
        "",
        "![TTFT](ttft.png) ![fidelity](fidelity.png) ![quality](quality.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(result: dict, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = mode_rows(result)
    paths = [
        plot_ttft(rows, folder / "ttft.png"),
        plot_fidelity(rows, folder / "fidelity.png"),
        plot_quality(rows, folder / "quality.png"),
    ]
    md = folder / "report.md"
    md.write_text(render_markdown(result, rows))
    return [md, *paths]
