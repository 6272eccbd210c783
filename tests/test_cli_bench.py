"""`fastpo bench` reports median and p90 over at least 10 runs (issue 8, defect 12)."""
from __future__ import annotations

import json

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
