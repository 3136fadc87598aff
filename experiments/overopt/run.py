"""One arm on one seed: GRPO against the proxy RM served by r2m's own app, with gold and proxy measured as it goes.

The reward service is r2m's FastAPI app (`create_app`, embedded mode: in-process queue, head store and GREBT worker)
on a uvicorn server in a thread on a free loopback port; the trainer talks to it through the real `R2MClient`.
After each post the run waits until the replica serves the version that trained on it, so step t+1 is always
scored by the head updated on step t (the paper's loop) and a run is a function of its seed.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from r2m.client import R2MClient
from r2m.data import read_jsonl
from r2m.service.api.app import create_app
from r2m.service.config import isolated_settings
from r2m.service.engine import build_engine
from r2m.service.launch import free_port
from r2m.trainer import GRPOTrainer, Rollout, TrainConfig, sequence_forward
from r2m.trainer.grpo import FEEDBACK, noise_like
from r2m.trainer.judge import choose_pairs, label_pairs

from .task import DEFAULT_GOLD, EVAL_PROMPTS, PROMPTS, GoldFn, GoldJudge, gold_terms, load_gold

__all__ = ["ArmSpec", "RunSettings", "run_and_report", "run_arm"]

EVAL_SEED = 31337  # the evaluation samples' seed: the same for every arm, seed and step
PROMPT_SOURCE = "task.TRAIN_PROMPTS: 32 prompts (4 phrasings x 8 topics); evaluation on task.EVAL_PROMPTS (16)"


@dataclass(frozen=True)
class RunSettings:
    """Everything an arm's run depends on besides its arm and seed (fixed on the dev seeds; see the README)."""

    steps: int = 40
    # T of the omega schedule: w(t) reaches its floor Omega at t ~ 0.44 T = step 9, while vanilla climbs towards
    # its best and before it collapses: the feedback has its full weight while the over-optimization happens.
    omega_steps: int = 20
    prompts_per_step: int = 16
    group_size: int = 4
    max_new_tokens: int = 32
    lr: float = 1.5e-4
    kl_coef: float = 0.01
    eval_every: int = 4
    eval_samples_per_prompt: int = 16  # x 16 evaluation prompts = 256 samples per evaluation
    prompt_source: str = PROMPT_SOURCE
    gold: str = DEFAULT_GOLD  # module:function; the judge and every evaluation derive from it
    # The R2M service (R2M_* settings): the paper's Omega and alpha; the learning rates and steps are each tuned
    # arm's choice on the dev seeds (arms.GRIDS, chosen.json).
    omega_floor: float = 0.6
    grebt_alpha: float = 0.3
    service_lr: float = 1e-5
    service_phi_lr: float | None = None
    service_train_steps: int = 1
    attn_dim: int = 64
    attn_init: str = "scaled"
    judge_pairs: int = 0  # per step: the service's judge, or the refit arm's own
    judge_temperature: float = 1.0  # the proxy's own label noise (ARTEFACTS["proxy_label_temperature"])
    refit: bool = False
    refit_l2: float = 1e-5
    refit_weight: float = 1.0  # a judge label counts this many of the proxy's own pairs in the refit


@dataclass(frozen=True)
class ArmSpec:
    arm: str  # arms.ARMS key
    mode: str  # r2m train's --reward-mode
    seed: int
    policy: str
    proxy: str
    prompts: str  # the RL prompts file (the task's training split)
    train_pairs: str  # the proxy's own labelled pairs (the refit arms refit on them)
    heldout_pairs: str
    out_dir: str
    policy_dim: int
    settings: RunSettings


# --- the service ---------------------------------------------------------------------------------------------------


@contextmanager
def serve_proxy(
    proxy_dir: str, policy_dim: int, s: RunSettings, seed: int, judge: Any = None
) -> Iterator[tuple[str, Any]]:
    """r2m's app (embedded mode) serving the proxy RM on a free loopback port; yields (url, the engine). Every
    setting is given here: no R2M_* variable or .env file reaches it. With `judge`, the service's worker labels
    `s.judge_pairs` pairs of every posted batch with it, instead of the in-group pseudo-labels: the path a user
    with a judge runs."""
    import uvicorn

    judged = {"judge_pairs": s.judge_pairs, "judge_with_pseudo_labels": False} if judge is not None else {}
    settings = isolated_settings(
        model=proxy_dir,
        seed=seed,  # the feedback attention's init varies with the RL seed, paired across arms
        attn_init=s.attn_init,
        train_lr_score=s.service_phi_lr,
        **judged,
        device="cpu",
        dtype="float32",
        policy_dim=policy_dim,
        attn_dim=s.attn_dim,
        omega_floor=s.omega_floor,
        grebt_alpha=s.grebt_alpha,
        train_lr=s.service_lr,
        train_steps=s.service_train_steps,
        redis_url=None,
        api_key=None,
        head_poll_s=0.05,
        optimizer_save_s=0.0,  # a refused update reloads the served head and the optimizer state of that very version
        worker_max_attempts=1,  # a refused batch is a dead letter at once (SyncedClient moves on)
        batch_wait_ms=0.0,
        log_level="warning",
    )
    model = build_engine(settings)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, model, **({"judge": judge} if judge is not None else {})),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, name="overopt-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the embedded r2m server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", model
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class SyncedClient:
    """The real client; `post_preferences` returns once the replica serves the head trained on that batch, or the
    head guard refused it (the service's default guard is on in every run; a refused batch is given up at once,
    R2M_WORKER_MAX_ATTEMPTS=1, and the served head stays)."""

    def __init__(self, client: R2MClient, timeout_s: float = 120.0) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self.refused: list[dict[str, Any]] = []

    def score(self, prompts, responses, hidden=None, *, step, total_steps):  # noqa: ANN001, ANN201
        return self.client.score(prompts, responses, hidden=hidden, step=step, total_steps=total_steps)

    def post_preferences(self, groups=None, pairs=None, *, step, total_steps, batch_id=None):  # noqa: ANN001, ANN201
        result = self.client.post_preferences(groups, pairs, step=step, total_steps=total_steps, batch_id=batch_id)
        deadline = time.monotonic() + self.timeout_s
        while True:
            head = self.client.current_head()
            if set(result.batch_ids) <= set(head["batch_ids"]) and head["served_version"] == head["version"]:
                return result
            refusal = head.get("last_refusal") or {}
            if set(result.batch_ids) & set(refusal.get("batch_ids", [])):
                self.refused.append({"step": step, "rl_step": _rl_step(batch_id, step), "reason": refusal["reason"],
                                     "guard": refusal.get("guard")})  # fmt: skip
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch {result.batch_ids} not served after {self.timeout_s:.0f} s: {head}")
            time.sleep(0.005)

    def current_head(self) -> dict[str, Any]:
        return self.client.current_head()

    def close(self) -> None:
        self.client.close()


def _rl_step(batch_id: str | None, step: int) -> int:
    """The RL step a post was made at: the trainer's batch ids end in `-s<step>`; the `step` it sends the service is
    the schedule's, min(t, omega_steps)."""
    tail = (batch_id or "").rpartition("-s")[2]
    return int(tail) if tail.isdigit() else step


# --- measurements --------------------------------------------------------------------------------------------------


def frozen_proxy(model: Any, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """The proxy RM's own reward (its fitted linear head on the frozen encoder), untouched by any R2M update."""
    backbone = model.backbone
    rte = model.embed([backbone.encode(p, r) for p, r in zip(prompts, responses)])
    return backbone.plain_reward(rte).tolist()


def _cosine_mean(x: torch.Tensor, y: torch.Tensor | None = None) -> float | None:
    """Mean cosine similarity of the rows of x with those of y (with each other, the diagonal left out, when y is
    None); None with too few rows."""
    x = torch.nn.functional.normalize(x, dim=1)
    if y is None:
        if len(x) < 2:
            return None
        sims = x @ x.T
        return float((sims.sum() - sims.diagonal().sum()) / (len(x) * (len(x) - 1)))
    if not len(x) or not len(y):
        return None
    return float((x @ torch.nn.functional.normalize(y, dim=1).T).mean())


@torch.no_grad()
def hidden_similarity(
    trainer: GRPOTrainer, prompts: list[str], texts: list[str], gold: list[float], proxy: list[float]
) -> dict[str, Any]:
    """Does the policy's feedback carry the signal at all (the paper's Figure 1 / Table 5 on this policy)? Mean-pooled
    last-layer states of the evaluation samples; "hacked": gold in its bottom quarter and proxy above its median
    (the proxy over-rates them); "normal": gold above its median. Mean cosine within each set and across."""
    pooled = torch.stack([h.float().mean(dim=0) for h in trainer.replay(prompts, texts)])  # (N, D)
    g, p = torch.tensor(gold), torch.tensor(proxy)
    hacked = (g <= g.quantile(0.25)) & (p > p.median())
    normal = g > g.median()
    return {
        "hacked": int(hacked.sum()),
        "normal": int(normal.sum()),
        "within_hacked": _cosine_mean(pooled[hacked]),
        "within_normal": _cosine_mean(pooled[normal]),
        "across": _cosine_mean(pooled[hacked], pooled[normal]),
    }


def eval_prompts(s: RunSettings) -> list[str]:
    """The evaluation samples' prompts, in order: each held-out prompt `eval_samples_per_prompt` times."""
    return [p for p in EVAL_PROMPTS for _ in range(s.eval_samples_per_prompt)]


@torch.no_grad()
def evaluate(
    trainer: GRPOTrainer, model: Any, s: RunSettings, gold: GoldFn, with_similarity: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Gold, frozen proxy and KL to the reference on a fixed set of samples of the held-out prompts (seeded: the same
    for every arm, seed and step); with `with_similarity`, the hidden-state similarity of hacked and normal samples.
    Returns (the figures, the samples' texts and finished flags: what `rescore` scores with another gold)."""
    c, tok = trainer.config, trainer.tokenizer
    prompts = eval_prompts(s)
    enc = trainer.encode_prompts(prompts)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EVAL_SEED)
        sequences = trainer.policy.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            do_sample=True,
            temperature=c.temperature,
            top_k=0,
            max_new_tokens=c.max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=trainer.eos_ids.tolist(),
        )
    prompt_len = enc["input_ids"].shape[1]
    response = sequences[:, prompt_len:]
    is_eos = torch.isin(response, trainer.eos_ids)
    mask = ((is_eos.cumsum(1) - is_eos.long()) == 0).long()
    attention = torch.cat([enc["attention_mask"], mask], dim=1)
    finished = is_eos.any(dim=1).tolist()
    texts = tok.batch_decode(
        [response[b][mask[b].bool()].tolist() for b in range(len(prompts))], skip_special_tokens=True
    )
    logp, _ = sequence_forward(trainer.policy, sequences, attention, prompt_len, c.temperature)
    ref, _ = sequence_forward(trainer.reference, sequences, attention, prompt_len, c.temperature)
    kl = ((logp - ref) * mask).sum(1)  # (N,) log pi/pi_ref of each sample: its mean estimates KL(pi || pi_ref)
    golds = [gold(p, r, f) for p, r, f in zip(prompts, texts, finished)]
    terms = [gold_terms(p, r, f) for p, r, f in zip(prompts, texts, finished)]  # the default gold's terms, to read
    proxy = frozen_proxy(model, prompts, texts)
    n = len(prompts)
    figures = {
        "gold": sum(golds) / n,
        "proxy": sum(proxy) / n,
        "kl": kl.mean().item(),
        "length": mask.sum(1).float().mean().item(),
        "finished": sum(finished) / n,
        "repeats": sum(g.repeats for g in terms) / n,
        "distinct_good": sum(g.distinct_good for g in terms) / n,
        "samples": texts[:: s.eval_samples_per_prompt * 4][:4],  # a few to read
    }
    if with_similarity:
        figures["similarity"] = hidden_similarity(trainer, prompts, texts, golds, proxy)
    return figures, {"texts": texts, "finished": finished, "kl": [round(x, 4) for x in kl.tolist()]}


def heldout_accuracy(trainer: GRPOTrainer, client: SyncedClient, pairs: list[dict], with_hidden: str | None) -> float:
    """Share of held-out gold-labelled pairs the served head ranks right, scored at the final step (w = Omega) with
    the current policy's hidden states (`with_hidden`: "policy", "noise" or None for the modes that send none)."""
    c = trainer.config
    prompts = [p["prompt"] for p in pairs] * 2
    responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    hidden = None
    if with_hidden is not None:
        hidden = trainer.replay(prompts, responses)
        if with_hidden == "noise":
            hidden = noise_like(hidden, torch.Generator().manual_seed(EVAL_SEED))
    rewards = client.score(prompts, responses, hidden=hidden, step=c.steps, total_steps=c.steps).rewards
    n = len(pairs)
    return sum(rewards[i] > rewards[n + i] for i in range(n)) / n


def on_policy_accuracy(rewards: Sequence[float], gold: Sequence[float], group_size: int) -> float | None:
    """Share of the within-group pairs of the policy's own samples (gold differing) that `rewards` order as gold
    does: whether the RM tracks the policy where GRPO uses it."""
    right = total = 0
    for g0 in range(0, len(gold), group_size):
        for i in range(g0, g0 + group_size):
            for j in range(i + 1, g0 + group_size):
                if gold[i] != gold[j]:
                    total += 1
                    right += (rewards[i] > rewards[j]) == (gold[i] > gold[j])
    return right / total if total else None


@torch.no_grad()
def feedback_share(trainer: GRPOTrainer, model: Any, batch: Any, w: float, group_size: int) -> float:
    """The share of the within-group variance of the served reward that comes from the feedback term: the reward is
    phi(w e + (1 - w) a) = w phi(e) + (1 - w) phi(a) (+ bias), so Var_in(fb) / (Var_in(fb) + Var_in(rte)) with
    fb = (1 - w) phi(a) and rte = w phi(e), variances inside groups, averaged (phi: the members' mean)."""
    from r2m.service.scoring import pad_hidden

    head = model.current.head
    hidden = trainer.replay(batch.prompts, batch.responses)
    e = model.embed([model.backbone.encode(p, r) for p, r in zip(batch.prompts, batch.responses)])
    h, mask = pad_hidden(hidden, None, e.device)
    with torch.inference_mode():
        a = head.attention(e, h, mask).float()
    phi = head.score.weight.float().mean(dim=0)
    fb = ((1 - w) * a @ phi).view(-1, group_size)
    rte = (w * e @ phi).view(-1, group_size)
    v_fb, v_rte = fb.var(dim=1, correction=0).mean(), rte.var(dim=1, correction=0).mean()
    return float(v_fb / (v_fb + v_rte)) if float(v_fb + v_rte) > 0 else 0.0


class Refit:
    """The judge's labels used without R2M, as a user of a plain reward model would: each step the judge labels
    `judge_pairs` pairs of the step's own groups (chosen as the service's judge chooses them, by the served rewards),
    and the proxy's linear head is refit (Bradley-Terry, L-BFGS, as `r2m fit-rm` fits it) on its own labelled pairs
    plus every judge label so far, each label weighted `refit_weight`; the replica then serves the refit head."""

    def __init__(self, model: Any, base_pairs: list[dict], judge: GoldJudge, s: RunSettings, seed: int) -> None:
        self.model = model
        self.judge = judge
        self.s = s
        self.seed = seed
        self.base = self._diffs([(p["prompt"], p["chosen"], p["rejected"]) for p in base_pairs])  # (N, D)
        self.labelled: list[torch.Tensor] = []
        self.labels = 0

    def _diffs(self, triples: Sequence[tuple[str, str, str]]) -> torch.Tensor:
        backbone = self.model.backbone
        texts = [(p, r) for p, c, rj in triples for r in (c, rj)]
        rte = self.model.embed([backbone.encode(p, r) for p, r in texts]).float().cpu()
        return rte[0::2] - rte[1::2]

    def step(self, t: int, prompts: Sequence[str], responses: Sequence[str], rewards: Sequence[float]) -> int:
        """Label the step's pairs, refit, swap the served head; returns the labels taken this step."""
        from r2m.service.engine import HeadVersion
        from r2m.service.update.fit import fit_bt

        picks = choose_pairs(list(rewards), self.s.group_size, self.s.judge_pairs, torch.Generator().manual_seed(
            self.seed * 1000 + t))  # fmt: skip
        won = label_pairs(self.judge, prompts, responses, picks)
        if won:
            self.labelled.append(self._diffs([(prompts[i], responses[i], responses[j]) for i, j in won]))
            self.labels += len(won)
        judged = torch.cat(self.labelled) if self.labelled else self.base[:0]
        diff = torch.cat([self.base, judged])
        weights = torch.cat([torch.ones(len(self.base)), torch.full((len(judged),), self.s.refit_weight)])
        weight = fit_bt(diff, self.s.refit_l2, weights=weights)
        current = self.model.current
        head = copy.deepcopy(current.head)
        with torch.no_grad():
            head.score.weight.copy_(weight.reshape(1, -1))
            if head.score.bias is not None:  # rewards only matter up to a constant for GRPO: keep the proxy's
                head.score.bias.copy_(current.head.score.bias)
        self.model.swap(HeadVersion(version=current.version + 1, head=head, meta={"refit_labels": self.labels}))
        return len(won)


def _finished(batch: Any, eos_ids: torch.Tensor) -> list[bool]:
    return torch.isin(batch.sequences[:, batch.prompt_len :], eos_ids).any(dim=1).tolist()


# --- the run -------------------------------------------------------------------------------------------------------


def train_config(spec: ArmSpec, url: str, out: Path) -> TrainConfig:
    """The arm's `r2m train` settings, against the proxy served at `url`, on the task's training prompts."""
    s = spec.settings
    return TrainConfig(
        policy=spec.policy,
        prompts=spec.prompts,
        server_url=url,
        steps=s.steps,
        omega_steps=s.omega_steps,
        prompts_per_step=s.prompts_per_step,
        group_size=s.group_size,
        max_new_tokens=s.max_new_tokens,
        lr=s.lr,
        kl_coef=s.kl_coef,
        reward_mode=spec.mode,  # type: ignore[arg-type]
        seed=spec.seed,
        out_dir=str(out / "trainer"),
        save_every=0,
        device="cpu",
        progress=False,
    )


def _step_record(
    t: int, m: dict[str, Any], batch: Rollout, model: Any, eos_ids: torch.Tensor, s: RunSettings, gold: GoldFn
) -> dict[str, Any]:
    """Step t's line of the result: its metrics `m`, and the gold and frozen-proxy rewards of its own samples."""
    finished = _finished(batch, eos_ids)
    golds = [gold(p, r, f) for p, r, f in zip(batch.prompts, batch.responses, finished)]
    proxy = frozen_proxy(model, batch.prompts, batch.responses)
    return {
        "step": t,
        "gold": sum(golds) / len(golds),
        "reward": m["rewards/mean"],  # what this arm optimises (the proxy, R2M-corrected or refit, or not)
        "reward_std": m["rewards/std"],
        "group_std": m["rewards/group_std_mean"],
        "acc_on_policy": on_policy_accuracy(m["rewards"], golds, s.group_size),
        "acc_on_policy_proxy": on_policy_accuracy(proxy, golds, s.group_size),
        "kl": m["kl"],
        "length": m["response_length/mean"],
        "head_version": m["head_version"],
        "omega": m["omega"],
        "seconds": sum(v for k, v in m.items() if k.startswith("time/")),
        "prompt_ids": sorted({PROMPTS.index(p) for p in batch.prompts}),  # task.PROMPTS: < 32 the training split
    }


def run_arm(spec: ArmSpec, verbose: bool = False) -> dict[str, Any]:
    """Train one arm on one seed; writes OUT/result.json ({"arm", "seed", "steps": [...], "evals": [...], ...}) and
    OUT/eval_texts.json (every evaluation's samples, for `rescore`); returns the result."""
    from r2m.service.model import omega

    torch.set_num_threads(1)  # two runs share the two cores
    s = spec.settings
    gold = load_gold(s.gold)
    started = time.perf_counter()
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heldout = read_jsonl(spec.heldout_pairs)
    hidden_kind = FEEDBACK[spec.mode].score  # what the arm's /score gets: "policy", "noise" or None
    judge = GoldJudge(spec.seed, s.judge_temperature, s.max_new_tokens, gold) if s.judge_pairs else None
    service_judge = judge if not s.refit else None
    with serve_proxy(spec.proxy, spec.policy_dim, s, spec.seed, service_judge) as (url, model):
        client = SyncedClient(R2MClient(url, timeout=120.0))
        trainer = GRPOTrainer(train_config(spec, url, out), client)
        refit = Refit(model, read_jsonl(spec.train_pairs), judge, s, spec.seed) if s.refit and judge else None
        texts: list[dict[str, Any]] = []

        def evaluation(step: int, last: bool) -> dict[str, Any]:
            figures, record = evaluate(trainer, model, s, gold, with_similarity=step == 0 or last)
            texts.append({"step": step, **record})
            return {"step": step, **figures}

        try:
            acc_before = heldout_accuracy(trainer, client, heldout, hidden_kind)
            steps, evals = [], [evaluation(0, False)]
            for t in range(s.steps):
                m = trainer.train_step(t)
                batch = trainer.batch
                assert batch is not None
                steps.append(_step_record(t, m, batch, model, trainer.eos_ids, s, gold))
                if refit is not None:
                    steps[-1]["judge_labels"] = refit.step(t, batch.prompts, batch.responses, m["rewards"])
                if (t + 1) % s.eval_every == 0 or t + 1 == s.steps:
                    e = evaluation(t + 1, t + 1 == s.steps)
                    if hidden_kind == "policy":
                        w = omega(min(t, s.omega_steps), s.omega_steps, s.omega_floor)
                        e["feedback_share"] = feedback_share(trainer, model, batch, w, s.group_size)
                    evals.append(e)
                    if verbose:
                        print(
                            f"{spec.arm} seed {spec.seed} step {t + 1}: gold {e['gold']:+.2f} proxy {e['proxy']:+.2f} "
                            f"kl {e['kl']:.2f} reward {m['rewards/mean']:+.2f} head v{m['head_version']} "
                            f"{time.perf_counter() - started:.0f} s",
                            flush=True,
                        )
            acc_after = heldout_accuracy(trainer, client, heldout, hidden_kind)
            final_head = client.current_head()["served_version"]
        finally:
            trainer.close()
    result = {
        "arm": spec.arm,
        "mode": spec.mode,
        "seed": spec.seed,
        "settings": asdict(s),
        "steps": steps,
        "evals": evals,
        "heldout_accuracy": {"before": acc_before, "after": acc_after},
        "judge_labels": judge.calls if judge else 0,
        "judge_agreement": judge.agree / judge.calls if judge and judge.calls else None,
        "refused_updates": client.refused,
        "final_head_version": final_head,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    (out / "eval_texts.json").write_text(json.dumps({"prompts": eval_prompts(s), "evals": texts}) + "\n")
    (out / "result.json").write_text(json.dumps(result) + "\n")
    return result


def run_and_report(spec: ArmSpec) -> dict[str, Any]:
    """`run_arm` and one summary line (a pool worker's task: importable, unlike a function of __main__). A run
    whose result.json is already in its out_dir with the same arm, seed and settings is reused, not rerun (an
    interrupted table or grid resumes where it stopped)."""
    done = Path(spec.out_dir) / "result.json"
    try:
        earlier = json.loads(done.read_text())
    except (OSError, ValueError):
        earlier = None
    if earlier and (earlier.get("arm"), earlier.get("seed"), earlier.get("settings")) == (
        spec.arm, spec.seed, asdict(spec.settings)
    ):  # fmt: skip
        print(f"  {spec.arm:>13} seed {spec.seed}: reusing {done}", flush=True)
        return earlier
    result = run_arm(spec)
    last = result["evals"][-1]
    print(
        f"  {spec.arm:>13} seed {spec.seed}: gold {result['evals'][0]['gold']:+.2f} -> {last['gold']:+.2f} "
        f"(best {max(e['gold'] for e in result['evals']):+.2f}), kl {last['kl']:.2f}, "
        f"held-out acc {result['heldout_accuracy']['before']:.3f} -> {result['heldout_accuracy']['after']:.3f}, "
        f"{result['wall_s']:.0f} s",
        flush=True,
    )
    return result
