"""Ensembles of score layers on one frozen backbone: N = 1 is today's head, aggregation, diverse updates, reload."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from r2m.client.wire import WireTensor
from r2m.service.api.app import create_app
from r2m.service.backbone import load_backbone
from r2m.service.config import ServiceSettings
from r2m.service.engine import PreparedItem, build_engine, check_ensemble
from r2m.service.headcodec import head_from_bytes, head_to_bytes, serving_bytes, serving_from_bytes
from r2m.service.members import MEMBERS_FILE, save_members
from r2m.service.schemas import PreferencesRequest
from r2m.service.scoring import aggregate
from r2m.service.update.training import HeadTrainer

P = 8
TEXTS = [("hello what is the answer", "the answer is good"), ("help me cook", "no"), ("how do i code", "python")]


@pytest.fixture(scope="module")
def members_dir(tiny_llama_rm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five members for the tiny Llama RM: its own score layer, then four perturbed copies."""
    backbone = load_backbone(str(tiny_llama_rm), device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(0)
    weight = backbone.score_weight.repeat(5, 1) + torch.randn(5, backbone.rm_dim, generator=g) * 0.3
    weight[0] = backbone.score_weight[0]
    out = tmp_path_factory.mktemp("members")
    save_members(out / MEMBERS_FILE, weight, None, {"backbone": "tiny"})
    return out


def _settings(model: Path, members: Path | None = None, **kw) -> ServiceSettings:
    base = dict(_env_file=None, model=str(model), policy_dim=P, attn_dim=8, device="cpu", train_lr=1e-2)
    if members is not None:
        base["ensemble_members"] = str(members)
    return ServiceSettings(**{**base, **kw})


def _items(engine, w: float = 0.6) -> list[PreparedItem]:  # noqa: ANN001
    g = torch.Generator().manual_seed(1)
    return [PreparedItem(engine.backbone.encode(p, r), torch.randn(4 + i, P, generator=g), w) for i, (p, r) in
            enumerate(TEXTS)]  # fmt: skip


def test_one_member_is_todays_head_and_member_zero_of_an_ensemble_scores_like_it(
    tiny_llama_rm: Path, members_dir: Path
) -> None:
    single = build_engine(_settings(tiny_llama_rm))
    assert single.head_config.to_dict() == {
        "rm_dim": 32, "policy_dim": P, "attn_dim": 8, "n_heads": 1, "score_bias": False
    }  # fmt: skip
    assert single.current.head.score.weight.shape == (1, 32)
    plain = single.score([PreparedItem(it.encoded, None, 1.0) for it in _items(single)])
    expected = single.backbone.plain_reward(single.embed([it.encoded for it in _items(single)]))
    assert torch.equal(plain, expected), "N = 1, no hidden states: the plain RM's reward, bit for bit"
    out = single.score_all(_items(single))
    assert out.uncertainty is None and out.members is None
    five = build_engine(_settings(tiny_llama_rm, members_dir, ensemble=5, aggregation="mean"))
    scores = five.score_all(_items(five))
    assert scores.members is not None and scores.members.shape == (3, 5)
    torch.testing.assert_close(scores.members[:, 0], out.rewards, rtol=1e-6, atol=1e-6)
    assert len({tuple(row) for row in scores.members.T.tolist()}) == 5


def test_aggregations_against_hand_computed_values() -> None:
    m = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    # population variances 2/3 and 8, stds sqrt(2/3) and sqrt(8)
    mean, std = aggregate(m, "mean")
    assert mean.tolist() == pytest.approx([2.0, 2.0]) and std.tolist() == pytest.approx([(2 / 3) ** 0.5, 8**0.5])
    assert aggregate(m, "uwo", 0.5)[0].tolist() == pytest.approx([2.0 - 1 / 3, 2.0 - 4.0])
    assert aggregate(m, "min")[0].tolist() == [1.0, 0.0]


def test_every_member_trains_and_they_stay_distinct(tiny_llama_rm: Path, members_dir: Path) -> None:
    settings = _settings(tiny_llama_rm, members_dir, ensemble=5, train_steps=5, guard=False)
    trainer = HeadTrainer(build_engine(settings), settings)
    before = trainer.head.score.weight.detach().clone()
    rng = np.random.default_rng(0)
    responses = ["the answer is good", "no", "thanks for the question", "you can cook with some water"]
    groups = [
        {"prompt": p, "responses": responses, "hidden": [WireTensor.from_array(rng.standard_normal((5, P), np.float32))
                                                        for _ in responses]}
        for p in ("hello what is the answer", "help me cook", "how do i code")
    ]  # fmt: skip
    trainer.update([PreferencesRequest.model_validate({"groups": groups, "step": 50, "total_steps": 100,
                                                       "batch_id": "b1"})])  # fmt: skip
    after = trainer.head.score.weight.detach()
    moved = (after - before).norm(dim=1)
    assert bool((moved > 0).all()), f"every member trains: {moved}"
    assert len(set(torch.round(moved, decimals=6).tolist())) == 5, "each on its own resample: different steps"
    dist = torch.cdist(after, after)
    assert float(dist[~torch.eye(5, dtype=torch.bool)].min()) > 1e-3, "members stay distinct"


def test_a_saved_ensemble_reloads_to_identical_rewards(tiny_llama_rm: Path, members_dir: Path) -> None:
    from r2m.service.engine import HeadVersion

    engine = build_engine(_settings(tiny_llama_rm, members_dir, ensemble=5))
    before = engine.score_all(_items(engine)).members
    master = head_from_bytes(head_to_bytes(engine.initial_head()), engine.head_config)  # swapped in as served
    served = serving_from_bytes(serving_bytes(engine.current.head), engine.head_config)
    for version, head in enumerate((master, served), start=1):
        engine.swap(HeadVersion(version=version, head=head))
        assert torch.equal(engine.score_all(_items(engine)).members, before)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"ensemble": 0}, "ensemble"),
        ({"aggregation": "median"}, "aggregation"),
        ({"uwo_lambda": -1.0}, "uwo_lambda"),
    ],
)
def test_bad_ensemble_settings_fail_naming_the_setting(tiny_llama_rm: Path, kw: dict, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        _settings(tiny_llama_rm, **kw)


def test_an_ensemble_for_a_model_without_members_fails_at_start(tiny_llama_rm: Path, members_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"R2M_ENSEMBLE=3: .* holds 0 fitted members \(no such file\)"):
        check_ensemble(_settings(tiny_llama_rm, ensemble=3))
    with pytest.raises(ValueError, match="R2M_ENSEMBLE=6: .* holds 5 fitted members"):
        create_app(_settings(tiny_llama_rm, members_dir, ensemble=6))
    with pytest.raises(ValueError, match="has no fitted members here; fit them with `r2m fit-rm --backbone"):
        check_ensemble(_settings(Path("some-org/some-hub-rm"), ensemble=2))


def test_score_and_get_reward_return_uncertainty_only_for_an_ensemble(tiny_llama_rm: Path, members_dir: Path) -> None:
    items = [{"prompt": p, "response": r} for p, r in TEXTS]
    with TestClient(create_app(_settings(tiny_llama_rm, members_dir, ensemble=5, embedded_worker=False))) as client:
        while client.get("/readyz").status_code != 200:
            pass
        out = client.post("/score", json={"items": items, "return_members": True}).json()
        assert set(out) == {"rewards", "head_version", "omega", "uncertainty", "members"}
        members = np.array(out["members"])
        assert members.shape == (3, 5)
        assert out["uncertainty"] == pytest.approx(members.std(axis=1).tolist(), rel=1e-5)
        assert out["rewards"] == pytest.approx((members.mean(1) - members.var(1)).tolist(), rel=1e-5)  # uwo, 1.0
        assert "members" not in client.post("/score", json={"items": items}).json()
        got = client.post("/get_reward", json={"query": ["user : hello </s> assistant : hi </s>"]}).json()
        assert len(got["extra_logs"]["uncertainty"]) == 1 and got["extra_logs"]["uncertainty"][0] > 0
    with TestClient(create_app(_settings(tiny_llama_rm, embedded_worker=False))) as client:
        while client.get("/readyz").status_code != 200:
            pass
        assert set(client.post("/score", json={"items": items}).json()) == {"rewards", "head_version", "omega"}
        got = client.post("/get_reward", json={"query": ["user : hello </s>"]}).json()
        assert set(got["extra_logs"]) == {"head_version"}
