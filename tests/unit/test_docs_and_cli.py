"""The README and `--help` stay true: every setting is documented, every command answers --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from r2m.cli import main
from r2m.cli.flags import flag_name, setting_default
from r2m.service.config import REPLICA_ONLY, SETTINGS_GROUPS, ServiceSettings

ROOT = Path(__file__).resolve().parents[2]


def _setting_rows(text: str) -> set[str]:
    return {line.split("|")[1].strip().strip("`") for line in text.splitlines() if line.startswith("| `R2M_")}


def test_settings_doc_lists_every_setting() -> None:
    rows = _setting_rows((ROOT / "docs" / "settings.md").read_text())
    assert rows == {f"R2M_{name.upper()}" for name in ServiceSettings.model_fields}


def test_settings_doc_is_made_from_the_settings_class() -> None:
    from r2m.cli.settings_doc import REGENERATE, settings_doc

    stale = (ROOT / "docs" / "settings.md").read_text() != settings_doc()
    assert not stale, f"docs/settings.md is stale: run `{REGENERATE}`"


def test_readme_shows_a_few_real_settings_and_links_them_all() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = [line.split("|")[1:3] for line in readme.splitlines() if line.startswith("| `R2M_")]
    assert 5 <= len(rows) <= 12
    for var, default in rows:
        field = ServiceSettings.model_fields[var.strip().strip("`").removeprefix("R2M_").lower()]
        assert default.strip() == ("(unset)" if field.default is None else f"`{setting_default(field)}`"), var
    assert "docs/settings.md" in readme


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


def test_help_loads_no_model_library() -> None:
    """`r2m --help` answers in well under a second: building every command's flags imports no torch or
    transformers (seconds of imports); the commands import them when they run."""
    code = "import sys\nfrom r2m.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
    code += "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "[]"


def test_serve_help_shows_every_setting_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for name in ServiceSettings.model_fields:
        if name != "api_key":
            assert "--" + name.replace("_", "-") in out, name
    assert "R2M_API_KEY" in out


def test_help_shows_the_settings_by_group_and_booleans_both_ways(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    titles = [out.index(f"\n{title}:\n") for title in SETTINGS_GROUPS]
    assert titles == sorted(titles)
    assert out.index("--policy-dim") < out.index("\nlimits:\n") < out.index("--max-request-bytes")
    assert "--guard, --no-guard" in out and "--embedded-worker, --no-embedded-worker" in out


def test_worker_help_shows_only_what_a_worker_reads(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["worker", "--help"])
    out = capsys.readouterr().out
    for name in ServiceSettings.model_fields:
        if name != "api_key":
            assert (flag_name(name) + " " in out or flag_name(name) + "," in out) == (name not in REPLICA_ONLY), name
    assert "--dead-letters" in out and "\nguard:\n" in out


def test_flags_and_variables_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from r2m.cli.main import _settings_from, build_parser

    monkeypatch.setenv("R2M_MAX_REQUEST_BYTES", "4096")  # a replica's setting, in the env file a worker shares
    monkeypatch.setenv("R2M_GUARD", "false")
    worker = _settings_from(build_parser().parse_args(["worker", "--guard", "--cache-mb", "13"]))
    assert (worker.max_request_bytes, worker.guard, worker.rte_cache_mb) == (4096, True, 8)
    serve = _settings_from(build_parser().parse_args(["serve", "--no-embedded-worker", "--redis-prefix", "x"]))
    assert (serve.embedded_worker, serve.guard, serve.redis_prefix) == (False, False, "x")


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
