"""`fastpo bench` reports median and p90 over at least 10 runs (issue 8, defect 12)."""
from __future__ import annotations

import json

import pytest

from fastpo.cli import main


def test_bench_reports_median_and_p90_over_ten_runs(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--device", "cpu", "--ops", "token_logprobs", "--shapes", "64x257xfloat32",
                 "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    speed = [r for r in results if "interpreter" not in r["note"]]
    assert speed and len(speed) < len(results)  # the interpreter row is there, but is not a speed result
    for r in speed:
        assert r["extra"]["runs"] >= 10
        assert r["extra"]["min_ms"] <= r["median_ms"] <= r["p90_ms"]
    assert "p90 ms" in capsys.readouterr().out


def test_plot_groups_cases_and_labels_bars(tmp_path):
    pytest.importorskip("matplotlib")
    from fastpo.benchmarks import Result
    from fastpo.benchmarks.plot import _groups, plot_results

    rows = [Result("token_logprobs", impl, "float32", "64x257", ms, ms, 1.0, None, None)
            for impl, ms in (("torch-naive", 10.0), ("trl-selective_log_softmax", 8.0), ("fastpo[cpu]", 2.0))]
    rows.append(Result("token_logprobs", "fastpo[triton]", "float32", "8x257", 900.0, 900.0, 0.0, None, None,
                       note="Triton interpreter (CPU): correctness path, not a speed result"))
    groups = _groups(rows)
    assert [len(g) for g in groups.values()] == [3]  # one case; the interpreter row is not a speed result
    out = tmp_path / "b.png"
    assert plot_results(rows, str(out)) and out.stat().st_size > 0
