"""Schemathesis (from PyPI) fuzzes the running server from its own OpenAPI schema: no 5xx, no response off-schema."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from .conftest import Process

CHECKS = "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance"


def test_schemathesis_finds_no_server_error_and_no_schema_violation(server: Process, tmp_path: Path) -> None:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    assert exe, "schemathesis is not installed: pip install -e '.[test]'"
    cmd = [
        exe,
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        CHECKS,
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        "100",
        "--workers",
        "2",
        "--seed",
        "1",
        "--suppress-health-check",
        "all",
        "--request-timeout",
        "30",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    # Warnings (e.g. "Missing test data: 404" for routes whose ids it cannot guess) are not failures.
    assert "No issues found" in out or ("failure" not in out.split("SUMMARY")[-1].lower()), out[-3000:]
    operations = len([m for ops in httpx.get(f"{server.url}/openapi.json").json()["paths"].values() for m in ops])
    assert f"Tested: {operations}" in out, "schemathesis must have exercised every operation, /score included"
