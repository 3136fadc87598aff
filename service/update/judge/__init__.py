"""The outside judge of the R2M update: which pairs of a batch's groups it is asked about, and the three kinds of
judge that answer (docs/judge.md).

The paper's in-group pseudo-labels are the reward model's own: they sharpen what it already prefers, blind spots
included. A judge brings a label from outside. For every preference batch the worker recomputes each group's rewards
with the current head, picks `R2M_JUDGE_PAIRS` pairs (`choose_pairs`: each picked group's best- against its
worst-scored response, the pair the pseudo-label loss would train on, then other pairs of the same groups), asks the
judge, and trains the labelled pairs (Bradley-Terry) with the refreshed hidden states the groups carried.

    R2M_JUDGE=openai:http://vllm-host:8000/v1 R2M_JUDGE_MODEL=Qwen/Qwen2.5-7B-Instruct r2m serve
    R2M_JUDGE=http://judge-host:9000/judge r2m worker
    R2M_JUDGE=my_pkg.judges:compare r2m worker

Kinds (`load_judge`):
- `openai:<base_url>` (`OpenAIJudge`): an OpenAI-compatible chat-completions endpoint. A pairwise prompt from a
  template, each pair asked in both orders (orders that disagree abstain), the verdict from the letters'
  log-probabilities when the server returns them, else parsed from the text (`verdict_from_text`).
- `http(s)://...` (`HTTPJudge`): one POST per batch, `{"pairs": [{"prompt", "response_a", "response_b"}, ...]}`,
  answered `{"preferences": [p, ...]}`, one P(response_a is better) per pair (or 0/1, true/false).
- `module:function`, or any object passed in (`CallableJudge`): `f(prompt, response_a, response_b) -> bool | float`,
  True or a probability > 0.5 when `response_a` is better; exactly 0.5 abstains. An object with
  `batch(triples) -> list[float]` is asked a whole batch at once.

A verdict is P(response_a is better). A judge that fails (refused connection, timeout, 5xx or 429 after the
retries, the update's deadline) gives no verdict: never a label. An answer that holds no verdict is an abstention.
Modules: `labeller` (pair choice and the update's labelling), `verdicts`, `base` (what every kind shares; the
Python judge), `remote` (HTTP: retries, r2m's pairwise protocol, the rate limit), `chat` (the OpenAI-API LLM judge),
`build` (a judge from a spec or an object).
"""

from .base import CallableJudge, PairJudge, run_bounded
from .build import as_judge, build_judge, judge_info, load_judge
from .chat import DEFAULT_TEMPLATE, OpenAIJudge, load_template, render
from .labeller import BatchGroups, JudgeReport, PairLabeller, choose_pairs, label_pairs
from .remote import HTTPJudge, RateLimit
from .verdicts import Judge, Verdict, verdict_from_logprobs, verdict_from_text

__all__ = [
    "DEFAULT_TEMPLATE",
    "BatchGroups",
    "CallableJudge",
    "HTTPJudge",
    "Judge",
    "JudgeReport",
    "OpenAIJudge",
    "PairJudge",
    "PairLabeller",
    "RateLimit",
    "Verdict",
    "as_judge",
    "build_judge",
    "choose_pairs",
    "judge_info",
    "label_pairs",
    "load_judge",
    "load_template",
    "render",
    "run_bounded",
    "verdict_from_logprobs",
    "verdict_from_text",
]
