"""Log-likelihood requests/s: the `dsv3` lm-eval adapter vs lm-eval's `hf` backend, same
checkpoint, same requests, same batch size, same process (target >= 2x).

The checkpoint is a random `small`-preset model (8K vocabulary) with a byte-level BPE
tokenizer; requests are MMLU-shaped as lm-eval builds them: per subject the same description + 5
`first_n` dev shots, then the question, with the 4 answer letters as continuations. Both
backends share one-token continuations across a question; ours also runs each subject's
shared prefix once into the latent cache and skips lm_head at positions that score nothing.
    python benchmarks/bench_eval.py [--questions 48] [--batch-size 16] [--preset small]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜fim▁hole｜>", "<｜fim▁begin｜>",
           "<｜fim▁end｜>", "<｜User｜>", "<｜Assistant｜>", "<｜pad｜>"]
WORDS = ("the of a to in is that for on with as by at from this which be are was an or it not have "
         "cell energy field group theory market law court protein equation function value system "
         "answer question choice number time force mass acid base state nation war trade").split()


def build_checkpoint(out: Path, preset: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dsv3 import DeepSeekV3, ModelConfig

    cfg = ModelConfig.preset(preset)
    torch.manual_seed(0)
    DeepSeekV3(cfg).save_pretrained(out)
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=min(cfg.vocab_size, 2000), special_tokens=SPECIAL,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL[0], eos_token=SPECIAL[1],
                            pad_token=SPECIAL[-1]).save_pretrained(out)


def mmlu_like_requests(n_questions: int):
    from lm_eval.api.instance import Instance

    rng = random.Random(1)

    def q():
        opts = "\n".join(f"{L}. " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) for L in "ABCD")
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40))) + "?\n" + opts + "\nAnswer:"

    reqs = []
    for subject in range(max(1, n_questions // 12)):  # lm-eval's MMLU: the same first_n 5 dev shots per subject
        shots = "".join(q() + " " + rng.choice("ABCD") + "\n\n" for _ in range(5))
        for i in range(12):
            ctx = f"The following are multiple choice questions (with answers) about subject {subject}.\n\n" + shots + q()
            reqs += [Instance("loglikelihood", {}, (ctx, " " + L), len(reqs)) for L in "ABCD"]
    return reqs


def timed(lm, reqs, repeats: int = 2) -> tuple[float, list]:
    lm.loglikelihood(reqs[:8])  # warm-up
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = lm.loglikelihood(reqs, disable_tqdm=True)
        best = min(best, time.perf_counter() - t)
    return len(reqs) / best, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--preset", default="small")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from dsv3.evals.adapter import DSV3LM

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp)
        build_checkpoint(ckpt, a.preset)
        reqs = mmlu_like_requests(a.questions)
        ours = DSV3LM(str(ckpt), batch_size=a.batch_size)
        n_tok = sum(len(ours.tok_encode(r.args[0])) for r in reqs[::4])
        print(f"checkpoint: preset={a.preset} vocab={ours.model.config.vocab_size} "
              f"params={sum(p.numel() for p in ours.model.parameters()) / 1e6:.1f}M; "
              f"{len(reqs)} requests, {n_tok / (len(reqs) // 4):.0f} context tokens/question, "
              f"batch {a.batch_size}, {torch.get_num_threads()} threads")
        rps_ours, ll_ours = timed(ours, reqs)
        print(f"dsv3 adapter : {rps_ours:8.2f} requests/s")
        try:
            import accelerate  # noqa: F401
            from lm_eval.models.huggingface import HFLM
        except ImportError as e:
            print(f"hf backend   : unavailable ({e}); add `accelerate` to run the comparison")
            return 0
        hf = HFLM(pretrained=str(ckpt), batch_size=a.batch_size, device="cpu", dtype="float32")
        rps_hf, ll_hf = timed(hf, reqs)
        diff = max(abs(x[0] - y[0]) for x, y in zip(ll_ours, ll_hf))
        print(f"lm-eval hf   : {rps_hf:8.2f} requests/s")
        print(f"speed-up     : {rps_ours / rps_hf:8.2f}x   (max |Δ loglik| = {diff:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
