"""The lm-eval adapter in a precision (`precision=` model_arg, dsv3.train.precision): log-likelihoods are the
model's forward in that precision's autocast (bf16 differs from the default fp32), fp8 converts the loaded
model's Linear layers, and generation runs in it too."""

import math

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

import dsv3.evals  # noqa: F401  (registers "dsv3")
from dsv3.fp8 import FP8Linear
from dsv3.train.precision import Precision

PAIRS = [("Question: Who scored first?\nAnswer:", " Lions"), ("def add(a, b):", "\n    return a + b")]


def _direct(lm, precision, ctx, cont):
    c, x = lm._encode_pair(ctx, cont)
    with torch.no_grad(), Precision(precision).autocast("cpu"):
        lp = torch.log_softmax(lm.model(torch.tensor([c + x])).logits[0].float(), -1)
    return sum(float(lp[len(c) - 1 + i, t]) for i, t in enumerate(x))


def test_loglikelihood_and_generation_in_the_precision(tiny_ckpt):
    reqs = [Instance("loglikelihood", {}, pair, 0) for pair in PAIRS]
    got = {}
    for precision in (None, "bf16", "fp8"):
        lm = get_model("dsv3")(pretrained=str(tiny_ckpt), batch_size=2, precision=precision)
        assert any(isinstance(m, FP8Linear) for m in lm.model.modules()) == (precision == "fp8")
        got[precision] = [ll for ll, _ in lm.loglikelihood(reqs)]
        for (ctx, cont), ll in zip(PAIRS, got[precision]):
            assert math.isclose(ll, _direct(lm, precision or "fp32", ctx, cont), abs_tol=1e-3), (precision, ctx)
        out = lm.generate_until([Instance("generate_until", {}, ("def add(a, b):", {"until": ["\n\n"],
                                                                                    "max_gen_toks": 4}), 0)])
        assert isinstance(out[0], str)
    assert got["bf16"] != got[None] and got["fp8"] != got[None]
