"""The settings class: its groups cover it in order, the cache sizes come from one budget, the old names still work."""

from __future__ import annotations

import logging

import pytest

from r2m.service.config import CACHE_SHARES, REPLICA_ONLY, SETTINGS_GROUPS, ServiceSettings, isolated_settings
from r2m.service.config import defaults as config_defaults


def test_every_setting_is_in_one_group_in_the_class_order() -> None:
    grouped = [name for group in SETTINGS_GROUPS.values() for name in group.fields]
    assert grouped == list(ServiceSettings.model_fields)
    assert REPLICA_ONLY.issubset(ServiceSettings.model_fields)


def test_the_cache_sizes_are_shares_of_one_budget() -> None:
    s = isolated_settings()
    assert (s.cache_mb, s.rte_cache_mb, s.guard_canary_mb, s.embed_cache_mb) == (832, 512, 256, 64)
    s = isolated_settings(cache_mb=1300)
    assert (s.rte_cache_mb, s.guard_canary_mb, s.embed_cache_mb) == (800, 400, 100)
    assert set(CACHE_SHARES) == {"rte_cache_mb", "guard_canary_mb", "embed_cache_mb"}


def test_an_old_cache_variable_still_wins_and_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config_defaults.deprecated.cache_clear()
    monkeypatch.setenv("R2M_RTE_CACHE_MB", "100")
    monkeypatch.setenv("R2M_CACHE_MB", "1300")
    with caplog.at_level(logging.WARNING, logger="r2m.service.config"):
        first, second = ServiceSettings(), ServiceSettings()
    assert first.rte_cache_mb == second.rte_cache_mb == 100
    assert (first.guard_canary_mb, first.embed_cache_mb) == (400, 100)  # the others still follow R2M_CACHE_MB
    (record,) = caplog.records
    assert "R2M_RTE_CACHE_MB is deprecated" in record.getMessage() and "R2M_CACHE_MB" in record.getMessage()


def test_the_derived_sizes_log_nothing(caplog: pytest.LogCaptureFixture) -> None:
    config_defaults.deprecated.cache_clear()
    with caplog.at_level(logging.WARNING, logger="r2m.service.config"):
        isolated_settings(cache_mb=64)
    assert not caplog.records


def test_a_bad_budget_names_the_setting() -> None:
    with pytest.raises(ValueError, match="cache_mb"):
        isolated_settings(cache_mb=-1)
