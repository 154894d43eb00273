"""`kvrag eval retrieval-table`: several `kvrag eval retrieval` runs (e.g. two benchmarks) in one
table and one plot.

Reads each run's JSON (one row or a list) and writes OUT.json (all rows), OUT.md (the table,
grouped by chunker so each chunker's rows on every benchmark sit together) and OUT.png (recall
vs IoU, one line per chunker and benchmark through its sizes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from eval.report import markdown_table, scatter_plot
from eval.retrieval import COLUMNS


def _pct2(v: object) -> str:
    return "" if v is None else f"{100 * float(v):.2f}"


# Two decimals for recall and IoU: a QA benchmark's short answers put IoU near 1 %.
TABLE_COLUMNS = [(k, h, _pct2 if k in ("recall", "iou") else f) for k, h, f in COLUMNS]


def load_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        for r in data if isinstance(data, list) else [data]:
            if "chunker" not in r or "recall" not in r:
                raise ValueError(f"{path}: not a `kvrag eval retrieval` result (no chunker/recall)")
            rows.append({"benchmark": Path(path).stem, **r})
    return rows


def write_table(rows: list[dict], out_json: Path) -> None:
    chunkers = list(dict.fromkeys(r["chunker"] for r in rows))
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in rows))
    rows = sorted(
        rows,
        key=lambda r: (
            chunkers.index(r["chunker"]),
            benchmarks.index(r["benchmark"]),
            r["chunk_size"],
        ),
    )
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(rows, indent=2) + "\n")
    out_json.with_suffix(".md").write_text(markdown_table(rows, TABLE_COLUMNS))
    k = rows[0]["k"]
    points = [{**r, "series": f"{r['chunker']}, {r['benchmark']}"} for r in rows]
    scatter_plot(
        points,
        "iou",
        "recall",
        "chunk_size",
        out_json.with_suffix(".png"),
        series="series",
        title=f"Chunkers on {' and '.join(dict.fromkeys(r['benchmark'] for r in rows))}, k={k}",
        xlabel="IoU (%)",
        ylabel=f"recall@{k} (%)",
    )


def add_eval_retrieval_table_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("runs", nargs="+", type=Path, help="JSON files of `kvrag eval retrieval`")
    p.add_argument("--json", dest="out_json", required=True, type=Path, help="combined JSON")
    return p


def cmd_eval_retrieval_table(args: argparse.Namespace, settings=None) -> int:
    try:
        rows = load_rows(args.runs)
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot combine: {e}") from None
    write_table(rows, args.out_json)
    print(args.out_json.with_suffix(".md").read_text())
    return 0
