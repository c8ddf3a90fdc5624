"""Smoke test: benchmarks/bench_fp8.py runs end to end (tiny preset, a few steps)."""

import importlib.util
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_fp8.py"


def test_bench_fp8_runs_tiny(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_fp8", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    res = mod.main(["--preset", "tiny", "--steps", "3", "--batch", "2", "--seq", "32", "--gemm-reps", "1",
                    "--markov-vocab", "64", "--print-every", "100", "--json", str(out)])
    assert out.is_file()
    tr = res["train"]
    assert len(tr["bf16_losses"]) == 3 and len(tr["fp8_losses"]) == 3
    assert tr["bf16_losses"] != tr["fp8_losses"]  # the FP8 run really ran in FP8
    assert math.isfinite(tr["rel_gap"]) and abs(tr["rel_gap"]) < 0.05
    assert tr["n_fp8_linears"] > 0
    assert all(r["fp8_gemm_gflops"] > 0 and r["bf16_gflops"] > 0 for r in res["gemm"])
    assert "relative gap" in capsys.readouterr().out
