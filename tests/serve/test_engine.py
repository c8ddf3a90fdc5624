"""Engine: continuous batching (sequences joining and leaving between steps) gives each
request the output it gets alone; seeded sampling does not depend on the batch; stop strings,
EOS, limits and the bounded queue; cache blocks come back when requests finish or abort."""

import threading
import time

import pytest
import torch

from dsv3 import DeepSeekV3
from dsv3.serve.config import ServeConfig
from dsv3.serve.engine import Engine, QueueFull, Request, RequestError
from dsv3.serve.sampling import SamplingParams
from dsv3.serve.text import TextStream

CFG = dict(block_size=8, cache_tokens=4096)


def _greedy(n, **kw):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def test_continuous_batching_equals_solo_generation(loaded, tiny_dir):
    model, tok, _, _ = loaded
    ref = DeepSeekV3.from_pretrained(tiny_dir).eval()
    eng = Engine(model, tok, ServeConfig(max_batch=3, **CFG))
    g = torch.Generator().manual_seed(0)
    jobs = [(torch.randint(0, 400, (n,), generator=g).tolist(), m) for n, m in
            [(5, 12), (30, 4), (11, 20), (2, 7), (17, 9), (8, 15)]]
    sizes = []
    outs = {}
    for i, (p, m) in enumerate(jobs):  # half submitted up front, the rest while others decode
        if i == 3:
            for _ in range(3):
                eng.step()
                sizes.append(len(eng.running))
        eng.submit(Request(p, _greedy(m), sink=lambda o, i=i: outs.setdefault(i, []).append(o)))
    while eng.waiting or eng.running:
        eng.step()
        sizes.append(len(eng.running))
    assert max(sizes) == 3 and min(sizes) < 3  # a full batch, and sequences left and joined
    for i, (p, m) in enumerate(jobs):
        toks = [t for o in outs[i] for t in o.token_ids]
        assert toks == ref.generate(torch.tensor([p]), m)[0, len(p):].tolist(), i
        assert outs[i][-1].finish_reason == "length"
    assert eng.pool.used_blocks == 0


def test_seeded_sampling_does_not_depend_on_the_batch(loaded):
    model, tok, _, _ = loaded
    eng = Engine(model, tok, ServeConfig(**CFG))
    p = tok.encode("The quick brown fox")
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    alone = eng.generate(p, params).token_ids
    eng.start()
    try:
        others = [Request(tok.encode("Hello there"), SamplingParams(max_tokens=30, temperature=1.0, seed=i))
                  for i in range(3)]
        for r in others:
            eng.submit(r)
        crowded = eng.generate(p, params).token_ids
        other_seed = eng.generate(p, SamplingParams(max_tokens=12, temperature=1.0, seed=8, ignore_eos=True))
    finally:
        eng.stop()
    assert alone == crowded and len(alone) == 12
    assert other_seed.token_ids != alone


def test_stop_strings_eos_and_limits(loaded):
    model, tok, _, _ = loaded
    eng = Engine(model, tok, ServeConfig(max_model_len=64, **CFG))
    p = tok.encode("Hello, how are you")
    full = eng.generate(p, _greedy(16))
    text = full.text
    stop = text[5:7]
    cut = eng.generate(p, _greedy(16, stop=[stop, "zzzz"]))
    assert cut.finish_reason == "stop" and cut.text == text[:text.find(stop)]
    ids = full.token_ids
    eos, eng.eos = eng.eos, {ids[3]}  # pretend the 4th token is EOS: generation ends at it
    o = eng.generate(p, SamplingParams(max_tokens=16, temperature=0))
    assert o.finish_reason == "stop" and o.token_ids == ids[:ids.index(ids[3]) + 1]
    eng.eos = eos
    o = eng.generate(p, SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[ids[2]]))
    assert o.finish_reason == "stop" and o.token_ids == ids[:ids.index(ids[2]) + 1]
    with pytest.raises(RequestError, match="maximum context length is 64"):
        eng.submit(Request(p, _greedy(60)))
    with pytest.raises(RequestError, match="limit of 63"):
        eng.submit(Request(list(range(70)), _greedy(1)))
    with pytest.raises(RequestError, match="empty"):
        eng.submit(Request([], _greedy(1)))


def test_text_stream_holds_back_possible_stop_prefixes(loaded):
    _, tok, _, _ = loaded
    ids = tok.encode("Hello, how are you today?")
    s = TextStream(tok, stop=["are you"])
    pieces = [s.add([t]) for t in ids]
    emitted = "".join(p for p, _ in pieces)
    first = [hit for _, hit in pieces].index(True)  # the token that completes the stop string
    assert emitted == "Hello, how " and "are you" in tok.decode(ids[:first + 1]) and \
        "are you" not in tok.decode(ids[:first])
    s2 = TextStream(tok)
    assert "".join(s2.add([t])[0] for t in ids) + s2.flush() == "Hello, how are you today?"


def test_queue_bound_and_abort_release_blocks(loaded):
    model, tok, _, _ = loaded
    eng = Engine(model, tok, ServeConfig(max_batch=1, max_queue=2, **CFG))
    reqs = [eng.submit(Request(tok.encode("Hello"), _greedy(40))) for _ in range(2)]
    with pytest.raises(QueueFull):
        eng.submit(Request(tok.encode("Hello"), _greedy(4)))
    assert eng.metrics.rejected._value.get() == 1
    eng.step()  # admits the first (max_batch 1)
    assert len(eng.running) == 1 and eng.pool.used_blocks > 0
    eng.abort(reqs[0])
    eng.abort(reqs[1])
    eng.step()
    assert not eng.running and not eng.waiting and eng.pool.used_blocks == 0
    assert reqs[0].finished and len(reqs[0].generated) < 40


def test_engine_thread_serves_concurrent_clients(loaded):
    model, tok, _, _ = loaded
    eng = Engine(model, tok, ServeConfig(max_batch=4, **CFG))
    solo = [eng.generate(tok.encode(f"Question {i}"), _greedy(10)).token_ids for i in range(6)]
    eng.start()
    got = [None] * 6
    try:
        def client(i):
            got[i] = eng.generate(tok.encode(f"Question {i}"), _greedy(10)).token_ids
        ts = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        t0 = time.time()
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=120)
        assert time.time() - t0 < 120
    finally:
        eng.stop()
    assert got == solo
    assert eng.metrics.steps._value.get() > 0 and eng.pool.used_blocks == 0


def test_prefill_budget_interleaves_admissions_with_decode_steps(loaded):
    model, tok, _, _ = loaded
    eng = Engine(model, tok, ServeConfig(max_batch=8, prefill_budget=20, **CFG))
    first = eng.submit(Request(list(range(10, 18)), _greedy(30)))
    eng.step()
    for i in range(4):
        eng.submit(Request(list(range(20 + i, 32 + i)), _greedy(5)))  # 12-token prompts
    counts = []
    for _ in range(3):
        n0 = len(first.generated)
        eng.step()
        counts.append((len(eng.running), len(first.generated) - n0))
    assert counts == [(2, 1), (3, 1), (4, 1)]  # one 12-token prompt per step (budget 20), and a decode step each


def test_request_finished_at_its_first_token_never_decodes_into_freed_blocks(loaded):
    """A request done at its first token (max_tokens=1) frees its blocks during admission; the
    next request admitted in the same iteration gets them. The decode step must not run the
    finished request (it did: a token past its end went to its client, and a wasted batch row);
    the request that took over its blocks decodes exactly as it does alone."""
    model, tok, _, _ = loaded
    short, long_ = [3, 1, 4, 1, 5], list(range(40, 60))

    def run(jobs):
        eng = Engine(model, tok, ServeConfig(max_batch=2, **CFG))
        outs: dict[int, list] = {}
        for i, (p, n) in enumerate(jobs):
            eng.submit(Request(p, _greedy(n, logprobs=0), sink=lambda o, i=i: outs.setdefault(i, []).append(o)))
        eng.step()  # all admitted in one iteration
        while eng.waiting or eng.running:
            eng.step()
        assert eng.pool.used_blocks == 0
        return outs

    solo = run([(long_, 8)])[0]
    pair = run([(short, 1), (long_, 8)])
    assert [t for o in pair[0] for t in o.token_ids] == [pair[0][0].token_ids[0]]  # one token, no more
    got, want = [lp.logprob for o in pair[1] for lp in o.logprobs], [lp.logprob for o in solo for lp in o.logprobs]
    assert len(got) == len(want) == 8
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=0)
