"""ModelRunner over the paged latent cache against the model's own forward_step / forward:
prompts, batched decode of sequences at different positions (padded rows and columns), both
MoE forms of the static step (gathered and dense), the MTP module over its own cache, and the
expert-load counts."""

import pytest
import torch

from dsv3 import DeepSeekV3, ModelConfig
from dsv3.serve.cache import BlockPool
from dsv3.serve.model_runner import ModelRunner, step_input


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeepSeekV3(ModelConfig.preset("tiny", initializer_range=0.1)).eval()


def _pool(m, tokens=1024, bs=8):
    c = m.config
    return BlockPool(c.num_hidden_layers + 1, tokens, bs, c.kv_lora_rank + c.qk_rope_head_dim)


def _ref_logits(m, prompt, n_new):
    """Logits of the model's forward_step for the prompt then n_new greedy tokens."""
    cache = m.new_cache(1, len(prompt) + n_new)
    lg = m.forward_step(torch.tensor([prompt]), cache)[0, -1]
    out, toks = [lg], []
    for _ in range(n_new):
        toks.append(int(lg.argmax()))
        lg = m.forward_step(torch.tensor([[toks[-1]]]), cache)[0, -1]
        out.append(lg)
    return torch.stack(out), toks


@pytest.mark.parametrize("static_moe", [True, False])
def test_batched_decode_matches_forward_step(model, static_moe):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 20, 9, 14, 5)]
    n_new = 6
    refs = [_ref_logits(model, p, n_new) for p in prompts]
    pool = _pool(model)
    run = ModelRunner(model, pool, static_moe=static_moe)
    seqs = [pool.alloc(len(p) + n_new + 1) for p in prompts]
    for s, p, (ref, _) in zip(seqs, prompts, refs):
        lg, _ = run.forward(step_input([0], torch.tensor([p]), [s.table], 8), all_logits=False)
        s.length = len(p)
        torch.testing.assert_close(lg[0, -1], ref[0], atol=2e-5, rtol=1e-5)
    toks = [r[1] for r in refs]
    for k in range(n_new):  # 5 rows (dense MoE: 5*2 >= 8 experts), padded to 8 rows, T to 16
        ids = torch.tensor([[t[k]] for t in toks])
        inp = step_input([s.length for s in seqs], ids, [s.table for s in seqs], 8, pad_batch=8, t_bucket=16)
        lg, h = run.forward(inp)
        assert lg.shape[0] == 8 and h.shape[:2] == (8, 1)
        for s in seqs:
            s.length += 1
        for i, (ref, _) in enumerate(refs):
            torch.testing.assert_close(lg[i, -1], ref[k + 1], atol=5e-5, rtol=1e-5)
    # one row alone: the gathered-expert form (1 token * top-2 < 8 experts)
    s, (ref, t) = seqs[0], refs[0]
    pool2 = _pool(model)
    run2 = ModelRunner(model, pool2, static_moe=static_moe)
    s2 = pool2.alloc(64)
    run2.forward(step_input([0], torch.tensor([prompts[0]]), [s2.table], 8))
    s2.length = len(prompts[0])
    lg, _ = run2.forward(step_input([s2.length], torch.tensor([[t[0]]]), [s2.table], 8))
    torch.testing.assert_close(lg[0, -1], ref[1], atol=5e-5, rtol=1e-5)


def test_multi_token_step_with_ragged_rows(model):
    """Rows appending different numbers of tokens (padding columns) equal one-by-one appends."""
    pool = _pool(model)
    run = ModelRunner(model, pool)
    p = [list(range(10, 17)), list(range(40, 52))]
    seqs = [pool.alloc(32) for _ in p]
    for s, x in zip(seqs, p):
        run.forward(step_input([0], torch.tensor([x[:4]]), [s.table], 8))
        s.length = 4
    new = [x[4:] for x in p]  # 3 and 8 tokens
    S = max(map(len, new))
    ids = torch.zeros(2, S, dtype=torch.long)
    for i, x in enumerate(new):
        ids[i, :len(x)] = torch.tensor(x)
    lg, _ = run.forward(step_input([4, 4], ids, [s.table for s in seqs], 8, lens=[3, 8]))
    for i, x in enumerate(p):
        ref = model.forward_step(torch.tensor([x]), model.new_cache(1, len(x)))[0]
        torch.testing.assert_close(lg[i, : len(x) - 4], ref[4:], atol=5e-5, rtol=1e-5)


def test_mtp_over_its_cache_matches_training_path(model):
    """The MTP module run position by position over its own latent cache gives the logits of
    the training path (model.forward(..., return_mtp=True)), which sees the whole sequence."""
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(2))
    out = model(ids, return_mtp=True, return_hidden=True)
    ref = out.mtp_logits[0][0]  # [11, V]: position i predicts token i + 2
    pool = _pool(model)
    run = ModelRunner(model, pool)
    s = pool.alloc(16)
    _, h = run.forward(step_input([0], ids, [s.table], 8))
    lg1, _ = run.mtp_forward(0, h[:, :6], step_input([0], ids[:, 1:7], [s.table], 8))  # positions 0..5
    got = [lg1[0]]
    for j in range(6, 11):  # then one position at a time (the decode-time catch-up)
        lg, _ = run.mtp_forward(0, h[:, j:j + 1], step_input([j], ids[:, j + 1:j + 2], [s.table], 8))
        got.append(lg[0])
    torch.testing.assert_close(torch.cat(got), ref, atol=5e-5, rtol=1e-5)


def test_expert_load_counts_real_rows_only(model):
    pool = _pool(model)
    run = ModelRunner(model, pool)
    s = pool.alloc(16)
    run.forward(step_input([0], torch.tensor([[1, 2, 3, 4, 5]]), [s.table], 8))
    s.length = 5
    run.forward(step_input([5], torch.tensor([[6]]), [s.table], 8, pad_batch=4))
    k = model.config.num_experts_per_tok
    n_moe = sum(1 for i in range(model.config.num_hidden_layers) if model.config.is_moe_layer(i))
    assert run.expert_load[:n_moe].sum(1).tolist() == [6.0 * k] * n_moe  # 5 prompt + 1 decode token
    assert run.expert_load[n_moe:].sum() == 0  # the MTP module did not run


def test_pool_blocks_released_and_reused(model):
    pool = _pool(model, tokens=64, bs=8)
    a = pool.alloc(40)
    assert pool.used_blocks == 5 and pool.alloc(40) is None  # 8 usable blocks
    pool.release(a)
    assert pool.used_blocks == 0 and pool.alloc(64) is not None


def test_gemv_form_of_the_static_step(model):
    """The reductions the compiled step uses (gemv=True, here run eagerly) give the same logits
    for 1..4 tokens per row as the GEMM form, including verification steps of several tokens."""
    pool = _pool(model)
    run = ModelRunner(model, pool, static_moe=True)
    s = pool.alloc(32)
    p = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(3))
    run.forward(step_input([0], p, [s.table], 8))
    for S in (1, 2, 4):
        ids = torch.randint(0, 512, (2, S), generator=torch.Generator().manual_seed(S))
        s2 = pool.alloc(32)
        run.forward(step_input([0], p, [s2.table], 8))
        inp = step_input([10, 10], ids, [s.table, s2.table], 8)
        run.fused.gemv = False
        ref, _ = run.forward(inp)
        run.fused.gemv = True
        got, _ = run.forward(inp)
        run.fused.gemv = False
        torch.testing.assert_close(got, ref, atol=5e-5, rtol=1e-5)
        pool.release(s2)
