"""SFT data: verifiable reasoning problems and non-reasoning instruction pairs (DeepSeek-V3 §5.1).

The paper builds reasoning data from verifiable problems (math, code) and keeps only
responses a verifier accepts (rejection sampling from expert models); non-reasoning
data are instruction/response pairs. Scaled down here:

- `arithmetic_problems` (bare and word problems), `algebra_problems` (a*x + b = c, exact
  fractions) and `code_tasks` (small functions with `assert` unit tests) are generated
  from a seed with exact answers; each carries a programmatic reference response, so
  SFT needs no teacher.
- `instruction_pairs`: built-in local instruction/response pairs (deterministic text
  transformations and a few fixed facts) plus an optional user JSONL file.
- `rejection_sample`: samples k responses per problem from a teacher checkpoint and
  keeps only those the rule-based reward verifies (answer, unit tests).
- `write_dataset`: JSONL plus a `.meta.json` sidecar with provenance (generator, seed,
  teacher URI, counts, sha256). The folder (`data/posttrain` by default) is a DVC out.

Record schema: {id, kind, prompt, answer | null, tests | null, response, source}.

`repro_sft_data` produces the programmatic data through DVC (`dvc repro sft_data`, the stage in
dvc.yaml reading `posttrain.data.*` from params.yaml), so `dvc.lock` records what post-training
read; it returns what `stages.stage_data` returns (paths, sha256, MLflow run id) plus DVC's md5.
"""

from __future__ import annotations

import hashlib
import json
import random
from fractions import Fraction
from pathlib import Path

_NAMES = ["Ann", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Ida"]
_ITEMS = ["apples", "books", "coins", "pens", "cards", "shells"]


def _rec(kind: str, i: int, prompt: str, response: str, source: str, answer=None, tests=None) -> dict:
    return {"id": f"{kind}-{i}", "kind": kind, "prompt": prompt, "answer": answer, "tests": tests,
            "response": response, "source": source}


def arithmetic_problems(n: int, seed: int = 0, max_operand: int = 20, ops: str = "+-*",
                        word_fraction: float = 0.3) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(ops)
        c = {"+": a + b, "-": a - b, "*": a * b}[op]
        if rng.random() < word_fraction and op != "*":
            who, what = rng.choice(_NAMES), rng.choice(_ITEMS)
            verb = "gets" if op == "+" else "gives away"
            prompt = f"{who} has {a} {what} and {verb} {b}. How many {what} now?"
        else:
            prompt = f"{a}{op}{b}=?"
        out.append(_rec("arithmetic", i, prompt, f"{a}{op}{b}={c}. \\boxed{{{c}}}",
                        f"programmatic:arithmetic:seed={seed}", answer=str(c)))
    return out


def algebra_problems(n: int, seed: int = 0, max_operand: int = 20) -> list[dict]:
    rng = random.Random(seed + 1)
    out = []
    for i in range(n):
        a = rng.choice([k for k in range(-max_operand // 2, max_operand // 2 + 1) if k]) or 1
        b, c = rng.randint(-max_operand, max_operand), rng.randint(-max_operand, max_operand)
        x = Fraction(c - b, a)
        prompt = f"Solve for x: {a}*x + {b} = {c}"
        resp = f"{a}*x = {c - b}, so x = {x}. \\boxed{{{x}}}"
        out.append(_rec("algebra", i, prompt, resp, f"programmatic:algebra:seed={seed}", answer=str(x)))
    return out


# (name, prompt template, body template, test template) with one integer parameter k
_CODE = [
    ("add_k", "Write a Python function add_k(x) that returns x plus {k}.",
     "def add_k(x):\n    return x + {k}", "assert add_k(1) == {k1}\nassert add_k(-{k}) == 0"),
    ("mul_k", "Write a Python function mul_k(x) that returns x times {k}.",
     "def mul_k(x):\n    return x * {k}", "assert mul_k(2) == {k2}\nassert mul_k(0) == 0"),
    ("is_mult", "Write a Python function is_mult(x) that says whether x is a multiple of {k}.",
     "def is_mult(x):\n    return x % {k} == 0", "assert is_mult({k2})\nassert not is_mult({k1})"),
    ("count_big", "Write a Python function count_big(xs) counting the items greater than {k}.",
     "def count_big(xs):\n    return sum(1 for x in xs if x > {k})",
     "assert count_big([{k}, {k1}, {k2}]) == 2\nassert count_big([]) == 0"),
    ("rep", "Write a Python function rep(s) that returns the string s repeated {k} times.",
     "def rep(s):\n    return s * {k}", "assert rep('a') == 'a' * {k}\nassert rep('') == ''"),
]


def code_tasks(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed + 2)
    out = []
    for i in range(n):
        name, p, body, tests = rng.choice(_CODE)
        k = rng.randint(2, 9)
        f = dict(k=k, k1=k + 1, k2=2 * k)
        resp = "```python\n" + body.format(**f) + "\n```"
        out.append(_rec("code", i, p.format(**f), resp, f"programmatic:code:{name}:seed={seed}",
                        tests=tests.format(**f)))
    return out


_FACTS = [
    ("Name the largest planet in the solar system.", "Jupiter is the largest planet in the solar system."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Say hello politely.", "Hello! How can I help you today?"),
    ("What colour is a clear daytime sky?", "A clear daytime sky is blue."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("Give a synonym of happy.", "A synonym of happy is glad."),
]
_WORDS = "river stone cloud maple ember quartz willow harbor lantern meadow".split()


def instruction_pairs(n: int, seed: int = 0, path: str | None = None) -> list[dict]:
    """Non-reasoning instruction/response pairs from local sources."""
    rng = random.Random(seed + 3)
    out = []
    if path:
        for j, line in enumerate(Path(path).read_text().splitlines()):
            if line.strip():
                d = json.loads(line)
                out.append(_rec("instruction", len(out), d["prompt"], d["response"], f"file:{path}#{j}"))
    for q, a in _FACTS:
        out.append(_rec("instruction", len(out), q, a, "builtin:facts"))
    while len(out) < n:
        ws = rng.sample(_WORDS, rng.randint(2, 4))
        kind = rng.randrange(3)
        s = " ".join(ws)
        if kind == 0:
            q, a = f"Write in capitals: {s}", s.upper()
        elif kind == 1:
            q, a = f"Reverse the word order: {s}", " ".join(reversed(ws))
        else:
            q, a = f"How many words are in: {s}", f"There are {len(ws)} words."
        out.append(_rec("instruction", len(out), q, a, f"builtin:transform:seed={seed}"))
    return out


def build_sft_dataset(cfg, seed: int | None = None) -> list[dict]:
    """All generated records for a DataGenConfig, shuffled."""
    s = cfg.seed if seed is None else seed
    recs = (arithmetic_problems(cfg.n_arithmetic, s, cfg.max_operand) + algebra_problems(cfg.n_algebra, s)
            + code_tasks(cfg.n_code, s)
            + instruction_pairs(max(10, cfg.n_arithmetic // 10), s, cfg.instructions_path))
    random.Random(s).shuffle(recs)
    return recs


def to_messages(rec: dict, response: str | None = None) -> list[dict]:
    return [{"role": "user", "content": rec["prompt"]},
            {"role": "assistant", "content": rec["response"] if response is None else response}]


def rejection_sample(model, tok, problems: list[dict], reward_fn, k: int = 4, max_new_tokens: int = 64,
                     temperature: float = 0.7, threshold: float = 1.0, batch_size: int = 16,
                     teacher_uri: str = "teacher") -> tuple[list[dict], dict]:
    """Sample k responses per problem from `model`; keep the verified ones (reward >= threshold).

    Returns (kept records, stats). Each kept record keeps the problem's fields with the
    teacher's response and `source = teacher:<uri>`; duplicates of a response are dropped.
    """
    from dsv3.posttrain.rollout import sample_responses

    kept, tried = [], 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        texts = sample_responses(model, tok, [p["prompt"] for p in chunk], k, max_new_tokens, temperature)
        tried += len(texts)
        rewards = reward_fn([p for p in chunk for _ in range(k)], texts)
        for j, p in enumerate(chunk):
            seen = set()
            for t, r in zip(texts[j * k:(j + 1) * k], rewards[j * k:(j + 1) * k]):
                if r >= threshold and t not in seen:
                    seen.add(t)
                    kept.append({**p, "id": f"{p['id']}-t{len(seen)}", "response": t,
                                 "source": f"teacher:{teacher_uri}"})
    stats = {"problems": len(problems), "samples": tried, "kept": len(kept),
             "accept_rate": len(kept) / max(tried, 1)}
    return kept, stats


def write_dataset(records: list[dict], out_dir: str | Path, name: str, provenance: dict | None = None) -> dict:
    """Write `<name>.jsonl` and `<name>.meta.json`; returns the metadata (with sha256 digest)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    (out / f"{name}.jsonl").write_text(body)
    kinds: dict[str, int] = {}
    for r in records:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    meta = {"name": name, "path": str(out / f"{name}.jsonl"), "n": len(records), "kinds": kinds,
            "sha256": hashlib.sha256(body.encode()).hexdigest(), "provenance": provenance or {}}
    (out / f"{name}.meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return meta


def read_dataset(path: str | Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def split(records: list[dict], val_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    r = list(records)
    random.Random(seed).shuffle(r)
    n_val = max(1, int(len(r) * val_fraction)) if val_fraction > 0 and len(r) > 1 else 0
    return r[n_val:], r[:n_val]


SFT_STAGE = "sft_data"  # dvc.yaml stage: writes data/posttrain/{sft_train,sft_val}.jsonl + data/posttrain_stats.json


def _mirror_params(repo: Path, data_cfg) -> None:
    """Write the `posttrain.data` keys the DVC stage reads (dvc.yaml) from `data_cfg` into params.yaml."""
    import yaml

    from dsv3.config_base import write_params

    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][SFT_STAGE]
    keys = [k.removeprefix("posttrain.data.") for k in spec.get("params", []) if k.startswith("posttrain.data.")]
    params = yaml.safe_load((repo / "params.yaml").read_text()) or {}
    section = params.get("posttrain") or {}
    want = {**(section.get("data") or {}), **{k: getattr(data_cfg, k) for k in keys}}
    if section.get("data") != want:
        write_params(repo / "params.yaml", {"posttrain": {**section, "data": want}})


def repro_sft_data(repo: str | Path = ".", cfg=None, parent_run_id: str | None = None, track: bool = True) -> dict:
    """`dvc repro sft_data` in `repo` (a no-op when params and code are unchanged); returns
    {"train", "val", "sha256", "run_id", "dvc_md5", "n_train", "n_val"} like `stages.stage_data`.

    `cfg` (a RunConfig): its `posttrain.data` is mirrored into params.yaml first, so DVC decides
    what re-runs (as the data flow does for `data:`). Rejection-sampled data (`posttrain.data.teacher`)
    depends on a model DVC does not version: that is `stages.stage_data`'s job, refused here.
    `track`: one MLflow run (stage `sft_data`, child of `parent_run_id`) with the counts, the dataset
    input and tag `dvc_data_digest` = DVC's md5 of data/posttrain (the data flow's convention), and
    the tag `sft_sha256` (the train file's sha256, what `stage_sft` logs as its input)."""
    from dsv3.data.version import lock_outs, repro

    repo = Path(repo).resolve()
    if cfg is not None:
        if cfg.posttrain.data.teacher:
            raise ValueError(f"posttrain.data.teacher={cfg.posttrain.data.teacher!r}: rejection-sampled SFT data "
                             "is not a DVC stage; use dsv3.posttrain.stages.stage_data")
        _mirror_params(repo, cfg.posttrain.data)
    repro(repo, (SFT_STAGE,))
    out = repo / "data" / "posttrain"
    stats = json.loads((repo / "data" / "posttrain_stats.json").read_text())
    md5 = lock_outs(repo, (SFT_STAGE,))["data/posttrain"]
    res = {"train": str(out / "sft_train.jsonl"), "val": str(out / "sft_val.jsonl"), "sha256": stats["sha256"],
           "dvc_md5": md5, "n_train": stats["n_train"], "n_val": stats["n_val"], "run_id": None}
    if track:
        from dsv3 import tracking

        with tracking.start_run(cfg if cfg is not None else {"posttrain.data.dvc_stage": SFT_STAGE}, stage=SFT_STAGE,
                                parent_run_id=parent_run_id, tags={"sft_sha256": res["sha256"]}) as run:
            tracking.log_metrics({"data/n_train": res["n_train"], "data/n_val": res["n_val"]}, 0)
            tracking.log_dataset_input(md5, "sft_data", str(out))  # digest and tag dvc_data_digest: DVC's md5
            res["run_id"] = run.info.run_id
    return res
