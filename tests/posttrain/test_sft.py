import torch

from dsv3.data.chat import IGNORE
from dsv3.posttrain.grpo import arithmetic_task
from dsv3.posttrain.sft import encode_records, make_batches, sft_lr_at

from .conftest import tiny_model


def test_batches_keep_one_sample_per_row_so_attention_never_crosses(tok):
    recs = arithmetic_task(12, seed=3, max_operand=20)
    samples = encode_records(tok, recs, seq_len=64)
    batches = make_batches(samples, 4, tok.pad_token_id, seed=0)
    assert sum(b[0].shape[0] for b in batches) == len(samples)
    m = tiny_model(tok).eval()
    ids, lab, am = batches[0]
    with torch.no_grad():
        full = m(ids, attention_mask=am).logits
        for r in range(ids.shape[0]):
            n = int(am[r].sum())
            alone = m(ids[r:r + 1, :n]).logits
            assert torch.allclose(full[r, :n], alone[0], atol=1e-4)  # padding/other rows change nothing
            assert (lab[r, n:] == IGNORE).all()


def test_lr_schedule_warmup_then_cosine():
    lrs = [sft_lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == 0.1 and abs(lrs[9] - 1.0) < 1e-9
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and abs(lrs[-1] - 0.1) < 1e-3


def test_sft_lowers_validation_loss_and_checkpoints(sft_result, tok):
    from dsv3 import DeepSeekV3

    res, logged = sft_result["res"], sft_result["logged"]
    assert res["steps"] == 70
    assert res["val/loss"] < 0.6 * res["val/loss_before"], res
    keys = {k for _, d in logged for k in d}
    assert {"sft/loss", "sft/lr", "val/loss", "sft/grad_norm"} <= keys
    m2 = DeepSeekV3.from_pretrained(sft_result["ckpt"])
    assert (sft_result["ckpt"] / "tokenizer.json").is_file()
    x = torch.randint(10, 400, (2, 7))
    with torch.no_grad():
        assert torch.allclose(m2(x).logits, sft_result["model"].eval()(x).logits, atol=1e-5)
