"""Prefill/decode disaggregation: with prefill in a separate worker (a thread, a spawned
process, a Ray actor) whose latent cache is handed to the decode engine, every request gets
exactly the output of the colocated engine (greedy, seeded sampling, echo logprobs, with and
without MTP speculation), and the bytes handed over are the prompts' latent cache."""

import pytest

from dsv3.serve.config import ServeConfig
from dsv3.serve.engine import Engine, Request
from dsv3.serve.sampling import SamplingParams
from dsv3.serve.server import load_served_model

JOBS = [([100, 102, 104], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)),
        (list(range(120, 160)), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)),
        ([7, 300, 21, 5, 99], SamplingParams(max_tokens=8, temperature=1.0, seed=5, ignore_eos=True)),
        ([130, 131], SamplingParams(max_tokens=4, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True,
                                    logprobs=2, echo=True))]


def _run(model_dir, **cfg):
    model, tok, d, _ = load_served_model(str(model_dir))
    eng = Engine(model, tok, ServeConfig(block_size=8, cache_tokens=4096, max_batch=3, **cfg), model_dir=d)
    outs = {}
    try:
        for i, (p, sp) in enumerate(JOBS):
            eng.submit(Request(p, sp, sink=lambda o, i=i: outs.setdefault(i, []).append(o)))
        while eng.waiting or eng.running or eng.prefilling:
            eng.step()
    finally:
        eng.stop()
    res = []
    for i in range(len(JOBS)):
        o = outs[i]
        plp = [(x.token, x.logprob) for x in o[0].prompt_logprobs] if o[0].prompt_logprobs else None
        res.append(([t for x in o for t in x.token_ids], "".join(x.text for x in o), plp))
    return res, eng


@pytest.mark.parametrize("spec", [0, 2])
def test_disaggregated_equals_colocated(trained_dir, spec):
    colo, _ = _run(trained_dir, speculative=spec)
    disagg, eng = _run(trained_dir, speculative=spec, pd="disaggregated", pd_worker="thread")
    for (a, ta, pa), (b, tb, pb) in zip(colo, disagg, strict=True):
        assert a == b and ta == tb
        assert (pa is None) == (pb is None)
        if pa:
            assert [t for t, _ in pa] == [t for t, _ in pb]
            assert all(x == y or abs(x - y) < 1e-5 for (_, x), (_, y) in zip(pa[1:], pb[1:]))
    per_token = eng.pool.bytes_per_token()  # main layers (+ the MTP layer when speculating)
    assert eng.metrics.pd_transfers._value.get() == len(JOBS)
    assert eng.metrics.pd_bytes._value.get() == per_token * sum(len(p) for p, _ in JOBS)
    assert eng.pool.used_blocks == 0


def test_disaggregated_process_worker(trained_dir):
    colo, _ = _run(trained_dir, speculative=1)
    disagg, eng = _run(trained_dir, speculative=1, pd="disaggregated", pd_worker="process")
    assert [x[0] for x in disagg] == [x[0] for x in colo]
    assert eng.metrics.pd_bytes._value.get() > 0


@pytest.mark.slow
def test_disaggregated_ray_actor(trained_dir):
    from dsv3 import cluster as launch

    colo, _ = _run(trained_dir)
    try:
        disagg, _ = _run(trained_dir, pd="disaggregated", pd_worker="ray")
    finally:
        launch.ray_shutdown()
    assert [x[0] for x in disagg] == [x[0] for x in colo]
