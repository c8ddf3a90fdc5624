"""The FP8 acceptance (§3.3: FP8 training loss within 0.25% relative of BF16), in short: the real
benchmarks/bench_fp8.py on the tiny preset, 60 steps from the same initialisation on the same
Markov stream, compared on the final training loss and on held-out batches. The benchmark runs the
`small` preset for 200 steps (README)."""

import importlib.util
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_fp8.py"


def test_fp8_training_loss_within_quarter_percent_of_bf16(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_fp8", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    res = mod.main(["--preset", "tiny", "--steps", "60", "--batch", "4", "--seq", "64", "--gemm-reps", "1",
                    "--markov-vocab", "256", "--val-batches", "4", "--print-every", "100", "--json", str(out)])
    assert out.is_file()
    tr = res["train"]
    b, f = tr["bf16_losses"], tr["fp8_losses"]
    assert len(b) == len(f) == 60
    assert b != f and tr["n_fp8_linears"] > 0  # the FP8 run really ran its Linear layers in FP8
    assert b[-1] < b[0] - 0.5 and f[-1] < f[0] - 0.5  # both learn
    assert math.isfinite(tr["rel_gap"]) and abs(tr["rel_gap"]) < 0.0025, tr["rel_gap"]
    assert abs(tr["val_rel_gap"]) < 0.0025, tr["val_rel_gap"]
    assert all(r["fp8_gemm_gflops"] > 0 and r["bf16_gflops"] > 0 for r in res["gemm"])
    assert "relative gap" in capsys.readouterr().out
