"""The static-shape decode step under torch.compile (item 6): one graph per shape bucket whose
context length is a dynamic dimension; the compiled engine's greedy output equals the model's
generate across context lengths and a padded batch. Run with MTP speculation, which compiles
the main step (verification of 3 tokens) and the MTP step (catch-up and draft shapes); the
plain decode step is the same function at S=1. The server's warm-up (before it listens) compiles
the batch-1 graphs without leaving metrics or loads behind. (Compiling takes minutes on 2 cores: one
test.)"""

import pytest
import torch

from dsv3 import DeepSeekV3
from dsv3.serve.config import ServeConfig
from dsv3.serve.engine import Engine, Request
from dsv3.serve.sampling import SamplingParams
from dsv3.serve.server import load_served_model


@pytest.mark.slow
def test_compiled_engine_equals_generate(trained_dir):
    import torch._dynamo

    torch._dynamo.reset()
    model, tok, _, _ = load_served_model(str(trained_dir))
    ref = DeepSeekV3.from_pretrained(trained_dir).eval()
    eng = Engine(model, tok, ServeConfig(block_size=8, cache_tokens=4096, compile=True, speculative=2))
    # the server's warm-up compiles the batch-1 graphs and leaves no trace in what the server reports
    from torch._dynamo.utils import counters

    eng.warm_up()
    assert eng.spec.stats() == {} and eng.runner.expert_load.sum() == 0 and eng.pool.used_blocks == 0
    assert b"dsv3_prompt_tokens_total 0.0" in eng.metrics.render()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the warm-up compiled
    first = eng.generate([5, 6, 7, 8, 9], SamplingParams(max_tokens=9, temperature=0, ignore_eos=True))
    assert counters["stats"]["unique_graphs"] == graphs  # a batch-1 request after warm-up compiles nothing
    assert first.token_ids == ref.generate(torch.tensor([[5, 6, 7, 8, 9]]), 9)[0, 5:].tolist()
    prompts = [[100, 102, 104], list(range(110, 140)), [7, 300, 21]]
    outs = {}
    for i, p in enumerate(prompts):  # 3 rows -> padded to a batch of 4
        eng.submit(Request(p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
                           sink=lambda o, i=i: outs.setdefault(i, []).extend(o.token_ids)))
    while eng.waiting or eng.running:
        eng.step()
    for i, p in enumerate(prompts):
        assert outs[i] == ref.generate(torch.tensor([p]), 20)[0, len(p):].tolist(), i
    assert eng.spec.stats()["serve/spec_tokens_per_step"] > 1.3
    from torch._dynamo.utils import guard_failures

    guard_failures.clear()
    for p in ([100, 102, 104, 106, 108, 110, 112], list(range(101, 131))):  # other context lengths
        eng.submit(Request(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                           sink=lambda o: None))
    eng.submit(Request([7, 8], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), sink=lambda o: None))
    while eng.waiting or eng.running:
        eng.step()
    # new batch buckets (rows join and finish at different steps) may compile; a new context length
    # (the cache rows read, the mask's last dimension) never does: T is dynamic on CPU
    reasons = [r for rs in guard_failures.values() for r in rs]
    assert not [r for r in reasons if "'read'" in r or "'mask'" in r], reasons
