"""`kvrag eval qa`: its metrics against hand-computed cases, a broken dataset record, and a tiny
end-to-end run on a slice of the real COVID-QA file (token chunker, 3 questions)."""

from __future__ import annotations

import json

import pytest
import torch

from eval.qa_dataset import DatasetError, load_squad
from eval.qa_metrics import (
    best_em,
    best_f1,
    exact_match,
    first_difference,
    hit_at_k,
    hit_rank,
    identical,
    kl_top1,
    mrr,
    normalize_answer,
    token_f1,
)


def test_normalization_drops_case_punctuation_articles_and_spacing():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple; a (pear)") == "apple pear"
    assert normalize_answer("theory") == "theory"  # "the" only as a word


def test_token_f1_and_exact_match():
    # pred [cat sat on mat], ref [cat on mat]: 3 common, P 3/4, R 1, F1 6/7
    assert token_f1("the cat sat on the mat", "cat on the mat") == pytest.approx(6 / 7)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "cat") == 0.0
    # repeated tokens count once per occurrence: [a1 a1 b], [a1 b b] share a1, b -> P=R=2/3
    assert token_f1("a1 a1 b", "a1 b b") == pytest.approx(2 / 3)
    assert exact_match("The Mother-to-child.", "mothertochild") == 1.0
    assert best_em("HIV", ["virus", "hiv"]) == 1.0
    assert best_f1("the big dog", ["cat", "big dog barks"]) == pytest.approx(0.8)


def test_hit_rank_mrr_and_hit_at_k():
    spans = [("d1", 0, 100), ("d0", 0, 50), ("d0", 50, 120)]
    assert hit_rank(spans, "d0", [60]) == 3  # the chunk covering the start, of the right doc
    assert hit_rank(spans, "d0", [10, 60]) == 2  # best over gold answers
    assert hit_rank(spans, "d0", [120]) is None  # end is exclusive
    assert hit_rank(spans, "d2", [10]) is None  # a chunk of another document never counts
    assert mrr([1, None, 2]) == pytest.approx(0.5)
    assert hit_at_k([1, None, 2]) == pytest.approx(2 / 3)


def test_identical_first_difference_and_kl():
    assert identical(" a b ", "a b") and not identical("a b", "a c")
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 5, 3], [1, 2, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2
    ref = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    kl, top1 = kl_top1(ref, ref)
    assert kl == 0.0 and top1 == 1.0
    kl, top1 = kl_top1(ref, torch.tensor([[0.0, 2.0], [0.0, 1.0]]))
    p = torch.tensor([2.0, 0.0]).softmax(0)
    expected = float((p * (p.log() - p.flip(0).log())).sum()) / 2
    assert kl == pytest.approx(expected, rel=1e-5) and top1 == 0.5


def _slice(covid_path, n_docs: int = 2, chars: int = 2500) -> dict:
    """The first n_docs articles cut to `chars` characters, with the questions answered inside."""
    raw = json.loads(covid_path.read_text(encoding="utf-8"))
    data = []
    for article in raw["data"][:n_docs]:
        para = article["paragraphs"][0]
        context = para["context"][:chars]
        qas = [
            q
            for q in para["qas"]
            if all(a["answer_start"] + len(a["text"]) <= chars for a in q["answers"])
        ]
        data.append({"paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "slice", "data": data}


@pytest.fixture
def covid_path(shared_data):
    return shared_data / "covidqa_dev" / "covidqa_dev.json"


def test_broken_record_is_named(tmp_path, covid_path):
    d = _slice(covid_path)
    qa = d["data"][1]["paragraphs"][0]["qas"][0]
    qa["answers"][0]["answer_start"] += 3
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(d))
    with pytest.raises(
        DatasetError, match=rf"data\[1\]\.paragraphs\[0\]\.qas\[0\] \(id {qa['id']}\)"
    ):
        load_squad(path)
    del qa["question"]
    path.write_text(json.dumps(d))
    with pytest.raises(DatasetError, match="empty 'question'"):
        load_squad(path)


def test_cli_reports_a_broken_record(tmp_path, covid_path, capsys):
    from rag.cli import main

    d = _slice(covid_path)
    d["data"][0]["paragraphs"][0]["qas"][1]["answers"] = []
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(d))
    rc = main(["eval", "qa", "--dataset", str(path), "--json", str(tmp_path / "out.json")])
    assert rc == 2
    assert "data[0].paragraphs[0].qas[1]" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_tiny_end_to_end_run_writes_every_field_and_the_plots(
    tmp_path, covid_path, models_dir, monkeypatch
):
    from rag.cli import main

    monkeypatch.setenv("KVRAG_MODEL_CACHE_DIR", str(models_dir))
    monkeypatch.setenv("KVRAG_DATA_DIR", str(tmp_path / "users_data"))
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(_slice(covid_path)))
    out, report = tmp_path / "qa.json", tmp_path / "report"
    args = ["eval", "qa", "--dataset", str(path), "--chunker", "token", "--chunk-size", "120"]
    args += ["--ratios", "0,0.15", "--limit", "3", "--max-tokens", "6", "--json", str(out)]
    assert main([*args, "--report", str(report), "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert r["n"] == 3 and r["k"] == 4 and r["chunker"].startswith("token")
    assert set(r["retrieval"]) == {"hit_at_k", "mrr"}
    assert 0 <= r["retrieval"]["mrr"] <= r["retrieval"]["hit_at_k"] <= 1
    assert set(r["modes"]) == {"full", "blend", "reuse"}
    assert {"em", "f1", "ttft_ms_p50", "ttft_ms_p95"} <= set(r["modes"]["full"])
    fidelity = {"ratio", "em", "f1", "ttft_ms_p50", "ttft_ms_p95", "fidelity_f1", "identical"}
    fidelity |= {"kl_mean", "top1"}
    assert [b["ratio"] for b in r["modes"]["blend"]] == [0.0, 0.15]
    assert [b["repair"] for b in r["modes"]["blend"]] == [r["config"]["repair"]] * 2 == [8192] * 2
    for entry in [*r["modes"]["blend"], r["modes"]["reuse"]]:
        assert fidelity <= set(entry)
        assert all(entry[key] is not None for key in fidelity)
    assert len(r["rows"]) == 3
    for row in r["rows"]:
        assert set(row["answers"]) == {"full", "blend@0", "blend@0.15", "reuse"}
        assert all(a["same_chunks"] for a in row["answers"].values())
        # blend at ratio 0 recomputes nothing in the prefill: its first token is reuse's; then
        # it repairs while decoding (reuse does not)
        b0, reuse = row["answers"]["blend@0"], row["answers"]["reuse"]
        assert (b0["first_diff"] == 0) == (reuse["first_diff"] == 0)
        assert b0["repaired_tokens"] > 0 and reuse["repaired_tokens"] == 0
    for name in ("report.md", "ttft.png", "fidelity.png", "quality.png"):
        assert (report / name).stat().st_size > 1000
    assert "fidelity F1" in (report / "report.md").read_text()
    assert not (tmp_path / "users_data").exists()  # its own data dir, never the user's
