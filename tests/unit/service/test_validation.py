"""The finiteness check of hidden states: fast on the common path, exact on the rare one."""

from __future__ import annotations

import pytest
import torch

from r2m.client._wire import WireTensor
from r2m.service.config import ServiceSettings
from r2m.service.errors import BadInput
from r2m.service.validation import hidden_to_torch

SETTINGS = ServiceSettings(policy_dim=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_value_is_refused_with_its_row(dtype: torch.dtype, bad: float) -> None:
    h = torch.randn(6, 8).to(dtype)
    h[4, 3] = bad
    with pytest.raises(BadInput, match=r"items\[0\]\.policy_hidden: non-finite value .* in row 4"):
        hidden_to_torch(WireTensor.from_array(h), "items[0].policy_hidden", SETTINGS)


def test_huge_finite_values_whose_sum_overflows_are_accepted() -> None:
    h = torch.full((6, 8), 3e38, dtype=torch.float32)  # finite, but their float32 sum is inf
    assert not torch.isfinite(h.sum())
    out = hidden_to_torch(WireTensor.from_array(h), "h", SETTINGS)
    assert torch.equal(out, h)
