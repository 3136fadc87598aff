"""`python -m bench --quick` as CI runs it: every section runs and reports finite figures (no timing assertions).

It starts real servers (r2m serve, redis-server, OpenRLHF's serve_rm), so it lives with the integration tests.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import require_redis

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("codec", "attention", "prefix", "serve", "overhead", "grebt", "swap", "peer", "ensemble", "local", "memory")
# What each section must report (dotted paths into its result), besides its table rows.
EXPECTED = {
    "prefix": ["rows.0.ratio", "rows.3.ratio"],
    "codec": ["bfloat16.binary_decode_GBps", "bfloat16.memcpy_GBps", "bfloat16.binary_vs_memcpy",
              "bfloat16.json_base64_decode_GBps", "float16.binary_vs_memcpy"],
    "attention": ["float32.attention_ms_per_item", "float32.attention_vs_read", "bfloat16.attention_vs_read",
                  "bfloat16.read_sum_ms_per_item", "textbook_vs_folded", "bf16_vs_fp32", "bf16_auto_vs_other"],
    "serve": ["c1.seq_per_s", "c1.ceiling_seq_per_s", "c1.vs_ceiling", "c1.p50_ms", "c1.p99_ms", "c8.vs_ceiling"],
    "overhead": ["c1.ratio", "c8.ratio", "c8.hidden_seq_per_s", "c8.vanilla_seq_per_s"],
    "grebt": ["uncached_s", "cached_s", "speedup"],
    "swap": ["p50_ms", "p99_ms", "throughput.ratio", "throughput.quiet_seq_per_s", "throughput.swapping_seq_per_s"],
    "peer": ["r2m_seq_per_s", "serve_rm_seq_per_s", "throughput_ratio", "reward_pearson", "same_tokens"],
    "local": ["bytes_t256.ratio", "bytes_t700.ratio", "bytes_t700.local.bytes_per_response", "c1.local_ratio",
              "c8.server_ratio", "c8.local_p50_ms", "split.c8.local_ratio"],
}  # fmt: skip
PEER_DEPS = ("openrlhf", "deepspeed", "peft", "pylatexenc", "aiohttp")


def _get(d: dict | list, dotted: str) -> object:
    for k in dotted.split("."):
        d = d[int(k)] if isinstance(d, list) else d[k]
    return d


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict, str, Path]]:
    require_redis()  # the swap section starts its own redis-server
    out = tmp_path_factory.mktemp("bench") / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    yield json.loads(out.read_text()), proc.stdout, out


@pytest.mark.slow
def test_quick_bench_reports_every_section_with_finite_figures(quick_run: tuple[dict, str, Path]) -> None:
    results, stdout, _ = quick_run
    assert results["quick"] is True
    assert list(results["sections"]) == list(SECTIONS)
    for name, res in results["sections"].items():
        if res["status"] == "unavailable":
            # Only these two may be missing, and only for the stated reason.
            if name == "prefix":
                assert not (ROOT / "bench" / "prefix_bytes.py").exists() or "prefix_bytes" in res["reason"]
                continue
            if name == "peer":
                assert any(importlib.util.find_spec(m) is None for m in PEER_DEPS), res["reason"]
                continue
        assert res["status"] == "ok", (name, res)
        for path in EXPECTED.get(name, []):
            value = _get(res, path)
            assert isinstance(value, (int, float)) and math.isfinite(value), (name, path, value)
        assert res["rows"], name
        for r in res.get("rows", []):
            assert isinstance(r["value"], (int, float)) and math.isfinite(r["value"]), (name, r)
            for key in ("baseline", "ratio"):
                assert r[key] is None or math.isfinite(r[key]), (name, r)
            assert (r["met"] is None) == (r["target"] is None), (name, r)
        assert name in stdout  # the closing table names every section
    # Both servers in the peer section read the same tokens and give the same rewards (bf16 both sides).
    peer = results["sections"]["peer"]
    if peer["status"] == "ok":
        assert peer["same_tokens"] == 1.0
        assert peer["reward_pearson"] > 0.98, peer
    # Local feedback: a 700-row bf16 response crosses as one rm_dim read-out plus its texts, e and reward.
    local = results["sections"]["local"]
    assert local["bytes_t700"]["ratio"] >= 100, local["bytes_t700"]
    assert local["bytes_t700"]["local"]["bytes_per_response"] < 16_000, local["bytes_t700"]


def test_report_writes_the_readme_block_and_plot_from_the_json(
    quick_run: tuple[dict, str, Path], tmp_path: Path
) -> None:
    from bench.report import END, START, update_readme

    results, _, _ = quick_run
    readme = tmp_path / "README.md"
    readme.write_text(f"# bench\n\nintro\n\n{START}\nold table\n{END}\n\nafter\n")
    update_readme(results, readme, "results.json")
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# bench\n\nintro") and text.rstrip().endswith("after")
    block = text.split(START, 1)[1].split(END, 1)[0]
    assert results["date"] in block and results["command"] in block
    assert "| codec | binary decode bfloat16, vs memcpy |" in block
    assert (tmp_path / "results" / "throughput.png").stat().st_size > 1000
