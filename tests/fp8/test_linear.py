"""FP8Linear (Fprop/Dgrad/Wgrad in FP8) and convert_to_fp8."""

import pytest
import torch
import torch.nn as nn

from dsv3.fp8.linear import DEFAULT_SKIP, FP8Linear, convert_to_fp8
from dsv3.fp8.quant import FP8_DTYPE


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _pair(k, n, bias=True, seed=0):
    torch.manual_seed(seed)
    ref = nn.Linear(k, n, bias=bias)
    f = FP8Linear(k, n, bias=bias)
    f.load_state_dict(ref.state_dict())
    return ref, f


@pytest.mark.parametrize("k,n", [(256, 384), (200, 72)])
def test_forward_backward_close_to_fp32(k, n):
    ref, f = _pair(k, n)
    x = torch.randn(3, 50, k)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ref(x1), f(x2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    for got, want in [(y2, y1), (x2.grad, x1.grad), (f.weight.grad, ref.weight.grad)]:
        r = _rel(got, want)
        assert 1e-3 < r < 0.08, r  # E4M3 error (~2-5%), and truly quantized (not exact)
    assert _rel(f.bias.grad, ref.bias.grad) < 1e-5  # bias gradient is an fp32 sum


def test_dtypes_master_weights_and_cached_activations_are_fp8():
    ref, f = _pair(256, 128)
    x = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = f(x)
    assert y.dtype == torch.bfloat16
    # what backward keeps of x is its FP8 copy + 1x128 tile scales, never x itself
    assert (FP8_DTYPE, (64, 256)) in saved
    assert (torch.float32, (64, 2)) in saved
    assert all(dt == FP8_DTYPE for dt, shp in saved if shp == (64, 256))
    assert not any(dt in (torch.bfloat16, torch.float32) and shp == (64, 256) for dt, shp in saved)
    y.float().pow(2).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert f.weight.dtype == torch.float32 and f.weight.grad.dtype == torch.float32


def test_no_input_grad_and_empty_batch():
    ref, f = _pair(128, 128, bias=False)
    x = torch.randn(10, 128)  # no grad wanted
    f(x).sum().backward()
    assert f.weight.grad is not None and f.weight.grad.abs().sum() > 0
    f.zero_grad()
    xe = torch.zeros(0, 128, requires_grad=True)  # an expert that received no token
    y = f(xe)
    assert y.shape == (0, 128)
    y.sum().backward()
    assert torch.all(f.weight.grad == 0) and xe.grad.shape == (0, 128)


def test_fp8_disabled_falls_back_to_linear():
    ref, f = _pair(130, 60)
    f.fp8_enabled = False
    x = torch.randn(5, 130)
    torch.testing.assert_close(f(x), ref(x))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(64, 64)
        self.norm = nn.LayerNorm(64)
        self.mlp = nn.Module()
        self.mlp.gate = nn.Linear(64, 8, bias=False)  # a router: must stay high precision
        self.mlp.gate_proj = nn.Linear(64, 128)  # an expert projection: FP8
        self.mlp.down_proj = nn.Linear(128, 64)

    def forward(self, x):
        h = self.norm(x + self.q_proj(x))
        r = torch.softmax(self.mlp.gate(h), -1)[..., :1]
        return h + r * self.mlp.down_proj(torch.relu(self.mlp.gate_proj(h)))


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(100, 64)
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.lm_head = nn.Linear(64, 100, bias=False)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for b in self.layers:
            h = b(h)
        return self.lm_head(h)


def test_convert_to_fp8_in_place_with_default_skips():
    torch.manual_seed(0)
    m = _Toy()
    params_before = {n: p for n, p in m.named_parameters()}
    keys_before = list(m.state_dict())
    ids = torch.randint(0, 100, (2, 16))
    y_ref = m(ids).detach()
    done = convert_to_fp8(m)
    assert sorted(done) == sorted(f"layers.{i}.{n}" for i in range(2)
                                  for n in ("q_proj", "mlp.gate_proj", "mlp.down_proj"))
    assert type(m.lm_head) is nn.Linear and type(m.layers[0].mlp.gate) is nn.Linear
    assert type(m.layers[1].mlp.gate_proj) is FP8Linear
    # same parameter objects under the same names: nothing copied, optimizers stay valid
    assert list(m.state_dict()) == keys_before
    assert all(p is params_before[n] for n, p in m.named_parameters())
    y = m(ids)
    assert 1e-4 < _rel(y.detach(), y_ref) < 0.05
    y.sum().backward()
    assert m.layers[0].q_proj.weight.grad is not None
    # custom skip patterns; skip=() converts everything
    m2 = _Toy()
    assert "lm_head" in convert_to_fp8(m2, skip=())
    m3 = _Toy()
    assert not any(n.startswith("layers.1") for n in convert_to_fp8(m3, skip=DEFAULT_SKIP + ("layers.1",)))


def test_short_training_fp8_tracks_bf16():
    """A small next-token MLP trained 50 steps: FP8 loss within a few percent of BF16."""
    torch.manual_seed(0)
    vocab, d, steps = 64, 128, 50
    trans = torch.softmax(torch.randn(vocab, vocab) * 3, -1)  # a learnable Markov chain
    g = torch.Generator().manual_seed(1)
    seq = [0]
    for _ in range(steps * 64 + 1):
        seq.append(torch.multinomial(trans[seq[-1]], 1, generator=g).item())
    seq = torch.tensor(seq)

    def make():
        torch.manual_seed(2)
        return nn.Sequential(nn.Embedding(vocab, d), nn.Linear(d, 256), nn.GELU(), nn.Linear(256, d),
                             nn.LayerNorm(d), nn.Linear(d, vocab))

    losses = {}
    for mode in ("bf16", "fp8"):
        m = make()
        if mode == "fp8":
            assert convert_to_fp8(m, skip=("2", "4", "5")) == ["1", "3"]
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        hist = []
        for s in range(steps):
            x, y = seq[s * 64:(s + 1) * 64], seq[s * 64 + 1:(s + 1) * 64 + 1]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(m(x).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            hist.append(loss.item())
        losses[mode] = hist
    first, last = losses["bf16"][0], sum(losses["bf16"][-10:]) / 10
    assert last < 0.8 * first  # it learned something
    last8 = sum(losses["fp8"][-10:]) / 10
    assert abs(last8 - last) / last < 0.03, (last8, last)


def test_zero_bubble_split_defers_fp8_wgrad_bitwise():
    """Under WeightGradStore.enabled (a pipeline's B op) an FP8Linear returns Dgrad (and the bias grad) at
    once and queues its FP8 Wgrad; after the W op the weight grads equal the plain FP8 backward's bitwise,
    two micro-batches accumulated. split_weight_grads keeps the FP8 layers (it must not swap their forward
    for the fp32 split Linear), also when the model was split before its conversion to FP8."""
    import copy

    from dsv3.parallel.pipeline import WeightGradStore, split_weight_grads

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(200, 136), nn.GELU(), nn.Linear(136, 72, bias=False))
    late = split_weight_grads(copy.deepcopy(ref))  # split first, converted after
    assert convert_to_fp8(ref, skip=()) == ["0", "2"] and convert_to_fp8(late, skip=()) == ["0", "2"]
    mod = split_weight_grads(copy.deepcopy(ref))
    assert "forward" not in vars(mod[0]) and "forward" not in vars(late[0])  # FP8Linear.forward, not a swap
    xs = [torch.randn(2, 37, 200, dtype=torch.bfloat16) for _ in range(2)]
    gs = [torch.randn(2, 37, 72, dtype=torch.bfloat16) for _ in range(2)]
    ref_dx = []
    for x, g in zip(xs, gs):  # the plain FP8 backward, accumulating
        x = x.clone().requires_grad_()
        ref(x).backward(g)
        ref_dx.append(x.grad)
    for m in (mod, late):
        WeightGradStore.clear()
        for i, (x, g) in enumerate(zip(xs, gs)):  # two B ops (one chunk each), then their two W ops
            x = x.clone().requires_grad_()
            WeightGradStore.enabled = True
            try:
                m(x).backward(g)
            finally:
                WeightGradStore.enabled = False
            WeightGradStore.flush()
            assert torch.equal(x.grad, ref_dx[i])  # Dgrad in B, bitwise
            assert m[0].weight.grad is None and m[2].weight.grad is None  # Wgrad deferred
            assert m[0].bias.grad is not None  # the bias grad (an fp32 sum of dy) comes in B
        WeightGradStore.pop()
        assert m[0].weight.grad is not None and len(WeightGradStore.queue) == 1
        WeightGradStore.pop()
        assert not WeightGradStore.queue
        for (n, p), q in zip(m.named_parameters(), ref.parameters()):
            assert p.grad.dtype == torch.float32 and torch.equal(p.grad, q.grad), n
