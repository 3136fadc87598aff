"""TRL's real `GRPOTrainer` (trl 1.16) trains a tiny Llama on CPU with `R2MRewardFunction` and
`R2MPreferenceCallback` against a real embedded r2m server: rewards come from the service with the policy's hidden
states, and the posted groups advance the head version."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from r2m.client import R2MClient
from r2m.service.launch import Process, start_server
from tests.conftest import CHAT_TEMPLATE, save_tiny_policy

trl = pytest.importorskip("trl", reason="trl is not installed: pip install -e '.[test]'")
datasets = pytest.importorskip("datasets")

from r2m.trainer.trl import R2MPreferenceCallback, R2MRewardFunction, prompt_text  # noqa: E402

HIDDEN = 32
MAX_HIDDEN_TOKENS = 64
PROMPTS = [
    "hello world what is the answer",
    "please help me cook",
    "how do you travel to the new world",
    "what is python code",
    "can you help with math",
    "say thanks to the people",
    "what time is it now",
    "give me a good question",
]
SERVER_ENV = {
    "R2M_POLICY_DIM": str(HIDDEN),
    "R2M_ATTN_DIM": "32",
    "R2M_TRAIN_LR": "1e-3",
    "R2M_TRAIN_STEPS": "3",
    "R2M_HEAD_POLL_S": "0.2",
    "R2M_MAX_HIDDEN_TOKENS": str(MAX_HIDDEN_TOKENS),
    "OMP_NUM_THREADS": "1",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    s = start_server(tmp_path_factory.mktemp("trl"), SERVER_ENV)
    yield s
    s.stop()


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[Process]:
    """A server of its own, at head 0 with nothing queued: for a test that compares rewards at one head version."""
    s = start_server(tmp_path, SERVER_ENV)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_policy(tmp_path_factory.mktemp("policy"), HIDDEN, CHAT_TEMPLATE)


class SpyClient(R2MClient):
    """An `R2MClient` that keeps every `score()` call's arguments and answer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[dict[str, Any]] = []

    def score(self, prompts, responses, hidden=None, *, step=0, total_steps=1):  # type: ignore[override]
        result = super().score(prompts, responses, hidden, step=step, total_steps=total_steps)
        self.calls.append(
            dict(prompts=prompts, responses=responses, hidden=hidden, step=step, total=total_steps, result=result)
        )
        return result


def test_grpo_trainer_scores_with_r2m_and_posts_preferences(server: Process, policy_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    client = SpyClient(server.url, max_retries=2, backoff=0.05)
    assert client.current_head()["version"] == 0
    reward = R2MRewardFunction(client)
    returned: list[list[float | None]] = []
    direct: dict[str, Any] = {}
    tok = AutoTokenizer.from_pretrained(policy_dir)
    initial = AutoModelForCausalLM.from_pretrained(policy_dir).eval()  # the policy's weights before any update

    def recording_reward(prompts, completions, completion_ids, **kwargs: Any) -> list[float | None]:
        out = reward(prompts, completions, completion_ids, **kwargs)
        returned.append(out)
        if not direct:
            # Step 0, before the first post: head 0 for sure. Recompute the first sample's hidden states here,
            # independently (templated prompt + completion ids, initial weights), and score them with a plain client.
            ids = tok.apply_chat_template(prompts[0], add_generation_prompt=True, tokenize=True, return_dict=True)
            seq = torch.tensor([list(ids["input_ids"]) + list(completion_ids[0])])
            # GRPOConfig defaults to bf16=True, and accelerate wraps the policy's forward in that autocast (on CPU too).
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                h = initial(input_ids=seq, output_hidden_states=True).hidden_states[-1][0]
            with R2MClient(server.url) as plain:
                res = plain.score(
                    prompts[0][-1]["content"],
                    [completions[0][0]["content"]],
                    hidden=[h],
                    step=0,
                    total_steps=kwargs["trainer_state"].max_steps,
                )
            direct.update(hidden=h, reward=res.rewards[0], head=res.head_version)
        return out

    recording_reward.__name__ = "r2m"
    callback = R2MPreferenceCallback(reward, run_id="trl-test")
    dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS])
    args = GRPOConfig(
        output_dir=str(policy_dir.parent / "out"),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_dir),
        reward_funcs=recording_reward,
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(policy_dir),
        callbacks=[callback],
    )
    trainer.train()

    # The reward function ran once per step and returned the service's floats, scored with hidden states.
    assert len(returned) == 2 and all(len(r) == 4 for r in returned)
    assert all(isinstance(x, float) for r in returned for x in r)
    assert [c["result"].rewards for c in client.calls] == returned
    assert [c["step"] for c in client.calls] == [0, 1] and {c["total"] for c in client.calls} == {2}
    first = client.calls[0]
    assert first["prompts"][0] in PROMPTS  # the conversation's user message, not a rendered template
    assert all(h.shape[1] == HIDDEN and h.shape[0] > 1 for h in first["hidden"])
    logged = [e["rewards/r2m/mean"] for e in trainer.state.log_history if "rewards/r2m/mean" in e]
    assert len(logged) == 2 and all(x == x for x in logged)

    # What was sent is the policy's own hidden states over the templated prompt + completion: a plain R2MClient
    # given the same text and tensors gets the same reward from the same head.
    assert first["result"].head_versions[0] == direct["head"] == 0
    torch.testing.assert_close(first["hidden"][0], direct["hidden"], atol=1e-5, rtol=1e-4)
    assert first["result"].rewards[0] == pytest.approx(direct["reward"], abs=1e-5)

    # The callback posted the steps' groups (K = num_generations, with refreshed hidden states) and the worker
    # trained on them: the head version advances.
    assert [p["step"] for p in callback.posted] == [1, 2]
    assert callback.posted[0]["batch_ids"] == ["trl-test-1"]
    for post in callback.posted:
        for g in post["groups"]:
            assert len(g["responses"]) == len(g["hidden"]) == len(g["rewards"]) == 2
            assert all(h.shape[1] == HIDDEN for h in g["hidden"])
    deadline = time.monotonic() + 30
    while client.current_head()["version"] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.current_head()["version"] > 0, server.output()[-3000:]
    client.close()


def test_item_the_service_rejects_gets_none(server: Process, policy_dir: Path, caplog) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    tok = AutoTokenizer.from_pretrained(policy_dir)
    too_long = " ".join(["hello"] * (MAX_HIDDEN_TOKENS + 10))  # more tokens than R2M_MAX_HIDDEN_TOKENS: a 422
    prompts = ["hello world", too_long, "please help me"]
    completion_ids = [tok("the answer is yes")["input_ids"]] * 3
    with R2MClient(server.url, max_retries=0) as client:
        reward = R2MRewardFunction(client, model=model, tokenizer=tok)
        with caplog.at_level("WARNING", logger="r2m.trainer.trl"):
            out = reward(prompts, ["the answer is yes"] * 3, completion_ids)
        assert out[1] is None and isinstance(out[0], float) and isinstance(out[2], float)
        assert "item 1" in caplog.text
        assert reward.pop_scored() == []  # an eval-mode model: nothing is kept for /preferences
    with R2MClient("http://127.0.0.1:9", max_retries=0) as down:  # nothing listens on port 9
        assert R2MRewardFunction(down)(["hi"], ["yes"]) == [None]


def test_reward_function_in_local_feedback_mode_gives_the_server_side_rewards(
    fresh_server: Process, policy_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r2m.trainer.local import LocalFeedbackClient

    model = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    tok = AutoTokenizer.from_pretrained(policy_dir)
    prompts = ["hello world", "please help me"]
    completions = ["the answer is yes", "no idea"]
    ids = [tok(c)["input_ids"] for c in completions]
    state = type("State", (), {"global_step": 3, "max_steps": 10})()  # w(t) < 1: the feedback counts
    with R2MClient(fresh_server.url) as client:
        here = R2MRewardFunction(client, model=model, tokenizer=tok, local_feedback=True)
        there = R2MRewardFunction(client, model=model, tokenizer=tok, local_feedback=False)
        local, remote = here(prompts, completions, ids, state), there(prompts, completions, ids, state)
        assert isinstance(here._scoring_client(), LocalFeedbackClient) and there._scoring_client() is client
        assert here._scoring_client().heads_fetched == 1  # the read-outs were computed here, with the served head
        assert local == pytest.approx(remote, abs=1e-4) and local != [None, None]


def test_prompt_text_takes_the_last_user_message() -> None:
    chat = [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "last"}]},
    ]
    assert prompt_text(chat) == "last" and prompt_text("plain") == "plain"


# --- R2MGRPOTrainer: TRL's own forwards, no extra one -------------------------------------------------------------


def _args(out: Path, config: Any = None, **kw: Any):  # noqa: ANN202
    from trl import GRPOConfig

    base = dict(output_dir=str(out), per_device_train_batch_size=4, num_generations=2, max_completion_length=8,
                max_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                seed=0, bf16=False, num_iterations=2)  # fmt: skip
    return (config or GRPOConfig)(**{**base, **kw})


def _dataset():  # noqa: ANN202
    return datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS])


class _Forwards:
    """Counts the policy's decoder forwards outside `generate` (sampling costs the same in both trainers)."""

    def __init__(self, trainer: Any) -> None:
        self.n, self.generating = 0, False
        model = trainer.accelerator.unwrap_model(trainer.model)
        core = model.get_base_model() if hasattr(model, "get_base_model") else model
        core.base_model.register_forward_pre_hook(self._count)
        real = core.generate

        def generate(*a: Any, **k: Any) -> Any:
            self.generating = True
            try:
                return real(*a, **k)
            finally:
                self.generating = False

        core.generate = generate

    def _count(self, *args: Any) -> None:
        self.n += 0 if self.generating else 1


def test_r2m_grpo_trainer_runs_no_more_policy_forwards_than_plain_trl(fresh_server: Process, policy_dir: Path) -> None:
    server = fresh_server
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from r2m.trainer.trl import R2MGRPOTrainer, policy_hidden

    def length_reward(prompts: Any, completions: Any, **kw: Any) -> list[float]:  # model-free
        return [float(len(c[0]["content"])) for c in completions]

    tok = AutoTokenizer.from_pretrained(policy_dir)
    plain = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(policy_dir), reward_funcs=length_reward,
                        args=_args(policy_dir.parent / "plain"), train_dataset=_dataset(),
                        processing_class=tok)  # fmt: skip
    plain_forwards = _Forwards(plain)
    plain.train()

    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    fresh = AutoModelForCausalLM.from_pretrained(policy_dir).eval()  # the same initial weights
    client = SpyClient(server.url)
    direct: dict[str, Any] = {}
    ids: list[tuple[list, list]] = []

    class Reward(R2MRewardFunction):
        def __call__(self, prompts: Any, completions: Any, completion_ids: Any = None, **kw: Any) -> Any:
            out = super().__call__(prompts, completions, completion_ids, **kw)
            if not direct:  # step 0, head 0: today's extra-forward path on the same samples, scored now
                seqs = [p + c for p, c in zip(*ids[0])]
                with torch.no_grad():  # a copy of the initial policy: the trainer's model runs only TRL's forwards
                    hidden = policy_hidden(fresh, seqs, tok.pad_token_id)
                with R2MClient(server.url) as other:
                    res = other.score([prompt_text(p) for p in prompts], [c[0]["content"] for c in completions],
                                      hidden=hidden, step=0, total_steps=2)  # fmt: skip
                direct.update(hidden=hidden, rewards=res.rewards, head=res.head_version)
            return out

    trainer = R2MGRPOTrainer(model=model, reward_funcs=Reward(client), args=_args(policy_dir.parent / "r2m"),
                             train_dataset=_dataset(), processing_class=tok, r2m_run_id="sub")  # fmt: skip
    real_generate = trainer._generate

    def recording(prompts: Any) -> Any:
        out = real_generate(prompts)
        ids.append((out[0], out[1]))
        return out

    trainer._generate = recording
    trainer.create_optimizer()
    snapshots: list[dict[str, torch.Tensor]] = []
    real_step = trainer.optimizer.step

    def step_with_snapshot(*a: Any, **k: Any) -> Any:
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return real_step(*a, **k)

    trainer.optimizer.step = step_with_snapshot
    forwards = _Forwards(trainer)
    trainer.train()
    counts = {"plain": plain_forwards.n, "r2m": forwards.n}
    # num_iterations = 2: TRL runs the old-log-prob forward the hidden states come from; no forward is added.
    assert counts["r2m"] == counts["plain"] > 0, counts

    # The rewards equal those of today's extra-forward path (a forward of its own) for the same samples and head.
    first = client.calls[0]
    assert direct["head"] == first["result"].head_version == 0
    for a, b in zip(first["hidden"], direct["hidden"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # left padding (TRL) vs right: RoPE is shift-invariant
    assert direct["rewards"] == pytest.approx(first["result"].rewards, abs=1e-4)
    prompt_ids, completion_ids = ids[0]
    seqs = [p + c for p, c in zip(prompt_ids, completion_ids)]

    # The posted hidden states are the last iteration's: the parameters after the generation batch's first
    # optimizer step (snapshot 1 was taken just before the second one), over the same rows.
    post = trainer.r2m_posted[0]
    assert post["step"] == 0 and post["batch_ids"] == ["sub-0"]
    last_iteration = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    last_iteration.load_state_dict(snapshots[1], strict=False)
    expected = policy_hidden(last_iteration, seqs, tok.pad_token_id)
    before = policy_hidden(fresh, seqs, tok.pad_token_id)
    posted = [h for g in post["groups"] for h in g["hidden"]]
    assert [r for g in post["groups"] for r in g["responses"]] == first["responses"]
    for got, want, old in zip(posted, expected, before):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(got, old, atol=1e-3), "not the sampling policy's"
    deadline = time.monotonic() + 30
    while client.current_head()["version"] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.current_head()["version"] > 0


def test_r2m_grpo_trainer_with_one_iteration_runs_at_most_one_forward_more(server: Process, policy_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from r2m.trainer.trl import R2MGRPOTrainer

    counts, losses = {}, {}
    for name in ("plain", "r2m"):
        model = AutoModelForCausalLM.from_pretrained(policy_dir)
        tok = AutoTokenizer.from_pretrained(policy_dir)
        args = _args(policy_dir.parent / f"one-{name}", num_iterations=1)
        if name == "plain":
            trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [1.0] * len(completions),
                                  args=args, train_dataset=_dataset(), processing_class=tok)  # fmt: skip
        else:
            trainer = R2MGRPOTrainer(model=model, reward_funcs=R2MRewardFunction(SpyClient(server.url)), args=args,
                                     train_dataset=_dataset(), processing_class=tok)  # fmt: skip
        forwards = _Forwards(trainer)
        trainer.train()
        counts[name] = forwards.n
        losses[name] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    steps = 2
    assert counts["r2m"] == counts["plain"] + steps, counts  # the one forward TRL skips, once per generation batch
    assert trainer.r2m_posted and all(len(g["hidden"]) == 2 for p in trainer.r2m_posted for g in p["groups"])


def test_r2m_grpo_trainer_with_lora_and_gradient_checkpointing(server: Process, policy_dir: Path) -> None:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r2m.trainer.trl import R2MGRPOTrainer

    client = SpyClient(server.url)
    trainer = R2MGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_dir),
        reward_funcs=R2MRewardFunction(client),
        # One iteration and a KL term: the subclass runs the one scoring forward itself, after TRL's reference
        # forward, which under PEFT is the policy with its adapter disabled (never what the rewards get).
        args=_args(policy_dir.parent / "lora", gradient_checkpointing=True, beta=0.04, num_iterations=1),
        train_dataset=_dataset(),
        processing_class=AutoTokenizer.from_pretrained(policy_dir),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    trainer.train()
    assert len(client.calls) == 2 and all(h.shape[1] == HIDDEN for h in client.calls[0]["hidden"])
    assert [p["step"] for p in trainer.r2m_posted] == [0, 1]
    for post in trainer.r2m_posted:
        assert all(h.shape[1] == HIDDEN and torch.isfinite(h).all() for g in post["groups"] for h in g["hidden"])


def test_r2m_rloo_trainer_runs_as_many_policy_forwards_as_plain_rloo(server: Process, policy_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    from r2m.trainer.trl import R2MRLOOTrainer

    def args(name: str) -> Any:
        return _args(policy_dir.parent / f"rloo-{name}", RLOOConfig)

    counts: dict[str, int] = {}
    client = SpyClient(server.url)
    for name in ("plain", "r2m"):
        model = AutoModelForCausalLM.from_pretrained(policy_dir)
        tok = AutoTokenizer.from_pretrained(policy_dir)
        if name == "plain":
            trainer = RLOOTrainer(model=model, reward_funcs=lambda completions, **kw: [1.0] * len(completions),
                                  args=args(name), train_dataset=_dataset(), processing_class=tok)  # fmt: skip
        else:
            trainer = R2MRLOOTrainer(model=model, reward_funcs=R2MRewardFunction(client), args=args(name),
                                     train_dataset=_dataset(), processing_class=tok)  # fmt: skip
        forwards = _Forwards(trainer)
        trainer.train()
        counts[name] = forwards.n
    # RLOO always runs the old-log-prob forward (its KL term is in the reward): scoring adds none, posting none.
    assert counts["r2m"] == counts["plain"] > 0, counts
    assert len(client.calls) == 1 and all(h.shape[1] == HIDDEN for h in client.calls[0]["hidden"])
    assert [p["step"] for p in trainer.r2m_posted] == [0]
    posted = [h for p in trainer.r2m_posted for g in p["groups"] for h in g["hidden"]]
    assert len(posted) == 4 and all(torch.isfinite(h).all() for h in posted)
    for got, scored in zip(posted, client.calls[0]["hidden"]):
        assert got.shape == scored.shape and not torch.allclose(got, scored, atol=1e-3)  # after one update
