"""The value checks of hidden states (finite, bounded): fast on the common path, exact on the rare one."""

from __future__ import annotations

import pytest
import torch

from r2m.client.wire import WireTensor
from r2m.service.config import ServiceSettings
from r2m.service.errors import BadInput
from r2m.service.validation import check_hidden

SETTINGS = ServiceSettings(policy_dim=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_value_is_refused_with_its_row(dtype: torch.dtype, bad: float) -> None:
    h = torch.randn(6, 8).to(dtype)
    h[4, 3] = bad
    with pytest.raises(BadInput, match=r"items\[0\]\.policy_hidden: non-finite value .* in row 4"):
        check_hidden(WireTensor.from_array(h), "items[0].policy_hidden", SETTINGS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_finite_values_are_refused_with_row_column_and_value(dtype: torch.dtype) -> None:
    # Finite, but near the float32 limit: such states once trained a NaN head that every replica then served.
    h = torch.zeros(6, 8).to(dtype)
    h[2, 5] = -3e38
    assert bool(torch.isfinite(h).all())
    message = r"h: value -3(\.00\d)?e\+38 in row 2, column 5 exceeds R2M_MAX_HIDDEN_ABS=10000 "
    with pytest.raises(BadInput, match=message):
        check_hidden(WireTensor.from_array(h), "h", SETTINGS)


def test_the_bound_is_inclusive_and_a_setting() -> None:
    h = torch.full((3, 8), 1e4)
    assert torch.equal(check_hidden(WireTensor.from_array(h), "h", SETTINGS), h)
    with pytest.raises(BadInput, match="R2M_MAX_HIDDEN_ABS=100 "):
        check_hidden(WireTensor.from_array(h), "h", ServiceSettings(policy_dim=8, max_hidden_abs=100))


def test_zero_rows_after_a_prefix_are_accepted() -> None:
    h = torch.zeros(0, 8)
    assert check_hidden(WireTensor.from_array(h), "h", SETTINGS, min_rows=0).shape == (0, 8)
