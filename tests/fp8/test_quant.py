"""Quantization: exact recipe (scale = amax/448 per 1x128 tile / 128x128 block), bounds, clamp."""

import pytest
import torch

from dsv3.fp8.quant import (AMAX_EPS, FP8_DTYPE, FP8_MAX, act_dequant, act_quant, cdiv,
                            weight_dequant, weight_quant)


def _rand_tiles(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    # very different magnitudes per row so that per-tile scaling matters
    return x * torch.logspace(-3, 3, shape[-2]).unsqueeze(-1)


def _fp8_bound(x, scale_elem):
    # E4M3: 3 mantissa bits -> relative half-ulp 2^-4 for normals; subnormal half-quantum 2^-10
    return x.abs() * 2.0 ** -4 + scale_elem * 2.0 ** -10


@pytest.mark.parametrize("k", [128, 256, 300, 64])
def test_act_quant_roundtrip_and_recipe(k):
    x = _rand_tiles((2, 7, k))
    q, s = act_quant(x)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (2, 7, cdiv(k, 128))
    # the scale is the tile's amax / 448, tile by tile (partial last tile: its own elements)
    for j in range(s.shape[-1]):
        tile = x[..., j * 128:(j + 1) * 128]
        assert torch.equal(s[..., j], tile.abs().amax(-1).clamp(min=AMAX_EPS) / FP8_MAX)
        # the element carrying the amax maps to ±448 exactly
        assert torch.equal(q[..., j * 128:(j + 1) * 128].float().abs().amax(-1),
                           torch.full_like(s[..., j], FP8_MAX))
    xd = act_dequant(q, s)
    s_el = s.repeat_interleave(128, -1)[..., :k]
    err = (xd - x).abs()
    assert torch.all(err <= _fp8_bound(x, s_el) * (1 + 1e-6))
    rel = (err.norm() / x.norm()).item()
    assert 1e-3 < rel < 0.05  # quantized for real, and only by E4M3 rounding


def test_act_quant_is_round_to_nearest():
    x = _rand_tiles((4, 256), seed=3)
    q, s = act_quant(x)
    y = x / s.repeat_interleave(128, -1)
    # every representable neighbour is at least as far from y as the chosen value
    grid = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    grid = grid[torch.isfinite(grid)].unique()
    best = grid[(y.unsqueeze(-1) - grid).abs().argmin(-1)]
    assert torch.equal((q.float() - y).abs(), (best - y).abs())


def test_zero_tile_gets_finite_scale_and_zero_output():
    x = torch.randn(3, 384)
    x[1, 128:256] = 0.0
    q, s = act_quant(x)
    assert torch.isfinite(s).all()
    assert s[1, 1].item() == pytest.approx(AMAX_EPS / FP8_MAX)
    assert torch.all(q[1, 128:256].float() == 0)
    xd = act_dequant(q, s)
    assert torch.all(xd[1, 128:256] == 0) and torch.isfinite(xd).all()
    w = torch.zeros(130, 10)
    wq, ws = weight_quant(w)
    assert torch.isfinite(ws).all() and torch.all(wq.float() == 0)
    assert torch.all(weight_dequant(wq, ws) == 0)


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (64, 72)])
def test_weight_quant_blocks(shape):
    n, k = shape
    w = torch.randn(n, k) * 0.02
    w[:128, :128] *= 100.0  # one loud block must not spoil the others
    q, s = weight_quant(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert s.shape == (cdiv(n, 128), cdiv(k, 128))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert s[i, j] == blk.abs().amax() / FP8_MAX
    wd = weight_dequant(q, s)
    s_el = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
    assert torch.all((wd - w).abs() <= _fp8_bound(w, s_el) * (1 + 1e-6))
    if n > 128 and k > 128:  # quiet blocks keep their own relative precision
        quiet = (slice(128, None), slice(128, None))
        assert ((wd - w)[quiet].norm() / w[quiet].norm()) < 0.05


def test_weight_dequant_released_checkpoint_layout():
    # DeepSeek's FP8 checkpoints: weight (fp8) + weight_scale_inv [ceil(out/128), ceil(in/128)]
    g = torch.Generator().manual_seed(1)
    n, k = 300, 200
    w8 = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(FP8_DTYPE)
    sinv = torch.rand(3, 2, generator=g) + 0.5
    w = weight_dequant(w8, sinv, dtype=torch.bfloat16)
    assert w.dtype == torch.bfloat16 and w.shape == (n, k)
    ref = w8.float() * sinv[torch.arange(n) // 128][:, torch.arange(k) // 128]
    assert torch.equal(w, ref.to(torch.bfloat16))
    with pytest.raises(ValueError):
        weight_dequant(w8, torch.ones(2, 2))


def test_saturation_never_overflows_to_nan():
    # values whose x/scale rounds a hair above 448 must saturate, not become NaN
    x = torch.tensor([[1.0 + 2 ** -20, 1.0, -1.0 - 2 ** -20] + [0.3] * 125]) * 3.0000001
    q, s = act_quant(x)
    assert torch.isfinite(q.float()).all() and q.float().abs().max() == FP8_MAX


def test_act_dequant_shape_check():
    q, s = act_quant(torch.randn(4, 256))
    with pytest.raises(ValueError):
        act_dequant(q, s[:, :1])
