"""MTP speculative decoding (§2.2, §5.4.3): greedy output equals plain greedy token for token
(accepted and rejected drafts, K = 1..3); the rejection rule leaves the sampled distribution
unchanged (exactly, checked statistically: on synthetic distributions and end to end against
the model's exact second-token distribution); acceptance is exported to /metrics and MLflow."""

import math

import pytest
import torch

from dsv3 import DeepSeekV3
from dsv3.serve.config import ServeConfig
from dsv3.serve.engine import Engine, Request
from dsv3.serve.sampling import SamplingParams, accept_drafts, processed_probs
from dsv3.serve.server import load_served_model

CFG = dict(block_size=8, cache_tokens=8192, max_batch=64)


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; bins with expected count < 5 are pooled."""
    n = counts.sum()
    exp = probs * n
    small = exp < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]]) if small.any() else counts
    ex = torch.cat([exp[~small], exp[small].sum()[None]]) if small.any() else exp
    keep = ex > 0
    stat = float(((obs[keep] - ex[keep]) ** 2 / ex[keep]).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.fixture(scope="module")
def trained(trained_dir):
    return load_served_model(str(trained_dir))


@pytest.mark.parametrize("K", [1, 2, 3])
def test_speculative_greedy_equals_plain_greedy(trained, trained_dir, K):
    model, tok, _, _ = trained
    ref = DeepSeekV3.from_pretrained(trained_dir).eval()
    eng = Engine(model, tok, ServeConfig(speculative=K, static_moe=K == 2, **CFG))  # both decode paths
    g = torch.Generator().manual_seed(K)
    prompts = [[100, 102, 104], [130, 131, 132, 133, 134], [160, 161]] + \
        [torch.randint(0, 400, (n,), generator=g).tolist() for n in (4, 9, 1)]  # off-distribution: rejections
    outs = {}
    for i, p in enumerate(prompts):
        eng.submit(Request(p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
                           sink=lambda o, i=i: outs.setdefault(i, []).extend(o.token_ids)))
    while eng.waiting or eng.running:
        eng.step()
    for i, p in enumerate(prompts):
        assert outs[i] == ref.generate(torch.tensor([p]), 24)[0, len(p):].tolist(), (K, i)
    acc = eng.metrics.spec_acceptance()
    assert sorted(acc) == list(range(1, K + 1))
    assert 0.3 < acc[1] < 1.0  # both paths ran: accepted drafts and rejected ones (rolled back)
    assert eng.spec.stats()["serve/spec_tokens_per_step"] > 1.3
    assert eng.pool.used_blocks == 0


def test_rejection_rule_preserves_the_target_distribution():
    """First output ~ p0 exactly, and the second (when the first draft was kept) ~ p1, whatever
    the draft distribution q; a rule that always kept drafts would give q instead."""
    g = torch.Generator().manual_seed(0)
    V, N = 6, 20000
    p_logits = torch.randn(3, V, generator=g) * 1.5
    q_logits = torch.randn(2, V, generator=g) * 1.5
    params = SamplingParams(temperature=1.0)
    p = processed_probs(p_logits, 1.0, 1.0)
    q = processed_probs(q_logits, 1.0, 1.0)
    first, second = torch.zeros(V), torch.zeros(V)
    for _ in range(N):
        drafts = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(2)]
        out, a = accept_drafts(drafts, q, p_logits, params, g)
        assert len(out) == a + 1 and out[:a] == drafts[:a]
        first[out[0]] += 1
        if a >= 1:
            second[out[1]] += 1
    assert _chi2_pvalue(first, p[0]) > 1e-3
    assert _chi2_pvalue(second, p[1]) > 1e-3
    assert _chi2_pvalue(first, q[0]) < 1e-6  # the test can tell p from q


def test_speculative_sampling_matches_exact_second_token_distribution(trained):
    """End to end: with one MTP draft per step at temperature 1.6 (~30% rejected), the second
    generated token follows the model's exact distribution sum_t1 p(t1) p(t2 | t1)."""
    model, tok, _, _ = trained
    prompt, T, N = [100, 102, 104, 106], 1.6, 800
    with torch.no_grad():
        p1 = processed_probs(model(torch.tensor([prompt])).logits[0, -1], T, 1.0)  # [V]
        V = p1.shape[0]
        rows = torch.cat([torch.tensor(prompt).expand(V, -1), torch.arange(V)[:, None]], 1)
        out = model(rows, return_mtp=True)
        p2 = (p1[:, None] * processed_probs(out.logits[:, -1], T, 1.0)).sum(0)
        q2 = (p1[:, None] * processed_probs(out.mtp_logits[0][:, -1], T, 1.0)).sum(0)  # the drafts' law
    eng = Engine(model, tok, ServeConfig(speculative=1, max_queue=N, **CFG))
    seconds = torch.zeros(V)
    reqs = [Request(prompt, SamplingParams(max_tokens=2, temperature=T, seed=s, ignore_eos=True),
                    sink=lambda o: None) for s in range(N)]
    for r in reqs:
        eng.submit(r)
    while eng.waiting or eng.running:
        eng.step()
    for r in reqs:
        seconds[r.generated[1]] += 1
    acc = eng.metrics.spec_acceptance()[1]
    assert 0.2 < acc < 0.95  # drafts are often rejected at this temperature
    assert _chi2_pvalue(seconds, p2) > 1e-3
    tv = 0.5 * float((p2 - q2).abs().sum())
    assert tv > 0.05 and _chi2_pvalue(seconds, q2) < 1e-3  # the draft law itself would be caught


def test_acceptance_exported_to_metrics_and_mlflow(trained, tmp_path, monkeypatch):
    from dsv3 import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    model, tok, _, _ = trained
    eng = Engine(model, tok, ServeConfig(speculative=2, **CFG))
    eng.generate([100, 101, 102], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    text = eng.metrics.render().decode()
    assert 'dsv3_spec_draft_tokens_total{position="1"}' in text
    assert 'dsv3_spec_accepted_tokens_total{position="2"}' in text
    with tracking.start_run({"serve.speculative": 2}, stage="serve") as run:
        eng.spec.log_mlflow()
    m = tracking.run_info(run.info.run_id).data.metrics
    assert math.isclose(m["serve/spec_accept_pos1"], eng.spec.stats()["serve/spec_accept_pos1"])
    assert m["serve/spec_tokens_per_step"] > 1.0
