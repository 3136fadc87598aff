"""The R2M head, the omega schedule and the GREBT loss (r2m.service.model)."""

from __future__ import annotations

import math

import pytest
import torch

from r2m.service.model import FeedbackAttention, HeadConfig, R2MHead, bt_loss, grebt_loss, omega


@pytest.mark.parametrize(
    ("step", "total", "floor", "expected"),
    [
        (0, 100, 0.6, 1.0),
        (50, 100, 0.6, 0.6),  # 0.5 * cos(pi / 2) + 0.5 = 0.5, under the floor
        (50, 100, 0.3, 0.5),
        (100, 100, 0.6, 0.6),
        (100, 100, 0.0, 0.0),
        (25, 100, 0.0, 0.5 * math.cos(math.pi / 4) + 0.5),
        (10, 100, 0.7, 0.5 * math.cos(math.pi * 0.1) + 0.5),
    ],
)
def test_omega_schedule(step: int, total: int, floor: float, expected: float) -> None:
    assert omega(step, total, floor) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("step", "total", "floor"), [(-1, 10, 0.6), (11, 10, 0.6), (0, 0, 0.6), (0, 10, 1.5)])
def test_omega_rejects_out_of_range(step: int, total: int, floor: float) -> None:
    with pytest.raises(ValueError):
        omega(step, total, floor)


def _batch(B: int, T: int, P: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, P, generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    return h, mask


@pytest.mark.parametrize("n_heads", [1, 4])
def test_folded_attention_equals_textbook_form(n_heads: int) -> None:
    torch.manual_seed(0)
    attn = FeedbackAttention(rm_dim=16, policy_dim=24, attn_dim=32, n_heads=n_heads).double()
    e = torch.randn(3, 16, dtype=torch.float64)
    h, mask = _batch(3, 7, 24, [7, 3, 1])
    h = h.double()
    folded, textbook = attn(e, h, mask), attn.forward_reference(e, h, mask)
    assert folded.shape == (3, 16)
    torch.testing.assert_close(folded, textbook, rtol=1e-10, atol=1e-10)


def test_masked_padding_does_not_change_the_aggregate() -> None:
    torch.manual_seed(0)
    attn = FeedbackAttention(rm_dim=8, policy_dim=12, attn_dim=16, n_heads=2)
    e = torch.randn(2, 8)
    h, mask = _batch(2, 9, 12, [4, 9])
    alone = attn(e[:1], h[:1, :4], mask[:1, :4])
    h_garbage = h.clone()
    h_garbage[0, 4:] = 1e4  # padding rows full of huge values must be ignored
    padded = attn(e, h_garbage, mask)
    torch.testing.assert_close(padded[:1], alone, rtol=1e-6, atol=1e-6)
    unmasked = attn(e, h_garbage, torch.ones_like(mask))
    assert not torch.allclose(unmasked[:1], alone, atol=1e-3), "the mask must be what hides the padding"


def _head(score_bias: bool = True) -> R2MHead:
    torch.manual_seed(0)
    return R2MHead(HeadConfig(rm_dim=8, policy_dim=12, attn_dim=16, n_heads=2, score_bias=score_bias))


def test_w_one_gives_the_plain_score_exactly() -> None:
    head = _head()
    e = torch.randn(3, 8)
    h, mask = _batch(3, 5, 12, [5, 2, 3])
    plain = head.score(e).squeeze(-1)
    with_feedback = head(e, torch.ones(3), h, mask)
    assert torch.equal(with_feedback, plain)
    assert torch.equal(head(e, torch.ones(3)), plain)


def test_feedback_changes_only_items_with_w_below_one() -> None:
    head = _head()
    e = torch.randn(3, 8)
    h, mask = _batch(2, 5, 12, [5, 2])
    w = torch.tensor([0.6, 1.0, 0.7])
    sel = torch.tensor([True, False, True])
    out = head(e, w, h, mask, with_feedback=sel)
    plain = head.score(e).squeeze(-1)
    assert out[1] == plain[1]
    assert not torch.isclose(out[0], plain[0]) and not torch.isclose(out[2], plain[2])
    a = head.attention(e[[0]], h[[0]], mask[[0]])
    expected0 = head.score(0.6 * e[[0]] + 0.4 * a).squeeze()
    torch.testing.assert_close(out[0], expected0)


def _entropy_by_hand(rewards: list[float]) -> float:
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    z = [(r - mean) / (std + 1e-6) for r in rewards]
    total = sum(math.exp(v) for v in z)
    p = [math.exp(v) / total for v in z]
    return -sum(pi * math.log(pi) for pi in p)


def test_grebt_matches_a_hand_computed_example() -> None:
    groups = torch.tensor([[1.0, 2.0, 4.0], [0.5, -1.0, 0.0]], dtype=torch.float64)
    loss = grebt_loss(groups, alpha=0.3)
    bt = (math.log1p(math.exp(-3.0)) + math.log1p(math.exp(-1.5))) / 2  # best - worst: 4 - 1 and 0.5 - (-1)
    gre = (_entropy_by_hand([1.0, 2.0, 4.0]) + _entropy_by_hand([0.5, -1.0, 0.0])) / 2
    assert loss.bt.item() == pytest.approx(bt, rel=1e-9)
    assert loss.gre.item() == pytest.approx(gre, rel=1e-6)
    assert loss.total.item() == pytest.approx(0.7 * bt + 0.3 * gre, rel=1e-6)


def test_grebt_ranks_by_the_given_rewards_when_asked() -> None:
    r = torch.tensor([[1.0, 2.0, 4.0]])
    by_given = grebt_loss(r, alpha=0.0, rank_by=torch.tensor([[5.0, 0.0, 1.0]]))  # best = item 0, worst = item 1
    assert by_given.bt.item() == pytest.approx(math.log1p(math.exp(1.0)))


def test_grebt_gradient_widens_the_best_worst_margin_and_sharpens_the_group() -> None:
    r = torch.tensor([[0.1, 0.2, 0.15, 0.12]], requires_grad=True)
    before = grebt_loss(r.detach())
    loss = grebt_loss(r)
    loss.total.backward()
    stepped = (r - 0.1 * r.grad).detach()
    after = grebt_loss(stepped)
    assert stepped[0, 1] - stepped[0, 0] > r[0, 1] - r[0, 0]
    assert after.total < before.total


def test_grebt_accepts_ragged_groups_and_rejects_bad_ones() -> None:
    loss = grebt_loss([torch.tensor([1.0, 0.0]), torch.tensor([3.0, 1.0, 2.0, 0.0])])
    assert loss.total.ndim == 0
    with pytest.raises(ValueError):
        grebt_loss([torch.tensor([1.0])])
    with pytest.raises(ValueError):
        grebt_loss(torch.zeros(2, 3), alpha=1.5)


def test_bt_loss() -> None:
    assert bt_loss(torch.tensor([2.0]), torch.tensor([0.0])).item() == pytest.approx(math.log1p(math.exp(-2.0)))
