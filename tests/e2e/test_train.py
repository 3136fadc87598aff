"""End to end: the GRPO trainer on a tiny Llama policy against a real `r2m serve` (embedded worker), per reward mode.

Each mode runs two RL steps through a `GRPOTrainer` whose client is the real `R2MClient` wrapped by a recorder, and
whose optimizer step is wrapped to snapshot the parameters before every update, so the test can recompute exactly
which parameters produced the hidden states the service got. One test drives `r2m train` itself, resume included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from r2m.client import R2MClient
from r2m.service.launch import Process, free_port, start_server
from r2m.trainer import GRPOTrainer, TrainConfig, group_advantages, load_prompts, sequence_forward

from ..conftest import save_tiny_policy

pytestmark = pytest.mark.slow

HIDDEN = 32
STEPS, PROMPTS, K = 2, 2, 3
SERVER_ENV = {
    "R2M_POLICY_DIM": str(HIDDEN),
    "R2M_ATTN_DIM": "64",
    "R2M_TRAIN_LR": "1e-3",
    "R2M_TRAIN_STEPS": "5",
    "R2M_HEAD_POLL_S": "0.2",
    "OMP_NUM_THREADS": "1",
}


# --- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama and its word-level tokenizer, saved like a user's checkpoint and loaded by path."""
    return save_tiny_policy(tmp_path_factory.mktemp("policy"), HIDDEN)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    s = start_server(tmp_path_factory.mktemp("server"), SERVER_ENV)
    yield s
    s.stop()


class RecordingClient:
    """The real client, with every /score and /preferences call kept for inspection."""

    def __init__(self, client: R2MClient) -> None:
        self.client = client
        self.scores: list[dict[str, Any]] = []
        self.embeds: list[dict[str, Any]] = []
        self.posts: list[dict[str, Any]] = []

    def score(self, prompts, responses, hidden=None, *, step, total_steps, **local: Any):
        result = self.client.score(prompts, responses, hidden=hidden, step=step, total_steps=total_steps, **local)
        self.scores.append({"step": step, "responses": list(responses), "hidden": hidden, "result": result, **local})
        return result

    def embed(self, prompts, responses):
        result = self.client.embed(prompts, responses)
        self.embeds.append({"prompts": prompts, "responses": list(responses), "result": result})
        return result

    def __getattr__(self, name: str) -> Any:  # head_weights, info (the local-feedback wrapper's calls)
        return getattr(self.client, name)

    def post_preferences(self, groups=None, pairs=None, *, step, total_steps, batch_id=None):
        self.posts.append({"step": step, "groups": groups, "pairs": pairs, "batch_id": batch_id})
        return self.client.post_preferences(
            groups=groups, pairs=pairs, step=step, total_steps=total_steps, batch_id=batch_id
        )

    def current_head(self) -> dict[str, Any]:
        return self.client.current_head()


def run_mode(mode: str, policy_dir: Path, server: Process, out: Path, **overrides: Any) -> dict[str, Any]:
    """Two RL steps in `mode`; returns what the test needs to check (see the keys)."""
    config = TrainConfig(
        policy=str(policy_dir),
        server_url=server.url,
        steps=STEPS,
        prompts_per_step=PROMPTS,
        group_size=K,
        max_new_tokens=8,
        lr=1e-2,  # large, so one update moves the tiny policy's hidden states far beyond float tolerance
        reward_mode=mode,
        out_dir=str(out),
        progress=False,
        **overrides,
    )
    client = RecordingClient(R2MClient(server.url))
    version_before = client.current_head()["version"]
    trainer = GRPOTrainer(config, client)
    initial = {k: v.detach().clone() for k, v in trainer.policy.named_parameters()}

    snapshots: list[dict[str, torch.Tensor]] = []  # parameters before each optimizer step
    step_fn = trainer.optimizer.step

    def step_with_snapshot(*args: Any, **kwargs: Any) -> Any:
        snapshots.append({k: v.detach().clone() for k, v in trainer.policy.named_parameters()})
        return step_fn(*args, **kwargs)

    trainer.optimizer.step = step_with_snapshot  # type: ignore[method-assign]
    batches = []
    for t in range(STEPS):  # run()'s loop, with the step's rollout kept
        metrics = trainer.train_step(t)
        with open(out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        batches.append(trainer.batch)
    return {
        "config": config,
        "trainer": trainer,
        "client": client,
        "initial": initial,
        "snapshots": snapshots,  # STEPS * policy_epochs entries
        "batches": batches,
        "metrics": [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()],
        "version_before": version_before,
    }


def hidden_of(run: dict[str, Any], params: dict[str, torch.Tensor], t: int) -> list[torch.Tensor]:
    """A fresh forward pass of the policy with `params` over step t's sequences: the last-layer hidden states."""
    trainer, batch = run["trainer"], run["batches"][t]
    model = type(trainer.policy)(trainer.policy.config)
    missing, unexpected = model.load_state_dict(params, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    model.eval()
    with torch.no_grad():
        _, hidden = sequence_forward(
            model, batch.sequences, batch.attention_mask, batch.prompt_len, run["config"].temperature, hidden=True
        )
    return hidden


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.allclose(x, y, atol=1e-5) for x, y in zip(a, b))


def wait_version_above(client: RecordingClient, version: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = client.current_head()["version"]
        if now > version:
            return now
        time.sleep(0.2)
    raise AssertionError(f"head version stayed at {version} for {timeout} s")


def check_common(run: dict[str, Any]) -> None:
    """What every mode must do: rewards from the service logged for every step, and a policy that moved."""
    metrics, client = run["metrics"], run["client"]
    assert [m["step"] for m in metrics] == list(range(STEPS))
    for m, call in zip(metrics, client.scores):
        assert m["rewards"] == call["result"].rewards and len(m["rewards"]) == PROMPTS * K
        assert m["head_version"] == call["result"].head_version
        for key in ("rewards/mean", "rewards/std", "rewards/group_std_mean", "kl", "losses/policy", "omega"):
            assert isinstance(m[key], float), key
        for phase in ("rollout", "policy_forward", "score", "update", "r2m_post"):
            assert m[f"time/{phase}"] >= 0
    assert [c["step"] for c in client.scores] == list(range(STEPS))
    params = dict(run["trainer"].policy.named_parameters())
    assert any(not torch.equal(v, params[k]) for k, v in run["initial"].items()), "the policy did not change"


def sampling_hidden(run: dict[str, Any], t: int) -> list[torch.Tensor]:
    """Step t's rollout came from the parameters before its first update."""
    return hidden_of(run, run["snapshots"][t * run["config"].policy_epochs], t)


def refreshed_hidden(run: dict[str, Any], t: int) -> list[torch.Tensor]:
    """The last policy epoch's forward ran with the parameters before its (the step's last) optimizer step."""
    k = run["config"].policy_epochs
    return hidden_of(run, run["snapshots"][t * k + k - 1], t)


# --- the reward modes (the modes that post nothing run first: their head version must not move) ----------------


def test_vanilla_sends_no_hidden_states_and_posts_nothing(policy_dir: Path, server: Process, tmp_path: Path):
    run = run_mode("vanilla", policy_dir, server, tmp_path)
    check_common(run)
    assert all(call["hidden"] is None for call in run["client"].scores)
    assert run["client"].posts == []
    assert all(m["omega"] == 1.0 and m["r2m/groups_posted"] == 0 for m in run["metrics"])
    time.sleep(0.5)
    assert run["client"].current_head()["version"] == run["version_before"] == 0
    assert all(m["head_version"] == 0 for m in run["metrics"])


def test_r2m_frozen_sends_sampling_hidden_states_and_posts_nothing(policy_dir: Path, server: Process, tmp_path: Path):
    run = run_mode("r2m-frozen", policy_dir, server, tmp_path)
    check_common(run)
    for t, call in enumerate(run["client"].scores):
        assert same(call["hidden"], sampling_hidden(run, t))  # h from the policy that sampled the group
        assert call["result"].omega < 1.0 or t == 0
    assert run["client"].posts == []
    time.sleep(0.5)
    assert run["client"].current_head()["version"] == run["version_before"]

    # Padding handled: each sequence's hidden states equal a forward of its real tokens alone, unpadded.
    batch, model = run["batches"][0], type(run["trainer"].policy)(run["trainer"].policy.config).eval()
    model.load_state_dict(run["snapshots"][0], strict=False)
    with torch.no_grad():
        for b, sent in enumerate(run["client"].scores[0]["hidden"]):
            ids = batch.sequences[b][batch.attention_mask[b].bool()].unsqueeze(0)  # (1, T_b)
            alone = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]  # (T_b, D)
            assert sent.shape == (ids.shape[1], HIDDEN) and torch.allclose(sent, alone, atol=1e-4)


def test_local_feedback_sends_no_hidden_states_and_gets_the_server_side_rewards(
    policy_dir: Path, server: Process, tmp_path: Path
):
    run = run_mode("r2m-frozen", policy_dir, server, tmp_path, local_feedback="on")
    metrics, client, config = run["metrics"], run["client"], run["config"]
    assert [m["step"] for m in metrics] == list(range(STEPS))
    # One round trip per step: /embed (texts out, rm_dim embeddings back); the rewards are finished at the policy.
    assert client.scores == [] and len(client.embeds) == STEPS
    direct = R2MClient(server.url)
    for t, (m, call) in enumerate(zip(metrics, client.embeds)):
        assert call["responses"] == list(run["batches"][t].responses) and len(m["rewards"]) == PROMPTS * K
        server_side = direct.score(
            run["batches"][t].prompts, call["responses"], hidden=sampling_hidden(run, t),
            step=min(t, config.schedule_steps), total_steps=config.schedule_steps,
        )  # fmt: skip
        assert server_side.head_version == m["head_version"] == call["result"].head_version
        assert max(abs(a - b) for a, b in zip(server_side.rewards, m["rewards"])) < 1e-4
    feedback = run["trainer"].feedback_client
    assert feedback.heads_fetched == 1 and feedback.server_finished == 0
    params = dict(run["trainer"].policy.named_parameters())
    assert any(not torch.equal(v, params[k]) for k, v in run["initial"].items()), "the policy did not change"


def test_head_only_posts_groups_without_hidden_states(policy_dir: Path, server: Process, tmp_path: Path):
    run = run_mode("head-only", policy_dir, server, tmp_path)
    check_common(run)
    assert all(call["hidden"] is None for call in run["client"].scores)
    assert [p["step"] for p in run["client"].posts] == list(range(STEPS))
    for post, call in zip(run["client"].posts, run["client"].scores):
        assert len(post["groups"]) == PROMPTS
        for i, group in enumerate(post["groups"]):
            assert "hidden" not in group and len(group["responses"]) == K
            assert group["rewards"] == call["result"].rewards[i * K : (i + 1) * K]
    wait_version_above(run["client"], run["version_before"])


def test_r2m_noise_sends_and_posts_noise_shaped_like_hidden_states(policy_dir: Path, server: Process, tmp_path: Path):
    run = run_mode("r2m-noise", policy_dir, server, tmp_path)
    check_common(run)
    for t, (call, post) in enumerate(zip(run["client"].scores, run["client"].posts)):
        real = sampling_hidden(run, t)
        assert [h.shape for h in call["hidden"]] == [h.shape for h in real]
        assert not any(torch.allclose(n, h, atol=1e-3) for n, h in zip(call["hidden"], real))
        for n, h in zip(call["hidden"], real):  # same first two moments, per tensor
            assert abs(n.mean() - h.mean()) < 0.5 * h.std() and abs(n.std() / h.std() - 1) < 0.5
        posted = [h for g in post["groups"] for h in g["hidden"]]
        fresh = refreshed_hidden(run, t)
        assert [h.shape for h in posted] == [h.shape for h in fresh]
        assert not any(torch.allclose(n, h, atol=1e-3) for n, h in zip(posted, fresh))
    wait_version_above(run["client"], run["version_before"])


def test_r2m_posts_refreshed_hidden_states_and_the_head_advances(policy_dir: Path, server: Process, tmp_path: Path):
    run = run_mode("r2m", policy_dir, server, tmp_path)
    check_common(run)
    client = run["client"]
    assert [p["step"] for p in client.posts] == list(range(STEPS))
    # One batch id per step of this run: a resumed step that posts again is trained once by the service.
    ids = [p["batch_id"] for p in client.posts]
    assert len(set(ids)) == STEPS and all(i.endswith(f"-s{t:06d}") for t, i in enumerate(ids))
    for t, (call, post) in enumerate(zip(client.scores, client.posts)):
        sampled = sampling_hidden(run, t)
        assert same(call["hidden"], sampled)
        posted = [h for g in post["groups"] for h in g["hidden"]]
        assert [g["responses"] for g in post["groups"]] == [
            call["responses"][i * K : (i + 1) * K] for i in range(PROMPTS)
        ]
        # h' is exactly the last epoch's forward: the parameters after k-1 updates of this step ...
        assert same(posted, refreshed_hidden(run, t))
        # ... which is neither what sampled the group nor the policy after the step's final update.
        assert not any(torch.allclose(a, b, atol=1e-4) for a, b in zip(posted, sampled))
        after = run["snapshots"][t * 2 + 2] if t + 1 < STEPS else dict(run["trainer"].policy.named_parameters())
        assert not any(torch.allclose(a, b, atol=1e-4) for a, b in zip(posted, hidden_of(run, after, t)))
    version = wait_version_above(client, run["version_before"])
    assert version > run["version_before"]
    assert run["metrics"][-1]["omega"] < 1.0  # step 1 of 2: w(t) = max(0.5 cos(pi/2) + 0.5, Omega) < 1


def longer_judge(prompt: str, a: str, b: str) -> bool:
    """A judge for the tests: the longer response is the better one (ties: the first)."""
    return len(a) >= len(b)


@pytest.mark.parametrize("mode", ["r2m-judge", "head-judge"])
def test_judge_modes_post_judged_pairs_from_the_steps_own_groups(
    mode: str, policy_dir: Path, server: Process, tmp_path: Path
):
    run = run_mode(mode, policy_dir, server, tmp_path, judge=f"{__name__}:longer_judge", judge_pairs_per_step=2)
    check_common(run)
    client = run["client"]
    assert [p["step"] for p in client.posts] == list(range(STEPS))
    for t, (call, post) in enumerate(zip(client.scores, client.posts)):
        assert (call["hidden"] is not None) == (mode == "r2m-judge")
        assert post["groups"] is None and 1 <= len(post["pairs"]) <= 2
        rewards, responses = call["result"].rewards, call["responses"]
        fresh = refreshed_hidden(run, t) if mode == "r2m-judge" else None
        for pair in post["pairs"]:
            i, j = responses.index(pair["chosen"]), responses.index(pair["rejected"])
            assert i // K == j // K, "both responses of one group"
            assert len(pair["chosen"]) >= len(pair["rejected"]), "labelled by the judge, not by the RM"
            assert {rewards[i], rewards[j]} == {max(rewards[i // K * K : i // K * K + K]),
                                               min(rewards[i // K * K : i // K * K + K])}  # fmt: skip
            if fresh is None:
                assert "chosen_hidden" not in pair
            else:
                assert same([pair["chosen_hidden"], pair["rejected_hidden"]], [fresh[i], fresh[j]])
        assert run["metrics"][t]["judge/labels"] == len(post["pairs"])
    assert wait_version_above(client, run["version_before"]) > run["version_before"]


def test_r2m_pairs_posts_replayed_labelled_pairs_and_no_groups(policy_dir: Path, server: Process, tmp_path: Path):
    rows = [
        {"prompt": "how do i boil an egg", "chosen": "simmer it for nine minutes", "rejected": "no idea"},
        {"prompt": "name a color", "chosen": "blue", "rejected": "an egg is not a color at all"},
        {"prompt": "say hello", "chosen": "hello there", "rejected": "bye"},
    ]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = run_mode("r2m-pairs", policy_dir, server, tmp_path / "run", pairs=str(pairs_file), pairs_per_step=2)
    check_common(run)
    client, trainer, k = run["client"], run["trainer"], run["config"].policy_epochs
    tok = trainer.tokenizer
    assert [p["step"] for p in client.posts] == list(range(STEPS))
    for t, (call, post) in enumerate(zip(client.scores, client.posts)):
        assert same(call["hidden"], sampling_hidden(run, t))  # scored with hidden states, like r2m
        assert not post["groups"] and len(post["pairs"]) == 2  # labelled pairs instead of in-group pseudo-labels
        # The policy after the step's last update: the next step's first snapshot, or the final parameters.
        params = run["snapshots"][(t + 1) * k] if t + 1 < STEPS else dict(trainer.policy.named_parameters())
        model = type(trainer.policy)(trainer.policy.config).eval()
        model.load_state_dict(params, strict=False)
        for pair in post["pairs"]:
            assert {k_: pair[k_] for k_ in ("prompt", "chosen", "rejected")} in rows
            for key in ("chosen", "rejected"):
                # Teacher forcing, unpadded: prompt tokens + response tokens + the end token.
                ids = tok(pair["prompt"])["input_ids"] + tok(pair[key], add_special_tokens=False)["input_ids"]
                ids = torch.tensor([[*ids, tok.eos_token_id]])
                with torch.no_grad():
                    expected = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
                sent = pair[f"{key}_hidden"]
                assert sent.shape == (ids.shape[1], HIDDEN) and torch.allclose(sent, expected, atol=1e-4)
    assert all(m["r2m/pairs_posted"] == 2 and m["r2m/groups_posted"] == 0 for m in run["metrics"])
    assert wait_version_above(client, run["version_before"]) > run["version_before"]


# --- the command line, checkpoints and resume ---------------------------------------------------------------------


def test_r2m_train_cli_checkpoints_and_resumes(policy_dir: Path, server: Process, tmp_path: Path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "r2m.cli", "train", "--policy", str(policy_dir), "--server-url", server.url]
    args += ["--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "6", "--lr", "1e-2"]
    args += ["--out-dir", str(out), "--save-every", "1", "--no-progress", "--advantage", "rloo"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "HTTP Request" not in done.stderr, "httpx's line per request is off unless --log-level debug"
    # save_pretrained runs accelerate's unwrap_model, which imports deepspeed where it is installed (as here)
    assert "accelerator" not in done.stdout + done.stderr, "deepspeed was imported"
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-000001", "step-000002"]
    last = out / "checkpoints" / "step-000002"
    assert TrainConfig.load(last / "config.json").advantage == "rloo"
    state = torch.load(last / "optimizer.pt", weights_only=True)
    assert state["state"], "optimizer state was not saved"
    first = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in first] == [0, 1]

    # A crash after step 1's checkpoint: resume redoes step 1 only, from that checkpoint, and samples the same.
    import shutil

    shutil.rmtree(last)
    done = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    again = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in again] == [0, 1]
    assert again[0] == first[0]
    assert again[1]["response_length/mean"] == first[1]["response_length/mean"]  # the same rollout, reseeded
    assert (out / "checkpoints" / "step-000002" / "policy" / "model.safetensors").is_file()

    # Resuming with other settings is refused, naming them; so is a fresh run over an earlier run's checkpoints.
    bad = subprocess.run([*args, "--resume", "--group-size", "3"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "group_size" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    bad = subprocess.run(args, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "--resume" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


# --- `r2m train` checks before it spends: one line, no traceback, nothing written --------------------------------


def refused(policy: str | Path, url: str, out: Path, *flags: str) -> str:
    """`r2m train` with `policy` against `url`: asserts it failed in one line on stderr and wrote nothing; returns
    the line."""
    args = [sys.executable, "-m", "r2m.cli", "train", "--policy", str(policy), "--server-url", url, *flags]
    args += ["--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--out-dir", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr[-3000:]
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    return lines[0]


def test_r2m_train_refuses_a_missing_policy(tmp_path: Path):
    line = refused(tmp_path / "no-such-policy", f"http://127.0.0.1:{free_port()}", tmp_path / "run")
    assert line.startswith("r2m train: policy=") and "no such folder" in line, line


def test_r2m_train_refuses_without_a_service(policy_dir: Path, tmp_path: Path):
    url = f"http://127.0.0.1:{free_port()}"
    line = refused(policy_dir, url, tmp_path / "run")
    assert f"no r2m service at {url}" in line and f"R2M_POLICY_DIM={HIDDEN} r2m serve" in line, line


def test_r2m_train_refuses_a_policy_of_another_width(server: Process, tmp_path: Path):
    wide = save_tiny_policy(tmp_path / "wide", 2 * HIDDEN)
    line = refused(wide, server.url, tmp_path / "run")
    assert f"R2M_POLICY_DIM={HIDDEN}" in line and f"hidden size {2 * HIDDEN}" in line, line


def test_r2m_train_refuses_a_service_judge_the_service_lacks(policy_dir: Path, server: Process, tmp_path: Path):
    line = refused(policy_dir, server.url, tmp_path / "run", "--reward-mode", "head-judge", "--judge", "service")
    assert "has no judge" in line and "R2M_JUDGE" in line, line


# --- the pieces, without a server ---------------------------------------------------------------------------------


def test_advantages():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    grpo = group_advantages(r, 3, "grpo")
    assert torch.allclose(grpo[:3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-3)
    assert torch.equal(grpo[3:], torch.zeros(3))  # a tied group: no signal, no NaN
    rloo = group_advantages(r, 3, "rloo")
    assert torch.allclose(rloo[:3], torch.tensor([1 - 2.5, 2 - 2.0, 3 - 1.5]))


@pytest.mark.parametrize(
    ("override", "name"),
    [
        ({"group_size": 1}, "group_size"),
        ({"steps": 0}, "steps"),
        ({"temperature": 0.0}, "temperature"),
        ({"advantage": "ppo"}, "advantage"),
        ({"reward_mode": "magic"}, "reward_mode"),
        ({"prompts": "no/such/file.jsonl"}, "prompts"),
        ({"device": "tpu"}, "device"),
        ({"reward_mode": "r2m-pairs"}, "pairs"),
        ({"reward_mode": "r2m-pairs", "pairs": "no/such/pairs.jsonl"}, "pairs"),
    ],
)
def test_config_rejects_bad_values_naming_the_setting(override: dict[str, Any], name: str):
    with pytest.raises(ValueError, match=name):
        TrainConfig(policy="p", **override)


def test_config_derives_and_round_trips(tmp_path: Path):
    c = TrainConfig(policy="p", prompts_per_step=3, group_size=4, reward_mode="head-only", api_key="secret")
    assert c.batch_size == 12 and not c.sends_hidden and c.posts_preferences
    c.save(tmp_path / "config.json")
    assert "secret" not in (tmp_path / "config.json").read_text()
    loaded = TrainConfig.load(tmp_path / "config.json")
    assert loaded.differences(c) == [] and loaded.batch_size == 12
    assert len(load_prompts("default")) == 64


class FakeClient:
    """Rewards = response length in characters: no server needed to check the update's arithmetic."""

    def score(self, prompts, responses, hidden=None, *, step, total_steps):
        from r2m.client import ScoreResult

        return ScoreResult([float(len(r)) for r in responses], 0, [0] * len(responses), 1.0)

    def post_preferences(self, groups=None, pairs=None, *, step, total_steps, batch_id=None):
        from r2m.client import PreferencesResult

        return PreferencesResult(["fake"], len(groups), 0)


def test_micro_batches_accumulate_to_the_same_gradient(policy_dir: Path, tmp_path: Path):
    grads = []
    for micro in (0, 2):
        config = TrainConfig(
            policy=str(policy_dir),
            steps=1,
            prompts_per_step=2,
            group_size=3,
            max_new_tokens=6,
            policy_epochs=1,
            max_grad_norm=0.0,
            out_dir=str(tmp_path / f"mb{micro}"),
            micro_batch_size=micro,
            progress=False,
        )
        trainer = GRPOTrainer(config, FakeClient())
        seen: dict[str, torch.Tensor] = {}
        step_fn = trainer.optimizer.step

        def keep_grads(*args: Any, _trainer=trainer, _seen=seen, _step=step_fn, **kwargs: Any) -> Any:
            _seen.update({k: v.grad.clone() for k, v in _trainer.policy.named_parameters() if v.grad is not None})
            return _step(*args, **kwargs)

        trainer.optimizer.step = keep_grads  # type: ignore[method-assign]
        trainer.train_step(0)
        grads.append(seen)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-4, atol=1e-7), name


def test_public_surface():
    import r2m.trainer

    assert sorted(r2m.trainer.__all__) == sorted(
        [
            "ADVANTAGES",
            "REWARD_MODES",
            "GRPOTrainer",
            "Rollout",
            "TrainConfig",
            "group_advantages",
            "load_prompts",
            "sequence_forward",
            "train",
        ]
    )
