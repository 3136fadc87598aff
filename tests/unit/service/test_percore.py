"""Work shared out among the cores (r2m.service.kernels.percore): one torch thread per worker, nothing leaks to the
process."""

from __future__ import annotations

import threading

import pytest
import torch

from r2m.service.kernels import percore

needs_two_threads = pytest.mark.skipif(torch.get_num_threads() < 2, reason="torch runs one thread here")


@pytest.fixture
def fresh_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next call builds its pool anew (the restore of the process-wide count happens then)."""
    monkeypatch.setattr(percore, "_workers", [])
    monkeypatch.setattr(percore, "_unavailable", False)


@needs_two_threads
def test_shares_are_contiguous_each_run_by_a_worker_on_one_torch_thread(fresh_pool: None) -> None:
    seen: list[tuple[int, int, list[int]]] = []
    lock = threading.Lock()

    def fn(share: list[int]) -> None:
        with lock:
            seen.append((threading.get_ident(), torch.get_num_threads(), list(share)))

    units = list(range(7))
    percore.per_core(fn, units)
    n = min(len(units), torch.get_num_threads())
    assert len(seen) == n
    assert sorted(u for *_, share in seen for u in share) == units
    assert all(share == list(range(share[0], share[0] + len(share))) for *_, share in seen)  # contiguous
    assert {threads for _, threads, _ in seen} == {1}
    assert threading.get_ident() not in {t for t, *_ in seen}


@needs_two_threads
def test_the_caller_and_threads_started_later_keep_the_process_thread_count(
    fresh_pool: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Torch's set_num_threads also stores the count that every thread adopts at its first parallel op; the workers'
    one thread must never become that count (a server's request threads would run on one core), not even for a
    moment while they start: they set it per thread, with OpenMP's own setter."""
    stored: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", stored.append)
    before = torch.get_num_threads()
    percore.per_core(lambda share: None, [0, 1])
    assert len(percore._workers) == min(2, before) and all(w.one_thread for w in percore._workers)
    assert stored == []
    assert torch.get_num_threads() == before
    later: list[int] = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert later == [before]


@needs_two_threads
def test_an_error_in_a_share_is_raised_to_the_caller_after_every_share_ran() -> None:
    done: list[int] = []

    def fn(share: list[int]) -> None:
        if 0 in share:
            raise ValueError("bad unit")
        done.extend(share)

    with pytest.raises(ValueError, match="bad unit"):
        percore.per_core(fn, [0, 1])
    assert done == [1]


@needs_two_threads
@pytest.mark.parametrize("mode", ["inference", "no_grad"])
def test_workers_run_under_the_callers_grad_and_inference_modes(mode: str) -> None:
    modes: list[tuple[bool, bool]] = []

    def fn(share: list[int]) -> None:
        modes.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))

    with torch.inference_mode() if mode == "inference" else torch.no_grad():
        out = torch.zeros(2)

        def write(share: list[int]) -> None:
            fn(share)
            out[share[0]] = 1.0  # writing into the caller's (inference) tensor is allowed there

        percore.per_core(write, [0, 1])
    assert modes == [(False, mode == "inference")] * 2
    assert out.tolist() == [1.0, 1.0]


def test_one_unit_runs_in_the_caller() -> None:
    where: list[int] = []
    percore.per_core(lambda share: where.append(threading.get_ident()), [0])
    assert where == [threading.get_ident()]


@needs_two_threads
@pytest.mark.parametrize("failure", ["no thread", "no openmp"])
def test_where_workers_cannot_be_had_the_work_runs_in_the_caller_and_that_is_logged_once(
    fresh_pool: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    if failure == "no thread":

        def refuse(self):  # noqa: ANN001, ANN202
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(percore._Worker, "start", refuse)
        why = "can't start new thread"
    else:
        monkeypatch.setattr(percore, "_openmp", lambda: None)
        why = "torch's OpenMP runtime not found, or its thread count not settable per thread"
    before = torch.get_num_threads()
    where: list[int] = []
    for _ in range(2):
        percore.per_core(lambda share: where.extend(threading.get_ident() for _ in share), [0, 1, 2])
    assert where == [threading.get_ident()] * 6
    assert [r.message for r in caplog.records if r.name == "r2m.percore"] == [
        f"no per-core workers ({why}): the widened attention runs on torch's own threads"
    ]
    assert torch.get_num_threads() == before
    assert percore._workers == []


def test_one_thread_here_changes_that_thread_only() -> None:
    """OpenMP's setter, found in the runtime this torch loaded, sets the calling thread's count and no other's."""
    before = torch.get_num_threads()
    seen: list[tuple[bool, int]] = []

    def worker() -> None:
        seen.append((percore.one_thread_here(), torch.get_num_threads()))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [(True, 1)]
    assert torch.get_num_threads() == before
