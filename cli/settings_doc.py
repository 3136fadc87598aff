"""docs/settings.md, made from the settings class, one table per settings group:

    .venv/bin/python -m r2m.cli.settings_doc > docs/settings.md
"""

from __future__ import annotations

from r2m.service.config import REPLICA_ONLY, SETTINGS_GROUPS, ServiceSettings

from .flags import SECRETS, flag_name, setting_default

__all__ = ["REGENERATE", "settings_doc"]

REGENERATE = ".venv/bin/python -m r2m.cli.settings_doc > docs/settings.md"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bare | would end the table cell


def _default(name: str) -> str:
    field = ServiceSettings.model_fields[name]
    if field.default_factory is not None:
        return "(computed)"
    return "(unset)" if field.default is None else f"`{setting_default(field)}`"


def _flag(name: str) -> str:
    if name in SECRETS:
        return "(environment only)"
    field = ServiceSettings.model_fields[name]
    flag = f"`{flag_name(name)}`" + (f" / `--no-{flag_name(name)[2:]}`" if field.annotation is bool else "")
    return flag + (" (serve)" if name in REPLICA_ONLY else "")


def settings_doc() -> str:
    """The markdown of docs/settings.md."""
    lines = [
        "# Settings",
        "",
        f"<!-- Made from service/config.py: edit the descriptions there, then run `{REGENERATE}`. -->",
        "",
        "Every setting is an environment variable (or a line of a `.env` file) and a flag of `r2m serve` and",
        "`r2m worker`; a flag wins over its variable. `r2m worker` reads every variable but has no flag for the",
        "settings marked (serve), which only a replica reads.",
    ]
    for title, group in SETTINGS_GROUPS.items():
        lines += ["", f"## {title}", "", group.description, ""]
        lines += ["| variable | flag | default | meaning |", "|---|---|---|---|"]
        for name in group.fields:
            description = _cell(ServiceSettings.model_fields[name].description or "")
            lines.append(f"| `R2M_{name.upper()}` | {_flag(name)} | {_default(name)} | {description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(settings_doc(), end="")
