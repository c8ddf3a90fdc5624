"""Context extension with YaRN (DeepSeek-V3 §4.3) on a model that can retrieve a passkey.

`make pretrain`'s CPU-scale model never learns passkey retrieval, so its before/after
heat-maps are 0 everywhere. This benchmark builds a model that *can* retrieve at its
pretraining length L0 and then asks what the library's extension does beyond L0:

1. Corpus (packed shards written with `dsv3.data.shards.write_split`, EOS = 1): documents
   that are passkey prompts built by `dsv3.train.passkey.build_prompt` (the id-based form:
   intro, periodic filler, needle `7 8 <5 key ids> 9` at a uniform random depth, question,
   answer) mixed with "repeat" documents (a random span of k ids, 3 <= k < max(11, n/8),
   repeated to fill the document: a dense induction/copy signal, without which this small
   model learned no retrieval in 1500 steps with sparser copy signals). Each document is exactly as long
   as the slot it fills and the slots tile every training window, so a window never cuts a
   document. Training keys/depths come from `numpy.random.default_rng(--seed + ...)`; the
   passkey probe draws its own (`passkey_grid(seed=0)`, depths on a fixed grid).
2. Pretraining with `dsv3.train.loop.train` at seq_len L0 on L0-long documents (a custom
   small MLA + DeepSeekMoE `ModelConfig`; §4.2 LR schedule scaled to the run).
3. `dsv3.train.extend.extend` with two YaRN stages, each with its own shards (the
   `ExtendStage.shards` field): factor 4 at 4·L0 on documents of L0..4·L0 tokens, then
   factor 8 at 8·L0 on documents of L0..8·L0; constant LR = the final LR of the pretraining
   schedule (§4.3: "the final learning rate of pretraining"), β_fast 32, β_slow 1, mscale 1,
   the stages logged as children of one MLflow `extend` run with the passkey heat-maps.
4. Control: the same two stages (same data, steps, LR, sequence lengths) through
   `loop.train` with `rope_scaling=None` (plain RoPE, positions simply continued), so that
   "YaRN helped" is separated from "training at the long length helped".
5. Each model (base, after stage 1, after stage 2, control after 1 and 2 stages) is
   probed with `passkey_grid` at L0, 2·L0, 4·L0, 8·L0 × needle depths (teacher-forced
   token accuracy of the 5-id answer), and `loop.evaluate` gives its validation loss on
   held-out documents exactly L tokens long for each probe length L.

    .venv/bin/python benchmarks/bench_extend.py   # default: 18 min on 2 cores shared with other jobs
    .venv/bin/python benchmarks/bench_extend.py --mlflow sqlite:///mlruns.db --out runs/bench_extend
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EOS = 1


# ---------------------------------------------------------------- corpus
def repeat_doc(n: int, rng: np.random.Generator, lo: int, vocab: int) -> list[int]:
    """A random span of k ids repeated until the document is full (after a random prefix of
    up to k ids), then EOS: every id after the first period is predictable by copying what
    followed its previous occurrence (the induction mechanism passkey retrieval needs)."""
    k = int(rng.integers(3, max(11, n // 8)))
    span = rng.integers(lo, vocab, size=k).tolist()
    pre = rng.integers(lo, vocab, size=int(rng.integers(0, k + 1))).tolist()
    return (pre + span * (n // k + 1))[:n - 1] + [EOS]


def passkey_doc(n: int, rng: np.random.Generator, vocab: int) -> list[int]:
    from dsv3.train.passkey import build_prompt

    ids, _ = build_prompt(n - 1, float(rng.random()), rng, None, vocab)
    return ids + [EOS]


def tile(window: int, lengths: list[int], rng: np.random.Generator) -> list[int]:
    """Document lengths that fill one window exactly (lengths are multiples of the smallest)."""
    out, left = [], window
    while left:
        fit = [L for L in lengths if L <= left]
        L = int(rng.choice(fit))
        out.append(L)
        left -= L
    return out


def write_corpus(d: Path, window: int, lengths: list[int], n_windows: int, n_val: int, vocab: int,
                 passkey_frac: float, seed: int) -> str:
    from dsv3.data.shards import write_split

    lo = min(100, vocab // 4)
    for split, n, s in (("train", n_windows, seed), ("val", n_val, seed + 1)):
        rng = np.random.default_rng(s)
        docs = []
        for _ in range(n):
            for L in tile(window, lengths, rng):
                docs.append(passkey_doc(L, rng, vocab) if rng.random() < passkey_frac
                            else repeat_doc(L, rng, lo, vocab))
        write_split(d, split, docs, vocab)
    return str(d)


# ---------------------------------------------------------------- probing
def probe(model_dir: str, lengths: list[int], depths: list[float], trials: int, val_dirs: dict[int, str],
          val_batches: int) -> tuple[np.ndarray, dict[int, float]]:
    """Passkey grid (the probe `extend` logs) and validation loss at each length."""
    from dsv3.model.transformer import DeepSeekV3
    from dsv3.train.stream import PackedStream
    from dsv3.train.loop import evaluate
    from dsv3.train.passkey import passkey_grid

    model = DeepSeekV3.from_pretrained(model_dir)
    losses = {L: evaluate(model, PackedStream(val_dirs[L], "val", L, shuffle=False), val_batches, 4, "fp32")[0]
              for L in lengths}
    return passkey_grid(model, lengths, depths, trials, None), losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--L0", type=int, default=32, help="pretraining sequence length")
    ap.add_argument("--pretrain-steps", type=int, default=1000)
    ap.add_argument("--pretrain-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak pretraining LR")
    ap.add_argument("--stage-steps", type=int, nargs=2, default=[100, 60])
    ap.add_argument("--stage-batch", type=int, nargs=2, default=[8, 4])
    ap.add_argument("--factors", type=float, nargs=2, default=[4.0, 8.0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--mtp", type=int, default=0, help="MTP modules (0: off, to save CPU time)")
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--passkey-frac", type=float, default=0.5)
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--val-batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234, help="corpus seed (the probe uses its own)")
    ap.add_argument("--mlflow", default=None, help="tracking URI (default: a temporary SQLite store)")
    ap.add_argument("--out", default=None, help="run folder (default: a temporary directory)")
    ap.add_argument("--no-control", action="store_true")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    work = Path(a.out or tempfile.mkdtemp(prefix="bench_extend_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = a.mlflow or f"sqlite:///{work}/mlruns.db"

    from dsv3.config import RunConfig
    from dsv3.train.extend import extend, stage_config
    from dsv3.train.loop import train

    T0 = time.perf_counter()
    L0 = a.L0
    lengths = [L0, 2 * L0, 4 * L0, 8 * L0]
    S = [int(L0 * f) for f in a.factors]
    print(f"[bench_extend] building shards in {work}", flush=True)
    data = work / "data"
    pre = write_corpus(data / "pretrain", L0, [L0], a.pretrain_steps * a.pretrain_batch, 64, a.vocab,
                       a.passkey_frac, a.seed)
    st_dirs = []
    for i, (Ls, n, b) in enumerate(zip(S, a.stage_steps, a.stage_batch)):
        st_dirs.append(write_corpus(data / f"stage{i + 1}", Ls, [L for L in lengths if L <= Ls], n * b, 8,
                                    a.vocab, a.passkey_frac, a.seed + 100 * (i + 1)))
    val_dirs = {L: write_corpus(data / f"probe_{L}", L, [L], 1, a.val_batches * 4, a.vocab, a.passkey_frac,
                                a.seed + 1000 + L) for L in lengths}
    t_data = time.perf_counter() - T0

    H = a.hidden
    model = dict(vocab_size=a.vocab, hidden_size=H, intermediate_size=2 * H, moe_intermediate_size=H // 2,
                 num_hidden_layers=a.layers, first_k_dense_replace=1, num_attention_heads=4,
                 q_lora_rank=0, kv_lora_rank=H // 2, qk_nope_head_dim=32, qk_rope_head_dim=32,
                 v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
                 topk_group=2, num_nextn_predict_layers=a.mtp, max_position_embeddings=L0,
                 initializer_range=0.02, rope_scaling=None)
    tail_lr = a.lr * 0.033  # TrainConfig.tail_lr_ratio: the last LR of the §4.2 schedule
    cfg = RunConfig.from_dict(dict(
        name="bench-extend", preset="tiny", model=model,
        train=dict(shards=pre, tokenizer=str(work / "no-tokenizer"), seq_len=L0, batch_size=a.pretrain_batch,
                   steps=a.pretrain_steps, lr=a.lr, threads=a.threads, precision="fp32", ema=False,
                   eval_every=a.pretrain_steps, ckpt_every=a.pretrain_steps, eval_batches=4,
                   log_every=100, out_dir=str(work / "pretrain"), log_checkpoints=False, register_model=False,
                   plots=True,
                   extend=dict(stages=[dict(factor=f, seq_len=Ls, steps=n, batch_size=b, shards=d)
                                       for f, Ls, n, b, d in zip(a.factors, S, a.stage_steps, a.stage_batch,
                                                                 st_dirs)],
                               lr=tail_lr, passkey_lengths=lengths, passkey_depths=a.depths,
                               passkey_trials=a.trials))))

    t = time.perf_counter()
    base = train(cfg, stage="pretrain")
    t_pre = time.perf_counter() - t
    t = time.perf_counter()
    ext = extend(cfg, base.checkpoint)
    t_ext = time.perf_counter() - t
    models = {"base": base.model_dir, "yarn stage 1": ext["stages"][0]["model_dir"],
              "yarn stage 2": ext["stages"][1]["model_dir"]}
    t_ctl = 0.0
    if not a.no_control:
        t = time.perf_counter()
        prev = base.model_dir
        for i in range(2):
            c = stage_config(cfg, i, prev, L0)
            c = c.model_copy(update={"model": c.model.replace(rope_scaling=None), "name": f"bench-extend-control{i + 1}",
                                     "train": c.train.model_copy(update={"out_dir": str(work / f"control_{i + 1}")})})
            print(f"[bench_extend] control stage {i + 1}: plain RoPE, seq_len {c.train.seq_len}, "
                  f"{c.train.steps} steps", flush=True)
            r = train(c, parent_run_id=ext["run_id"], stage=f"control_{i + 1}")
            prev = r.model_dir
            models[f"control {i + 1}"] = prev
        t_ctl = time.perf_counter() - t

    t = time.perf_counter()
    res = {}
    for name, d in models.items():
        grid, loss = probe(d, lengths, a.depths, a.trials, val_dirs, a.val_batches)
        res[name] = (grid, loss)
        print(f"[bench_extend] probed {name}: " + " ".join(f"{L}:{grid[k].mean():.2f}"
                                                          for k, L in enumerate(lengths)), flush=True)
    t_probe = time.perf_counter() - t
    # the grids extend() logged to MLflow are the same probe (passkey_grid, seed 0)
    same = (np.allclose(ext["passkey_before"], np.round(res["base"][0], 3))
            and np.allclose(ext["passkey_after"], np.round(res["yarn stage 2"][0], 3)))

    cols = list(models)
    print(f"\npasskey token accuracy (mean over depths {a.depths}, {a.trials} trials each), "
          f"L0 = {L0}; val loss (nats) on held-out L-token documents")
    print("| length | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for k, L in enumerate(lengths):
        print(f"| {L} | " + " | ".join(f"{res[c][0][k].mean():.2f} ({res[c][1][L]:.3f})" for c in cols) + " |")
    print("\nper depth (rows: length; columns: depths)")
    for c in cols:
        print(f"{c}: " + "; ".join(f"{L}: " + " ".join(f"{v:.2f}" for v in res[c][0][k])
                                   for k, L in enumerate(lengths)))
    print(f"\nwall time: data {t_data:.0f}s, pretrain {t_pre:.0f}s ({a.pretrain_steps} steps), extend "
          f"{t_ext:.0f}s (2 stages + 2 probes), control {t_ctl:.0f}s, probes {t_probe:.0f}s, total "
          f"{time.perf_counter() - T0:.0f}s")
    print(f"MLflow: {os.environ['MLFLOW_TRACKING_URI']} extend run {ext['run_id']} "
          f"(heat-maps logged by extend() equal the ones above: {same})")
    (work / "bench_extend.json").write_text(json.dumps(
        {c: {"passkey": np.round(res[c][0], 3).tolist(), "val_loss": res[c][1]} for c in cols}, indent=1))


if __name__ == "__main__":
    main()
