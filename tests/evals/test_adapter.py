"""The dsv3 lm-eval adapter: log-likelihoods equal a direct forward pass, batching and
de-duplication do not change them, generation honours and cuts stop strings."""

import math

import pytest
import torch
from lm_eval.api.instance import Instance

import dsv3.evals  # noqa: F401  (registers "dsv3")


@pytest.fixture(scope="module")
def lm(tiny_ckpt):
    from lm_eval.api.registry import get_model

    return get_model("dsv3")(pretrained=str(tiny_ckpt), batch_size=3)


def _ll(ctx, cont):
    return Instance("loglikelihood", {}, (ctx, cont), 0)


def _direct(lm, ctx, cont):
    c, x = lm._encode_pair(ctx, cont)
    ids = torch.tensor([c + x])
    with torch.no_grad():
        lp = torch.log_softmax(lm.model(ids).logits[0].float(), -1)
    return sum(float(lp[len(c) - 1 + i, t]) for i, t in enumerate(x))


def test_registered_and_loads_checkpoint(lm, tiny_ckpt):
    assert type(lm).__name__ == "DSV3LM" and lm.checkpoint_dir == str(tiny_ckpt)
    assert lm.max_length == 512 and lm.eot_token_id == lm.tokenizer.eos_token_id


def test_loglikelihood_matches_direct_forward(lm):
    pairs = [("Question: Who scored first?\nAnswer:", " Lions"), ("Question: Who scored first?\nAnswer:", " B"),
             ("Question: Who scored first?\nAnswer:", " C"), ("def add(a, b):", "\n    return a + b"),
             ("Passage: The Lions scored first in the first quarter.", " Question: who?"), ("x", " y")]
    got = lm.loglikelihood([_ll(*p) for p in pairs])
    for (c, x), (ll, greedy) in zip(pairs, got):
        assert math.isclose(ll, _direct(lm, c, x), abs_tol=1e-4), (c, x)
        assert isinstance(greedy, bool)
    # batch size 1 and another order give the same numbers (padding / sorting / dedup invariance)
    lm.batch_size = 1
    rev = lm.loglikelihood([_ll(*p) for p in reversed(pairs)])
    lm.batch_size = 3
    assert [round(a[0], 4) for a in got] == [round(a[0], 4) for a in reversed(rev)]


def test_is_greedy_flag(lm):
    ctx = "def add(a, b):"
    c, _ = lm._encode_pair(ctx, " x")
    with torch.no_grad():
        top = int(lm.model(torch.tensor([c])).logits[0, -1].argmax())
    cont = lm.tok_decode([top], skip_special_tokens=False)
    (ll, greedy), = lm._loglikelihood_tokens([((ctx, cont), c, [top])])
    assert greedy and ll < 0


def test_loglikelihood_rolling_sums_windows(lm):
    text = "def add(a, b):\n    return a + b\n" * 40  # longer than one 512-token window
    toks = lm.tok_encode(text)
    assert len(toks) > lm.max_length
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    lm._max_length = 4096  # one window, scored by a direct forward with the BOS prefix
    try:
        (one,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    finally:
        lm._max_length = 512
    ids = torch.tensor([[lm.prefix_token_id] + toks[:511]])
    with torch.no_grad():
        lp = torch.log_softmax(lm.model(ids).logits[0].float(), -1)
    first = sum(float(lp[i, t]) for i, t in enumerate(toks[:511]))
    assert total < first < 0 and math.isfinite(one)


def test_generate_until_cuts_stop_strings_and_matches_greedy(lm):
    reqs = [Instance("generate_until", {}, (p, {"until": ["\n#", "e"], "max_gen_toks": 24, "do_sample": False}), i)
            for i, p in enumerate(["def add(a, b):", "Passage: The Lions", "x"])]
    outs = lm.generate_until(reqs)
    assert len(outs) == 3
    for (prompt, _), out in zip((r.args for r in reqs), outs):
        assert "e" not in out and "\n#" not in out
        # the uncut greedy continuation, from the model's own generate, starts with `out`
        ids = torch.tensor([lm.tok_encode(prompt)])
        full = lm.model.generate(ids, max_new_tokens=24)[0, ids.shape[1]:].tolist()
        assert lm.tok_decode(full).startswith(out)


def test_generate_stops_early_when_all_rows_stop(lm):
    import time

    any_char = {"until": list("abcdefghijklmnopqrstuvwxyz0123456789 \n.,:;()[]_-+=*/'\"!?<>{}#@$%&|\\^`~"),
                "max_gen_toks": 400, "do_sample": False}
    t = time.time()
    (out,) = lm.generate_until([Instance("generate_until", {}, ("x", any_char), 0)])
    assert time.time() - t < 3.0  # stopped after a few steps, not 400
    assert len(out) < 40


def test_shared_prefix_path_matches_plain_path(lm):
    from dsv3.evals.adapter import _prefix_groups

    shots = "".join(f"Question {i}: which organ pumps blood?\nA. lung\nB. heart\nAnswer: B\n\n" for i in range(5))
    pairs = [(shots + q, c) for q in ("Which is a field?\nAnswer:", "How many lungs?\nAnswer:", "x?\nAnswer:")
             for c in (" A", " B", " lungs")] + [("def add(a, b):", " return")]
    reqs = [_ll(*p) for p in pairs]
    inps = [lm._encode_pair(*p) for p in pairs]
    flat = [(c + x)[:-1] for c, x in inps]
    groups = list(_prefix_groups(flat, [len(x) for _, x in inps], 32))
    assert sorted(len(g) for g, _ in groups) == [1, 9] and max(P for _, P in groups) >= 100
    shared = lm.loglikelihood(reqs)
    lm.min_prefix = 0
    try:
        plain = lm.loglikelihood(reqs)
    finally:
        lm.min_prefix = 32
    for (a, ga), (b, gb) in zip(shared, plain):
        assert abs(a - b) < 1e-4 and ga == gb
    for p, (a, _) in zip(pairs, shared):
        assert abs(a - _direct(lm, *p)) < 1e-4
