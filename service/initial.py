"""Version 0 of a head: seeded random feedback attention, scaled against the backbone's RTEs, and the reward model's
own score layer, so that the untrained head scores exactly as the plain reward model at w = 1."""

from __future__ import annotations

import torch

from .backbone import Backbone
from .model import FeedbackAttention, HeadConfig, R2MHead

__all__ = ["ATTN_INITS", "initial_head", "readout_gain"]


# How the read-out starts (R2M_ATTN_INIT). The paper gives no initialisation and its untrained module behaves like
# noise ("w/o Train" scores below vanilla RL); what matters is the read-out's size against the RTE's, which differs by
# two orders of magnitude between an L2-normalised encoder (norm 1) and a decoder RM's last-token state (hundreds).
ATTN_INITS = ("scaled", "plain", "zero")


def readout_gain(head: R2MHead, n: int = 64, seed: int = 0) -> float:
    """Mean norm of the read-out `W_o W_v x` for pooled hidden states x of unit RMS per dimension (what a policy's
    final RMSNorm/LayerNorm emits with a gain near 1): the read-out's size per unit of hidden-state RMS. Any form of
    the head (trainable or serving)."""
    attn = head.attention
    x = torch.randn(n, attn.policy_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        pooled = x[:, None, :].expand(n, attn.n_heads, attn.policy_dim).to(head.score.weight.dtype)
        return float(attn.project(pooled).norm(dim=1).mean())


def initial_head(
    backbone: Backbone, config: HeadConfig, seed: int = 0, init: str = "scaled", init_scale: float = 0.1
) -> R2MHead:
    """Version 0: seeded random feedback attention (same on every replica) and the RM's own score layer.

    `init`: "scaled" (W_o scaled so that for unit-RMS hidden states the read-out's norm is `init_scale` times the
    RTE's typical norm, measured on the backbone), "plain" (PyTorch's default init, as the paper presumably used),
    "zero" (W_o = 0: the untrained reward is w * phi(e), the plain RM's order and GRPO advantages exactly).
    """
    if init not in ATTN_INITS:
        raise ValueError(f"unknown attention init {init!r}; choose one of {', '.join(ATTN_INITS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = R2MHead(config)
    attention = head.attention
    assert isinstance(attention, FeedbackAttention)  # the trainable form: version 0's master
    with torch.no_grad():
        if init == "zero":
            attention.w_o.weight.zero_()
        elif init == "scaled":
            # Two significant digits: replicas on other devices or dtypes measure the same factor.
            factor = float(f"{init_scale * backbone.reference_rte_norm() / readout_gain(head):.2g}")
            attention.w_o.weight.mul_(factor)
        n = config.members
        if n > 1 and (backbone.members_weight is None or backbone.members_weight.shape[0] < n):
            have = 0 if backbone.members_weight is None else backbone.members_weight.shape[0]
            raise ValueError(f"an ensemble of {n} needs {n} fitted members; this reward model has {have}")
        weight = backbone.score_weight if n == 1 else backbone.members_weight[:n]  # type: ignore[index]
        head.score.weight.copy_(weight)
        if head.score.bias is not None:
            bias = backbone.score_bias if n == 1 else backbone.members_bias
            if bias is not None:
                head.score.bias.copy_(bias.reshape(-1)[:n])
            else:
                head.score.bias.zero_()
    return head
