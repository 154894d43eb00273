"""Several retrieval runs in one table and plot; a file that is not a run is refused clearly."""

from __future__ import annotations

import argparse
import json

import pytest

from eval.retrieval import load_corpora
from eval.retrieval_table import add_eval_retrieval_table_args, cmd_eval_retrieval_table


def row(chunker: str, size: int, recall: float, **extra) -> dict:
    return {"chunker": chunker, "chunk_size": size, "k": 5, "recall": recall, "iou": 0.05, **extra}


def test_two_benchmarks_in_one_table_grouped_by_chunker(tmp_path, capsys):
    a, b = tmp_path / "chroma.json", tmp_path / "covidqa.json"
    a.write_text(json.dumps([row("semantic", 150, 0.8), row("meta-ppl", 150, 0.7)]))
    b.write_text(json.dumps(row("semantic", 150, 0.9, benchmark="covidqa (6 corpora)")))
    out = tmp_path / "both" / "t.json"
    args = add_eval_retrieval_table_args(argparse.ArgumentParser()).parse_args(
        [str(a), str(b), "--json", str(out)]
    )
    assert cmd_eval_retrieval_table(args) == 0
    rows = json.loads(out.read_text())
    assert [(r["chunker"], r["benchmark"]) for r in rows] == [
        ("semantic", "chroma"),
        ("semantic", "covidqa (6 corpora)"),
        ("meta-ppl", "chroma"),
    ]
    table = out.with_suffix(".md").read_text()
    assert (
        "| covidqa (6 corpora) | semantic | 150 |" in table
        and "| 90.00 |" in table
        and table == capsys.readouterr().out[:-1]
    )
    assert out.with_suffix(".png").stat().st_size > 1000


def test_a_file_that_is_not_a_run_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"answer": 1}))
    args = add_eval_retrieval_table_args(argparse.ArgumentParser()).parse_args(
        [str(bad), "--json", str(tmp_path / "t.json")]
    )
    with pytest.raises(SystemExit, match="not a `kvrag eval retrieval` result"):
        cmd_eval_retrieval_table(args)
    assert not (tmp_path / "t.json").exists()


def test_only_some_corpora(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.txt").write_text(name * 3)
    assert load_corpora(tmp_path, ["c", "a"]) == {"a": "aaa", "c": "ccc"}
    with pytest.raises(FileNotFoundError, match="no corpus d"):
        load_corpora(tmp_path, ["a", "d"])
