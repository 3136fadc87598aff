"""Service configuration: `ServiceSettings` (every R2M_* setting, `settings`), its groups (`groups`) and its derived
defaults (`defaults`)."""

from .defaults import CACHE_SHARES, default_inflight_bytes
from .groups import REPLICA_ONLY, SETTINGS_GROUPS, SettingsGroup
from .settings import ServiceSettings, isolated_settings

__all__ = [
    "CACHE_SHARES",
    "REPLICA_ONLY",
    "SETTINGS_GROUPS",
    "ServiceSettings",
    "SettingsGroup",
    "default_inflight_bytes",
    "isolated_settings",
]
