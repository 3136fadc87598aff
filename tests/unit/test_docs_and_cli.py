"""The README and `--help` stay true: every setting is documented, every command answers --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from r2m.cli import main
from r2m.service.config import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]


def test_readme_settings_table_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = {line.split("|")[1].strip().strip("`") for line in readme.splitlines() if line.startswith("| `R2M_")}
    assert rows == {f"R2M_{name.upper()}" for name in ServiceSettings.model_fields}


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["serve", "--help"],
        ["worker", "--help"],
        ["fit-rm", "--help"],
        ["train", "--help"],
        ["demo", "--help"],
    ],
)
def test_every_command_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: r2m" in out


def test_serve_help_shows_every_setting_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for name in ServiceSettings.model_fields:
        if name != "api_key":
            assert "--" + name.replace("_", "-") in out, name
    assert "R2M_API_KEY" in out


def test_bad_setting_on_the_command_line_names_the_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "r2m.cli", "serve", "--policy-dim", "zero"], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "--policy-dim" in result.stderr and "integer" in result.stderr


def test_worker_without_redis_says_what_to_set() -> None:
    env = {k: v for k, v in __import__("os").environ.items() if k != "R2M_REDIS_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "r2m.cli", "worker"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode != 0
    assert "R2M_REDIS_URL" in result.stderr
