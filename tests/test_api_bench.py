"""`kvrag bench load` plumbing against a stand-in server (the real numbers come from running it)."""

from __future__ import annotations

import argparse
import json

from eval.bench_load import add_bench_load_args, cmd_bench_load, percentile, run_load_bench
from rag.server.app import create_app
from rag.server.run import ThreadServer
from tests.test_api_contract import FakeRAG, _settings


def test_percentile():
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile(list(map(float, range(101))), 95) == 95.0


def test_load_bench_against_a_url(tmp_path, capsys):
    rag = FakeRAG(_settings(tmp_path, keys="k1"), delay_s=0.01)
    with ThreadServer(create_app(rag.settings, rag)) as server:
        result = run_load_bench(server.url, concurrency=2, requests=5, max_tokens=3, api_key="k1")
        assert result["concurrency"] == 2 and result["requests"] == 5
        for mode in ("full", "blend"):
            m = result["modes"][mode]
            assert m["requests"] == 5 and m["errors"] == 0 and m["rps"] > 0
            assert 0 < m["ttft_ms_p50"] <= m["ttft_ms_p95"]
        assert result["ratio"] > 0
        assert result["max_tokens"] == 3 and len(result["runs"]) == 2
        for run in result["runs"]:
            assert run["scheduler"] == "server" and run["concurrency"] == 2
            assert run["failed"] == 0 and run["completion_tok_s"] > 0
            assert 0 < run["itl_ms_p50"] <= run["itl_ms_p95"]
        assert len(rag.calls) == 2 + 10  # one warm-up per mode, then 5 per mode

        out = tmp_path / "bench.json"
        args = add_bench_load_args(argparse.ArgumentParser()).parse_args(
            [
                "--url",
                server.url,
                "--api-key",
                "k1",
                "--concurrency",
                "1,2",
                "--modes",
                "blend",
                "--requests",
                "2",
                "--json",
                str(out),
            ]
        )
        assert cmd_bench_load(args) == 0
        swept = json.loads(out.read_text())
        assert [(r["mode"], r["concurrency"]) for r in swept["runs"]] == [
            ("blend", 1),
            ("blend", 2),
        ]
        assert out.with_suffix(".png").stat().st_size > 0
        args.concurrency = [1]
        assert cmd_bench_load(args) == 0
        assert set(json.loads(out.read_text())) >= {"concurrency", "requests", "modes", "runs"}
        bad = add_bench_load_args(argparse.ArgumentParser()).parse_args(
            ["--url", server.url, "--api-key", "wrong", "--requests", "1", "--no-warmup"]
        )
        assert cmd_bench_load(bad) == 1  # 401s are counted as errors, not crashes
    capsys.readouterr()
