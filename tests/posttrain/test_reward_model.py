import torch

from dsv3.posttrain.config import RewardConfig
from dsv3.posttrain.grpo import arithmetic_task
from dsv3.posttrain.rewards import (Combined, MathReward, ModelReward, RewardModel, bradley_terry_loss,
                                    pairwise_accuracy, preference_pairs, train_reward_model)

from .conftest import tiny_model


def test_bradley_terry_loss_values():
    assert torch.isclose(bradley_terry_loss(torch.zeros(3), torch.zeros(3)), torch.log(torch.tensor(2.0)))
    assert bradley_terry_loss(torch.tensor([5.0]), torch.tensor([-5.0])) < 1e-4
    assert bradley_terry_loss(torch.tensor([-5.0]), torch.tensor([5.0])) > 9


def test_score_ignores_right_padding(tok):
    rm = RewardModel(tiny_model(tok))
    torch.nn.init.normal_(rm.head.weight)
    ids = torch.randint(10, 500, (1, 9))
    a = rm(ids, torch.ones_like(ids))
    padded = torch.cat([ids, torch.full((1, 4), tok.pad_token_id)], 1)
    b = rm(padded, torch.cat([torch.ones_like(ids), torch.zeros(1, 4, dtype=torch.long)], 1))
    assert torch.allclose(a, b, atol=1e-5)


def test_reward_model_learns_preferences_and_round_trips(tok, tmp_path):
    pairs = preference_pairs(arithmetic_task(160, seed=0, max_operand=4), seed=0)
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    rm = RewardModel(tiny_model(tok, seed=1))
    res = train_reward_model(rm, tok, pairs, RewardConfig(rm_epochs=2, rm_lr=1e-3, rm_val_fraction=0.2))
    assert res["val/pair_acc_before"] == 0.5  # zero-initialised head: all ties
    assert res["val/pair_acc"] >= 0.7, res  # held-out pairs
    rm.save(tmp_path / "rm")
    rm2 = RewardModel.load(tmp_path / "rm")
    val = pairs[: res["n_val"]]
    assert abs(pairwise_accuracy(rm2, tok, val) - pairwise_accuracy(rm, tok, val)) < 1e-6
    # one interface: the model reward combines with rule rewards
    probs = arithmetic_task(4, seed=9)
    resp = [p["response"] for p in probs]
    mr = ModelReward(rm2, tok)(probs, resp)
    both = Combined([(1.0, MathReward()), (0.5, ModelReward(rm2, tok))])(probs, resp)
    assert all(abs(b - (1.0 + 0.5 * m)) < 1e-5 for b, m in zip(both, mr))
