"""DeepSeekV3 split into pipeline stages (§3.2.1): sequential equality and a DualPipe step vs the model."""

import copy

import pytest
import torch
import torch.distributed as dist

from dsv3.model.config import ModelConfig
from dsv3.model.transformer import DeepSeekV3
from dsv3.parallel.partition import layer_split, pipeline_for, split_model
from tests.parallel.workers import grad_diff, spawn

S, MB = 8, 2


def _model(alpha=0.0):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", num_hidden_layers=4, aux_loss_alpha=alpha)
    return DeepSeekV3(cfg).train()


def _batch(n):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 512, (n, S), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    return ids, labels


def _run_stages(stages, ids, labels):
    h = ids
    for st in stages:
        h = st(h)
    return stages[-1].loss(h, ids, labels)


@pytest.mark.parametrize("alpha", [0.0, 1e-2])
def test_stages_equal_the_model(alpha):
    model = _model(alpha)
    ref = copy.deepcopy(model)
    ids, labels = _batch(MB)
    out = ref(ids, labels=labels)
    out.loss.backward()
    loss = _run_stages(split_model(model, 3), ids, labels)
    assert torch.equal(loss, out.loss - out.balance_loss) or torch.allclose(loss, out.loss - out.balance_loss)
    if alpha == 0:
        assert torch.equal(loss, out.loss)
    loss.backward()  # balance-loss grads flow in through _AddAux
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert grad_diff(p.grad, q.grad) < 1e-10, n


def test_layer_split():
    assert layer_split(61, 4) == [0, 16, 31, 46, 61]
    with pytest.raises(ValueError):
        layer_split(2, 3)


def _dualpipe_worker(rank, pp):
    nc = 2 * pp
    model = _model()
    ref = copy.deepcopy(model)
    ids, labels = _batch(nc * MB)
    ref_losses = []
    for i, l in zip(ids.chunk(nc), labels.chunk(nc)):
        loss = ref(i, labels=l).loss
        loss.backward()
        ref_losses.append(loss.detach())
    ref_losses = torch.stack(ref_losses)
    pipe, crit = pipeline_for(model, "dualpipe", MB, S)
    half = nc // 2 * MB
    first, last = rank == 0, rank == pp - 1
    inputs = (ids[:half],) if first else (ids[half:],) if last else ()
    lab = (ids[half:], labels[half:]) if first else (ids[:half], labels[:half]) if last else ()
    loss, _ = pipe.step(*inputs, num_chunks=nc, criterion=crit, labels=lab)
    if first:
        assert torch.equal(loss, ref_losses[nc // 2:]), (loss, ref_losses)
    if last:
        assert torch.equal(loss, ref_losses[: nc // 2])
    pipe.sync_grads()
    held = {id(p) for m in pipe.module for p in m.parameters()}
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if id(p) in held and q.grad is not None:
            assert grad_diff(p.grad, q.grad) < 1e-12, (n, grad_diff(p.grad, q.grad))
    dist.barrier()


def test_dualpipe_on_deepseek_v3_matches_the_model():
    spawn(_dualpipe_worker, 2)
