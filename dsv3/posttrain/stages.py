"""Post-training stages (DeepSeek-V3 §5) as functions of (config, input URI) -> output dir + run id.

`stage_data` -> `stage_sft` -> `stage_reward` -> `stage_grpo` (-> `stage_distill`): each
one reads the previous stage's checkpoint by URI (a path, `runs:/`, `models:/`, resolved
by `dsv3.tracking.resolve_model_uri`), writes an HF-format directory (weights +
tokenizer) and is one MLflow run (stage tag, parent run id, metrics under its namespace).
The CLI (`dsv3 sft|reward|grpo|distill`) and `flows/posttrain.py` are thin callers. Every stage
trains and scores in the run's `train.precision` (dsv3.train.precision: fp32, bf16 or fp8).

The start point (`find_init`) is the registered extended model `<registered_model>-long`
(@champion, else @candidate, or the concrete version a lifecycle passes), or an explicit
`--init`; `fresh_init` (a model of the run's preset with a byte-level BPE tokenizer trained on
the generated data) only when asked for with `--init fresh`. The result is registered as
`<registered_model>-chat` by `register_chat`, its lineage pointing at the start model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dsv3 import tracking
from dsv3.data.chat import build_chat_tokenizer, load_tokenizer
from dsv3.posttrain.sft_data import build_sft_dataset, read_dataset, split, write_dataset


def load_model(uri: str):
    from dsv3 import DeepSeekV3

    from dsv3.data.tokenizer import check_vocab

    d = tracking.resolve_model_uri(uri)
    model, tok = DeepSeekV3.from_pretrained(d), load_tokenizer(d)
    check_vocab(tok, model.config, tokenizer_name=d, model_name=uri)
    return model, tok, d


def _save(model, tok, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(str(out))
    return str(out)


def fresh_init(run_cfg, out_dir: str | Path, seed: int = 0) -> str:
    """A randomly initialised model of `run_cfg.model` + a tokenizer trained on the SFT data."""
    from dsv3 import DeepSeekV3

    pt = run_cfg.posttrain
    recs = build_sft_dataset(pt.data.model_copy(update={"n_arithmetic": min(pt.data.n_arithmetic, 1000)}))
    tok = build_chat_tokenizer([r["prompt"] + "\n" + r["response"] for r in recs], run_cfg.model.vocab_size)
    torch.manual_seed(seed)
    mcfg = run_cfg.model.replace(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return _save(DeepSeekV3(mcfg), tok, Path(out_dir))


FRESH = "fresh"  # `--init fresh`: the only way to post-train a randomly initialised model


def find_init(run_cfg, out: Path, init: str | None = None, prefer: tuple[str, ...] = ("champion", "candidate")) -> str:
    """Where post-training starts: `init` (else `posttrain.init`): `fresh` -> `fresh_init` under
    out/init; a registry URI -> the concrete `models:/NAME/VERSION` it names (what lineage records);
    a path or `runs:/` URI as given. Neither set: `<tracking.registered_model>-long` (the extended
    model) at the first alias of `prefer` that is set, else `tracking.ModelNotFound` saying to run
    `make pretrain` or pass `--init`; never a silent fallback."""
    init = init or run_cfg.posttrain.init
    if init == FRESH:
        return fresh_init(run_cfg, Path(out) / "init", seed=run_cfg.posttrain.sft.seed)
    if init:
        return tracking.concrete_model_uri(init) if str(init).startswith("models:/") else str(init)
    name = tracking.stage_model_name("long", run_cfg.tracking.registered_model)
    return tracking.require_stage_model(name, prefer, hint=(
        f"post-training starts from the extended model: run `make pretrain` (it registers {name}), or pass "
        "`--init PATH|URI` (a checkpoint), or `--init fresh` for a randomly initialised model"))


def register_chat(run_cfg, final: str, start: str, checkpoint_uri: str | None = None) -> str:
    """Register the post-trained model from the active (posttrain) run as a new version of
    `<registered_model>-chat` (alias `candidate`; parent = `start`, the data digest of the SFT data);
    the run's `checkpoint_uri` tag is `checkpoint_uri` (where `publish` put it), else `final`."""
    from dsv3.data.version import data_digest

    data = Path(run_cfg.posttrain.data.out_dir)
    sm = tracking.register_stage_model(final, tracking.stage_model_name("chat", run_cfg.tracking.registered_model),
                                       parent_model=start, config=run_cfg.section("posttrain"),
                                       data_digest=data_digest(data) if data.is_dir() else None)
    tracking.set_tags({"registered_model": sm.uri, "checkpoint_uri": checkpoint_uri or final})
    return sm.uri


def storage_base(run_cfg) -> str | None:
    """The storage URI in force (`train.storage_uri` / $DSV3_CHECKPOINT_URI; dsv3.train.storage), or None.
    With one, post-training works in a temporary scratch directory and `publish`es each stage's output:
    no shared filesystem, so nothing is left in the driver's working directory (infra/ray.md)."""
    from dsv3.train import storage

    return storage.base_uri(run_cfg)


def publish(run_cfg, local: str | Path) -> str:
    """A stage's output directory uploaded to `<storage>/<posttrain.out_dir>/<its name>` (verified on
    download, storage.push_dir), returning that URI; without a storage URI, the local path as it is."""
    from dsv3.train import storage

    base = storage_base(run_cfg)
    if base is None:
        return str(local)
    return storage.push_dir(local, f"{base}/{storage.run_key(run_cfg.posttrain.out_dir)}/{Path(local).name}")


def generate_sft_data(run_cfg, out_dir: str | Path | None = None, teacher_uri: str | None = None) -> dict:
    """Generate the SFT data (optionally rejection-sampled from a teacher) as JSONL + provenance.

    No MLflow: `dsv3 sft-data` (the DVC stage `sft_data`) and `stage_data` call it. Writes
    `sft_train`/`sft_val` (.jsonl + .meta.json) under `out_dir` (default
    `posttrain.data.out_dir`); returns paths, digest and deterministic counts.
    """
    d = run_cfg.posttrain.data
    out = Path(out_dir if out_dir is not None else d.out_dir)
    recs = build_sft_dataset(d)
    prov = {"generator": "dsv3.posttrain.sft_data", "seed": d.seed, "config": d.model_dump()}
    teacher = teacher_uri or d.teacher
    res: dict = {}
    if teacher:
        from dsv3.posttrain.rewards import build_reward
        from dsv3.posttrain.sft_data import rejection_sample

        model, tok, _ = load_model(teacher)
        verifiable = [r for r in recs if r["kind"] != "instruction"]
        kept, st = rejection_sample(model, tok, verifiable, build_reward(run_cfg.posttrain.reward, precision=run_cfg.train.precision),
                                    d.samples_per_prompt, d.max_new_tokens, d.temperature,
                                    teacher_uri=str(teacher))
        recs = kept + [r for r in recs if r["kind"] == "instruction"]
        prov.update(teacher=str(teacher), rejection=st)
        res["rejection"] = st
    tr, va = split(recs, d.val_fraction, d.seed)
    mt = write_dataset(tr, out, "sft_train", prov)
    mv = write_dataset(va, out, "sft_val", prov)
    return {**res, "train": mt["path"], "val": mv["path"], "sha256": mt["sha256"], "n_train": mt["n"],
            "n_val": mv["n"], "kinds_train": mt["kinds"], "kinds_val": mv["kinds"]}


def sft_data_in_dvc(run_cfg, repo: str | Path = ".") -> bool:
    """Whether the SFT data of `run_cfg` is the DVC stage `sft_data` of `repo` (dvc.yaml): programmatic
    data (no teacher: rejection sampling depends on a model DVC does not version) written where that
    stage writes (`posttrain.data.out_dir` = <repo>/data/posttrain). Then `sft_data.repro_sft_data`
    makes it and dvc.lock stays fresh; otherwise `stage_data` does, outside DVC."""
    import yaml

    repo = Path(repo)
    spec = repo / "dvc.yaml"
    if run_cfg.posttrain.data.teacher or not spec.is_file():
        return False
    out = Path(run_cfg.posttrain.data.out_dir)
    out = out if out.is_absolute() else repo / out
    stages = (yaml.safe_load(spec.read_text()) or {}).get("stages", {})
    return "sft_data" in stages and out.resolve() == (repo / "data" / "posttrain").resolve()


def stage_data(run_cfg, parent_run_id: str | None = None, teacher_uri: str | None = None) -> dict:
    """`generate_sft_data` as an MLflow run (counts, accept rate, dataset input with its digest)."""
    with tracking.start_run(run_cfg, stage="sft_data",
                            parent_run_id=parent_run_id) as run:
        res = generate_sft_data(run_cfg, teacher_uri=teacher_uri)
        if "rejection" in res:
            tracking.log_metrics({"data/accept_rate": res["rejection"]["accept_rate"]}, 0)
        tracking.log_metrics({"data/n_train": res["n_train"], "data/n_val": res["n_val"]}, 0)
        tracking.log_dataset_input(res["sha256"], "sft_train", res["train"])
        return {"train": res["train"], "val": res["val"], "sha256": res["sha256"], "run_id": run.info.run_id}


def stage_sft(run_cfg, init_uri: str, data: dict, out_dir: str | Path, parent_run_id: str | None = None) -> dict:
    from dsv3.posttrain.sft import train_sft

    c = run_cfg.posttrain.sft
    with tracking.start_run(run_cfg, stage="sft",
                            parent_run_id=parent_run_id, tags={"parent_checkpoint": init_uri}) as run:
        model, tok, _ = load_model(init_uri)
        if data.get("sha256"):
            tracking.log_dataset_input(data["sha256"], "sft_train", data["train"])
        res = train_sft(model, tok, read_dataset(data["train"]), read_dataset(data["val"]), c, out_dir, precision=run_cfg.train.precision)
        tracking.log_metrics({"sft/final_val_loss": res["val/loss"]}, res["steps"])
        return {**res, "ckpt": str(out_dir), "run_id": run.info.run_id}


def stage_reward(run_cfg, init_uri: str, data: dict, out_dir: str | Path, parent_run_id: str | None = None) -> dict:
    from dsv3.posttrain.rewards import RewardModel, preference_pairs, train_reward_model

    c = run_cfg.posttrain.reward
    with tracking.start_run(run_cfg, stage="reward",
                            parent_run_id=parent_run_id, tags={"parent_checkpoint": init_uri}) as run:
        model, tok, _ = load_model(init_uri)
        recs = [r for r in read_dataset(data["train"]) if r["kind"] != "code"][: c.rm_pairs]
        rm = RewardModel(model)
        res = train_reward_model(rm, tok, preference_pairs(recs, c.seed), c, log=tracking.log_metrics,
                                 precision=run_cfg.train.precision)
        tracking.log_metrics({"val/pair_acc": res["val/pair_acc"]}, res["steps"])
        rm.save(out_dir)
        tok.save_pretrained(str(out_dir))
        return {**res, "ckpt": str(out_dir), "run_id": run.info.run_id}


def _reward_fn(run_cfg, rm_uri: str | None, tok):
    from dsv3.posttrain.rewards import RewardModel, build_reward

    c = run_cfg.posttrain.reward
    rm = RewardModel.load(tracking.resolve_model_uri(rm_uri)) if (rm_uri and c.model_weight) else None
    return build_reward(c, rm, tok, precision=run_cfg.train.precision)


def stage_grpo(run_cfg, init_uri: str, out_dir: str | Path, rm_uri: str | None = None,
               parent_run_id: str | None = None, progress=None) -> dict:
    """GRPO from `init_uri`; `progress(step, steps)` (optional) is called after every step."""
    from dsv3.posttrain.grpo import arithmetic_task, train_grpo

    c = run_cfg.posttrain.grpo
    with tracking.start_run(run_cfg, stage="grpo",
                            parent_run_id=parent_run_id, tags={"parent_checkpoint": init_uri,
                                                               "reward_model": rm_uri}) as run:
        model, tok, d = load_model(init_uri)
        problems = arithmetic_task(500, c.seed, c.max_operand)

        def log(metrics, step):
            tracking.log_metrics(metrics, step)
            if progress is not None:
                progress(step, c.steps)

        hist = train_grpo(model, tok, problems, _reward_fn(run_cfg, rm_uri, tok), c,
                          log=log, tok_dir=d, precision=run_cfg.train.precision)
        _save(model, tok, Path(out_dir))
        _plot(hist, "grpo/reward_mean", Path(out_dir) / "reward_curve.png")
        k = max(1, len(hist) // 4)
        first = sum(h["grpo/reward_mean"] for h in hist[:k]) / k
        last = sum(h["grpo/reward_mean"] for h in hist[-k:]) / k
        tracking.log_metrics({"grpo/reward_first_quarter": first, "grpo/reward_last_quarter": last}, len(hist))
        return {"history": hist, "reward_first": first, "reward_last": last, "ckpt": str(out_dir),
                "run_id": run.info.run_id}


def stage_distill(run_cfg, student_uri: str, teacher_uri: str, data: dict, out_dir: str | Path,
                  parent_run_id: str | None = None) -> dict:
    from dsv3.posttrain.distill import distill_sequence, distill_token, load_teacher
    from dsv3.posttrain.rewards import build_reward

    c = run_cfg.posttrain.distill
    with tracking.start_run(run_cfg, stage="distill",
                            parent_run_id=parent_run_id,
                            tags={"parent_checkpoint": student_uri, "teacher": teacher_uri}) as run:
        student, tok, _ = load_model(student_uri)
        teacher = load_teacher(tracking.resolve_model_uri(teacher_uri))
        train, val = read_dataset(data["train"]), read_dataset(data["val"])
        res: dict = {}
        if c.mode in ("sequence", "both"):
            sft_cfg = run_cfg.posttrain.sft.model_copy(update={"max_steps": c.steps, "lr": c.lr})
            probs = [r for r in train if r["kind"] in ("arithmetic", "algebra")][: c.steps * c.batch_size]
            reward = build_reward(run_cfg.posttrain.reward, precision=run_cfg.train.precision)
            seq = distill_sequence(student, teacher, tok, probs, val, reward, c, sft_cfg, run_cfg.posttrain.data,
                                   log=tracking.log_metrics, teacher_uri=teacher_uri,
                                   precision=run_cfg.train.precision)
            res.update({k: v for k, v in seq.items() if k != "records"})
        if c.mode in ("token", "both"):
            res.update(distill_token(student, teacher, tok, train, val, c, log=tracking.log_metrics,
                                     seq_len=run_cfg.posttrain.sft.seq_len, precision=run_cfg.train.precision))
        _save(student, tok, Path(out_dir))
        return {**res, "ckpt": str(out_dir), "run_id": run.info.run_id}


def _plot(hist: list[dict], key: str, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([h[key] for h in hist])
    ax.set_xlabel("GRPO step")
    ax.set_ylabel(key)
    fig.tight_layout()
    fig.savefig(path)
    tracking.log_figure(fig, f"plots/{path.name}")
    plt.close(fig)
