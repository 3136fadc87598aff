"""The judge: which pairs it labels, both judge kinds (a Python callable, an HTTP endpoint), and clear errors."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from r2m.trainer.judge import HTTPJudge, choose_pairs, label_pairs, load_judge

REWARDS = [0.1, 0.9, 0.5, 0.3, -1.0, 2.0, 0.0, 1.0, 3.0, 2.5, -2.0, 0.4]  # 3 groups of 4


def test_each_picked_group_gives_its_best_against_its_worst_scored_response() -> None:
    pairs = choose_pairs(REWARDS, 4, 2, torch.Generator().manual_seed(0))
    assert len(pairs) == 2 and len({i // 4 for i, _ in pairs}) == 2
    best_worst = {0: (1, 0), 1: (5, 4), 2: (8, 10)}
    assert all((i, j) == best_worst[i // 4] for i, j in pairs)
    # More pairs than groups: every group's best/worst first, then distinct other pairs of the same groups.
    many = choose_pairs(REWARDS, 4, 8, torch.Generator().manual_seed(0))
    assert len(many) == 8 and len({tuple(sorted(p)) for p in many}) == 8
    assert set(best_worst.values()) <= set(many) and all(i // 4 == j // 4 for i, j in many)
    assert choose_pairs(REWARDS, 4, 2, torch.Generator().manual_seed(0)) == pairs, "seeded"


def test_labels_follow_the_judge_and_a_half_abstains() -> None:
    prompts, responses = ["p"] * 4, ["a", "bb", "ccc", "dddd"]
    judge = lambda p, a, b: {("a", "bb"): 0.2, ("ccc", "dddd"): 0.5}.get((a, b), True)  # noqa: E731
    assert label_pairs(judge, prompts, responses, [(0, 1), (2, 3), (3, 0)]) == [(1, 0), (3, 0)]


class _Judge(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        prefs = [1.0 if len(p["response_a"]) > len(p["response_b"]) else 0.0 for p in body["pairs"]]
        out = json.dumps({"preferences": prefs}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: object) -> None:
        pass


def test_an_http_judge_labels_a_steps_pairs_in_one_request() -> None:
    server = HTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        judge = load_judge(f"http://127.0.0.1:{server.server_port}/judge")
        assert isinstance(judge, HTTPJudge)
        labelled = label_pairs(judge, ["p"] * 3, ["short", "a longer one", "x"], [(0, 1), (1, 2)])
        assert labelled == [(1, 0), (1, 2)]
        judge.close()
    finally:
        server.shutdown()


def test_bad_judge_specs_say_what_to_give() -> None:
    with pytest.raises(ValueError, match="module:function"):
        load_judge("not-a-spec")
    with pytest.raises(ValueError, match="no callable 'nope'"):
        load_judge("json:nope")
    assert load_judge("json:dumps") is json.dumps


def test_judge_service_posts_the_groups_and_judges_nothing_here() -> None:
    from r2m.trainer.config import TrainConfig

    here = TrainConfig(policy="p", reward_mode="r2m-judge", judge=f"{__name__}:_longer")
    assert here.posts_judged and not here.posts_groups
    service = TrainConfig(policy="p", reward_mode="r2m-judge", judge="service")
    assert service.posts_groups and not service.posts_judged and service.sends_hidden
    head = TrainConfig(policy="p", reward_mode="head-judge", judge="service")
    assert head.posts_groups and not head.posts_judged and not head.sends_hidden


def _longer(prompt: str, a: str, b: str) -> bool:
    return len(a) > len(b)
