"""An ensemble of five heads on the bundled model, with real processes: /score and /get_reward with uncertainties,
a worker that updates every member, two replicas that swap to the new version; bad settings fail at start."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from r2m.client import R2MClient
from r2m.service.launch import RedisServer, http_ready, r2m_command, start_server, start_worker, wait_until

pytestmark = pytest.mark.slow

POLICY_DIM = 64
ENV = {
    "R2M_POLICY_DIM": str(POLICY_DIM),
    "R2M_ATTN_DIM": "64",
    "R2M_ENSEMBLE": "5",
    "R2M_REDIS_PREFIX": "enstest",
    "R2M_HEAD_POLL_S": "0.2",
    "R2M_TRAIN_LR": "1e-3",
    "OMP_NUM_THREADS": "1",
}
PROMPT = "How do I boil an egg?"
RESPONSES = ["Simmer it nine minutes, then cool it in ice water.", "No idea.", "Eggs are food.", "Boil water."]


def test_five_heads_score_with_uncertainty_train_together_and_swap_on_two_replicas(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    env = {**ENV, "R2M_REDIS_URL": redis_server.url}
    a = start_server(tmp_path, env, name="replica-a", wait=False)
    b = start_server(tmp_path, env, name="replica-b", wait=False)
    worker = start_worker(tmp_path, env)
    rng = np.random.default_rng(0)
    hidden = [rng.standard_normal((6 + k, POLICY_DIM)).astype(np.float32) for k in range(4)]
    try:
        for s in (a, b):
            wait_until(s, http_ready(f"{s.url}/readyz"), 180)
        with R2MClient(a.url) as ca, R2MClient(b.url) as cb:
            before = ca.score(PROMPT, RESPONSES, hidden, step=30, total_steps=60, return_members=True)
            assert before.uncertainty is not None and all(u > 0 for u in before.uncertainty)
            assert before.members is not None and np.array(before.members).shape == (4, 5)
            got = httpx.post(f"{a.url}/get_reward", json={"query": [f"{PROMPT} {RESPONSES[0]}"]}).json()
            assert len(got["rewards"]) == 1 and len(got["extra_logs"]["uncertainty"]) == 1
            ca.post_preferences([{"prompt": PROMPT, "responses": RESPONSES, "hidden": hidden}], step=30,
                                total_steps=60, batch_id="ens-1")  # fmt: skip
            deadline = time.monotonic() + 60
            while not all(c.current_head()["served_version"] >= 1 for c in (ca, cb)):
                assert time.monotonic() < deadline, worker.tail()
                time.sleep(0.1)
            after_a = ca.score(PROMPT, RESPONSES, hidden, step=30, total_steps=60, return_members=True)
            after_b = cb.score(PROMPT, RESPONSES, hidden, step=30, total_steps=60, return_members=True)
            assert after_a.head_version == after_b.head_version == 1
            assert after_a.members == after_b.members, "both replicas serve the same five members"
            moved = np.abs(np.array(after_a.members) - np.array(before.members)).max(axis=0)
            assert (moved > 1e-6).all(), f"every member was updated: {moved}"
            assert ca.current_head()["guard"]["items"] == 4
    finally:
        for p in (a, b, worker):
            p.stop()


def test_an_ensemble_without_members_fails_at_start_naming_the_setting(tiny_llama_rm: Path) -> None:
    env = {**os.environ, "R2M_MODEL": str(tiny_llama_rm), "R2M_ENSEMBLE": "3", "R2M_POLICY_DIM": "8"}
    done = subprocess.run([*r2m_command("serve")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "R2M_ENSEMBLE=3" in done.stderr and "r2m fit-rm" in done.stderr, done.stderr


def test_local_feedback_finishes_an_ensembles_rewards_as_the_server_does(tmp_path: Path) -> None:
    """Rewards, uncertainties and members computed at the policy (one /embed, no /score) equal the server-side
    path's, with the aggregation /info names (uwo, lambda 0.5, not the default)."""
    import torch

    from r2m.trainer.local import LocalFeedbackClient

    env = {**ENV, "R2M_AGGREGATION": "uwo", "R2M_UWO_LAMBDA": "0.5", "R2M_EMBEDDED_WORKER": "false"}
    g = torch.Generator().manual_seed(3)
    hidden = [torch.randn(6 + k, POLICY_DIM, generator=g) for k in range(4)]
    with start_server(tmp_path, env) as server, R2MClient(server.url) as rm:
        served = rm.score(PROMPT, RESPONSES, hidden, step=30, total_steps=60, return_members=True, share_prefix=False)
        local = LocalFeedbackClient(rm)
        mine = local.score(PROMPT, RESPONSES, hidden, step=30, total_steps=60, return_members=True)
        routes = httpx.get(f"{server.url}/metrics").text
    assert local.server_finished == 0
    assert mine.head_version == served.head_version and mine.omega == served.omega < 1
    assert served.members is not None and mine.members is not None and served.uncertainty is not None
    np.testing.assert_allclose(mine.members, served.members, rtol=0, atol=1e-5)
    np.testing.assert_allclose(mine.rewards, served.rewards, rtol=0, atol=1e-5)
    np.testing.assert_allclose(mine.uncertainty or [], served.uncertainty, rtol=0, atol=1e-5)
    mean = np.array(served.members).mean(axis=1)
    assert np.abs(np.array(mine.rewards) - mean).max() > 1e-4, "uwo, not the mean: the aggregation was read"
    score_calls = [x for x in routes.splitlines() if x.startswith("r2m_http_requests_total{") and '"/score"' in x]
    assert sum(float(x.split()[-1]) for x in score_calls) == 1  # the server-side call only
