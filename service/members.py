"""An ensemble's fitted score layers on one frozen backbone (R2M_ENSEMBLE): where their file is, how many it holds
(from its header), writing it (`r2m fit-rm --ensemble`) and loading it onto a backbone."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .backbone import ASSETS, DEFAULT_MODEL, Backbone

__all__ = ["MEMBERS_FILE", "attach_members", "count_members", "members_path", "save_members"]


MEMBERS_FILE = "r2m_members.safetensors"


def members_path(model: str, explicit: str | None = None) -> Path | None:
    """Where the ensemble members of `model` are: the explicit file (or folder), else the model folder's own
    (`r2m_members.safetensors`, the bundled default's included); None for a hub id without an explicit path."""
    if explicit:
        path = Path(explicit)
        return path / MEMBERS_FILE if path.is_dir() else path
    folder = ASSETS / "default_rm" if model == DEFAULT_MODEL else Path(model)
    return folder / MEMBERS_FILE if folder.is_dir() else None


def count_members(path: Path) -> int:
    """Rows of a members file, read from its header only (no weights loaded); 0 when it is not there."""
    if not path.is_file():
        return 0
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return int(f.get_slice("weight").get_shape()[0])


def save_members(path: Path, weight: torch.Tensor, bias: torch.Tensor | None, meta: dict) -> None:
    tensors = {"weight": weight.float().contiguous()}
    if bias is not None:
        tensors["bias"] = bias.float().reshape(-1).contiguous()
    save_file(tensors, str(path), metadata={"r2m": json.dumps({"format": "r2m-members/1", **meta})})


def attach_members(backbone: Backbone, path: Path) -> None:
    """Load a members file onto `backbone`; ValueError when it does not fit (another width, or its member 0 is
    not this RM's own score layer)."""
    tensors = load_file(str(path))
    weight, bias = tensors["weight"].float(), tensors.get("bias")
    if weight.ndim != 2 or weight.shape[1] != backbone.rm_dim:
        raise ValueError(f"{path}: members of width {list(weight.shape)}, the reward model's is {backbone.rm_dim}")
    if not torch.allclose(weight[0].to(backbone.score_weight.device), backbone.score_weight[0], atol=1e-6):
        raise ValueError(f"{path}: its member 0 is not this reward model's score layer: fitted for another RM?")
    backbone.members_weight = weight
    backbone.members_bias = bias.float() if bias is not None else None
