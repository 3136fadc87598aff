"""The feedback attention over shared prefixes and in bf16 (r2m.service.model, r2m.service.engine.score_rte)."""

from __future__ import annotations

import threading

import pytest
import torch

from r2m.service.kernels import precision, widen
from r2m.service.model import FeedbackAttention, HeadConfig, R2MHead
from r2m.service.scoring import pad_hidden, score_rte

P = 24


def _head(n_heads: int = 3, dtype: torch.dtype = torch.float32) -> R2MHead:
    torch.manual_seed(0)
    head = R2MHead(HeadConfig(rm_dim=8, policy_dim=P, attn_dim=12 * n_heads, n_heads=n_heads, score_bias=True))
    return head.to(dtype)


def _mixed_batch(dtype: torch.dtype = torch.float32):
    """Eight items: two groups sharing a prefix (ragged responses, one with no own rows), items with their own full
    sequences, and items without hidden states; returns (own rows, prefixes, full sequences)."""
    g = torch.Generator().manual_seed(1)
    pa, pb = torch.randn(9, P, generator=g).to(dtype), torch.randn(4, P, generator=g).to(dtype)
    own: list[torch.Tensor | None] = [
        torch.randn(3, P, generator=g).to(dtype),  # group a
        None,  # no hidden states
        torch.randn(6, P, generator=g).to(dtype),  # group b
        torch.randn(0, P).to(dtype),  # group a, every row in the prefix
        torch.randn(5, P, generator=g).to(dtype),  # no prefix
        torch.randn(1, P, generator=g).to(dtype),  # group a
        torch.randn(2, P, generator=g).to(dtype),  # group b
        torch.randn(11, P, generator=g).to(dtype),  # no prefix
    ]
    prefixes = [pa, None, pb, pa, None, pa, pb, None]
    full = [
        None if h is None else (h if p is None else torch.cat([p, h]))  # the unshared form
        for h, p in zip(own, prefixes)
    ]
    return own, prefixes, full


@pytest.mark.parametrize("n_heads", [1, 3])
def test_shared_prefixes_give_the_rewards_of_full_sequences(n_heads: int) -> None:
    head = _head(n_heads)
    own, prefixes, full = _mixed_batch()
    rte = torch.randn(8, 8, generator=torch.Generator().manual_seed(2))
    weights = [0.6, 0.6, 0.7, 0.6, 0.8, 0.6, 1.0, 0.65]  # w = 1: the plain reward, prefix or not
    with torch.no_grad():
        shared = score_rte(head, rte, own, weights, prefixes)
        unshared = score_rte(head, rte, full, weights)
    torch.testing.assert_close(shared, unshared, rtol=1e-5, atol=1e-5)
    plain = head.score(rte).squeeze(-1)
    assert shared[1] == plain[1] and shared[6] == plain[6]
    assert not torch.isclose(shared[0], plain[0]), "the prefix must count"


def test_shared_form_equals_the_textbook_attention_with_masks() -> None:
    attn = FeedbackAttention(rm_dim=8, policy_dim=P, attn_dim=32, n_heads=4).double()
    own, prefixes, full = _mixed_batch(torch.float64)
    keep = [i for i, h in enumerate(own) if h is not None]
    e = torch.randn(len(keep), 8, dtype=torch.float64)
    h_own, mask_own = pad_hidden([own[i] for i in keep], None, torch.device("cpu"))
    h_full, mask_full = pad_hidden([full[i] for i in keep], None, torch.device("cpu"))
    distinct = [prefixes[0], prefixes[2]]
    index = torch.tensor([next((j for j, p in enumerate(distinct) if p is prefixes[i]), -1) for i in keep])
    out = attn(e, h_own, mask_own, distinct, index)
    torch.testing.assert_close(out, attn.forward_reference(e, h_full, mask_full), rtol=1e-10, atol=1e-10)


def test_gradients_through_shared_prefixes_equal_the_unshared_ones() -> None:
    grads = []
    own, prefixes, full = _mixed_batch()
    rte = torch.randn(8, 8, generator=torch.Generator().manual_seed(3))
    for args in ((own, prefixes), (full, None)):
        head = _head(2)
        rewards = score_rte(head, rte, args[0], [0.6] * 8, args[1])
        (rewards * torch.arange(8.0)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in head.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_the_padded_batch_holds_only_the_rows_after_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    forward = FeedbackAttention.forward

    def spy(self, e, h, mask, prefixes=(), prefix_index=None):
        seen["h"], seen["prefixes"] = h.shape, [p.data_ptr() for p in prefixes]
        return forward(self, e, h, mask, prefixes, prefix_index)

    monkeypatch.setattr(FeedbackAttention, "forward", spy)
    own, prefixes, _ = _mixed_batch()
    score_rte(_head(), torch.randn(8, 8), own, [0.6] * 8, prefixes)
    assert seen["h"] == (7, 11, P), "(items with hidden states, longest own rows, width): no prefix rows copied in"
    assert seen["prefixes"] == [prefixes[0].data_ptr(), prefixes[2].data_ptr()], "each prefix once, not copied"


def test_a_prefix_with_no_own_rows_and_nothing_else_is_fine() -> None:
    head = _head()
    p = torch.randn(5, P)
    with torch.no_grad():
        shared = score_rte(head, torch.ones(2, 8), [torch.zeros(0, P), torch.zeros(0, P)], [0.6, 0.6], [p, p])
        full = score_rte(head, torch.ones(2, 8), [p, p], [0.6, 0.6])
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-6)


# --- bf16 end to end ----------------------------------------------------------------------------------------------

# Measured on realistic magnitudes (hidden states ~ N(0, 1) with a few outlier channels of 20, as in LLM last
# layers; T = 300, D = 256, d = 256; `_realistic`): the reward difference between bf16 and float32 hidden states
# read through the bf16 path is below 1e-3 of the rewards' spread. BF16_REWARD_TOL pins it with headroom; the
# same bound is documented in docs/api.md.
BF16_REWARD_TOL = 5e-3


def _realistic(B: int, T: int, D: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g)
    h[..., :4] *= 20.0  # massive-activation channels
    return h


@pytest.fixture
def native_half(monkeypatch: pytest.MonkeyPatch) -> None:
    """R2M_CPU_HALF_HIDDEN=native: half precision read as sent, as on a CPU with native bf16 matmuls or a GPU."""
    monkeypatch.setattr(precision, "_mode", "native")


def test_bf16_hidden_states_are_read_without_a_float32_copy(monkeypatch: pytest.MonkeyPatch, native_half) -> None:
    dtypes = []
    bmm = torch.bmm

    def spy(a, b, *args, **kwargs):
        dtypes.append((a.dtype, b.dtype))
        return bmm(a, b, *args, **kwargs)

    monkeypatch.setattr(widen.torch, "bmm", spy)
    head = _head(1)
    h, mask = pad_hidden([torch.randn(6, P).bfloat16(), torch.randn(3, P).bfloat16()], None, torch.device("cpu"))
    assert h.dtype == torch.bfloat16
    with torch.no_grad():
        out = head(torch.randn(2, 8), torch.full((2,), 0.6), h, mask)
    assert out.dtype == torch.float32 and dtypes == [(torch.bfloat16, torch.bfloat16)] * 2


def _no_native_half(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.dtype, torch.dtype, int]]:
    """A CPU without native half matmuls; returns the (dtypes, bytes of the second operand) of every bmm/matmul."""
    monkeypatch.setattr(precision, "_mode", "auto")
    monkeypatch.setattr(precision, "native_half", lambda dtype: (False, "test"))
    calls: list[tuple[torch.dtype, torch.dtype, int]] = []
    bmm = torch.bmm

    def spy(a, b, *args, **kwargs):
        calls.append((a.dtype, b.dtype, b.numel() * b.element_size()))
        return bmm(a, b, *args, **kwargs)

    monkeypatch.setattr(widen.torch, "bmm", spy)
    return calls


def test_without_native_bf16_hidden_states_are_widened_in_the_attention_and_score_as_their_float32_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _no_native_half(monkeypatch)
    head = _head(1)
    rows = [torch.randn(6, P).bfloat16(), torch.randn(3, P).bfloat16()]
    h, mask = pad_hidden(rows, None, torch.device("cpu"))
    assert h.dtype == torch.bfloat16  # padded as sent: half the bytes of a float32 copy
    e, w = torch.randn(2, 8), torch.full((2,), 0.6)
    with torch.no_grad():
        got = head(e, w, h, mask)
        assert all(c[:2] == (torch.float32, torch.float32) for c in calls) and len(calls) == 2  # one block each
        ref = head(e, w, h.float(), mask)
    assert torch.equal(got, ref)  # bf16 values read in float32: exactly the float32 path


@pytest.mark.parametrize(
    ("block_rows", "bmm_calls"),
    # 2 passes (scores, pooling) over: the 6 items with own rows (11 at most, padded) in runs of 4 of one item's rows
    # (3 per item) or two whole items per block (3 blocks); the prefixes (9 and 4 rows) in runs of 4 (3 + 1 blocks)
    # or whole (1 + 1).
    [(4, 2 * (6 * 3 + 3 + 1)), (2 * 11, 2 * (3 + 1 + 1))],
)
def test_wide_batches_are_widened_a_block_at_a_time(
    monkeypatch: pytest.MonkeyPatch, block_rows: int, bmm_calls: int
) -> None:
    calls = _no_native_half(monkeypatch)
    monkeypatch.setattr(widen, "UPCAST_BLOCK_BYTES", block_rows * P * 4)
    own, prefixes, _ = _mixed_batch(torch.bfloat16)
    rte = torch.randn(8, 8, generator=torch.Generator().manual_seed(2))
    weights = [0.6, 0.6, 0.7, 0.6, 0.8, 0.6, 1.0, 0.65]
    with torch.no_grad():
        got = score_rte(_head(3), rte, own, weights, prefixes)
        blocks = list(calls)
        hidden32, prefixes32 = _widened(own, prefixes)
        ref = score_rte(_head(3), rte, hidden32, weights, prefixes32)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert len(blocks) == bmm_calls
    assert all(c[:2] == (torch.float32, torch.float32) and c[2] <= block_rows * P * 4 for c in blocks)


@pytest.mark.parametrize("holes", [False, True])
def test_items_longer_than_a_block_are_read_in_runs_each_widened_once(
    monkeypatch: pytest.MonkeyPatch, holes: bool
) -> None:
    """Without native bf16 an item longer than a block is read in runs of rows, each widened once and read by the
    scores and the pooling while in cache: the read-outs of the float32 values, and padding after the real rows is
    never widened or multiplied (a mask with holes is read as a mask, a run of only padding skipped). The runs are
    shared out among the cores: each is widened and read by one worker thread, into its own buffer."""
    _no_native_half(monkeypatch)
    runs: list[tuple[int, torch.dtype, int, int]] = []
    mm = torch.mm

    def spy(a, b, *args, **kwargs):
        rows = b.shape[0] if b.shape[0] != P else b.shape[1]  # rows of the run, either operand
        runs.append((threading.get_ident(), b.dtype, rows, b.data_ptr()))
        return mm(a, b, *args, **kwargs)

    monkeypatch.setattr(widen.torch, "mm", spy)
    monkeypatch.setattr(widen, "UPCAST_BLOCK_BYTES", 4 * P * 4)  # runs of 4 rows
    g = torch.Generator().manual_seed(3)
    h, mask = pad_hidden([torch.randn(n, P, generator=g).bfloat16() for n in (11, 5, 1)], None, torch.device("cpu"))
    if holes:
        mask[0, 2] = False
        mask[0, 4:8] = False  # the second run of item 0 is padding only
    ref_h = h.float()
    h[1, 5:] = h[2, 1:] = float("nan")  # trailing padding that is read would make the item's read-out NaN
    head = _head(3).eval()
    e, w = torch.randn(3, 8, generator=g), torch.full((3,), 0.4)
    with torch.no_grad():
        got = head(e, w, h, mask)
        read = list(runs)
        ref = head(e, w, ref_h, mask)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # item 0: runs of 4, 4, 3 rows (with holes: the padding-only run skipped); item 1: 4 and 1 (not 11 padded
    # rows); item 2: 1. Two matmuls per run, both over the same widened float32 run, in the thread that widened it.
    sizes = ([4, 3] if holes else [4, 4, 3]) + [4, 1, 1]
    threads = {t for t, *_ in read}
    pairs, buffers = [], {}
    for t in threads:
        mine = [c[1:] for c in read if c[0] == t]
        assert mine[0::2] == mine[1::2], "scores and pooling read the same widened run"
        pairs += mine[0::2]
        buffers[t] = {ptr for *_, ptr in mine}
    assert all(dtype == torch.float32 for dtype, *_ in pairs)
    assert sorted(n for _, n, _ in pairs) == sorted(sizes)
    assert len(threads) == min(torch.get_num_threads(), len(sizes))
    if len(threads) > 1:
        assert threading.get_ident() not in threads, "shared out to the workers, not read by the caller too"
        assert not set.intersection(*buffers.values()), "each worker widens into its own buffer"


def test_a_run_whose_scores_all_overflow_adds_nothing_instead_of_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of rows whose real scores are all -inf in float32 (huge activations against the query): zero weight, as
    in the float32 path's one softmax, not a NaN for the whole item (review finding)."""
    _no_native_half(monkeypatch)
    monkeypatch.setattr(widen, "UPCAST_BLOCK_BYTES", 4 * P * 4)  # runs of 4 rows
    torch.manual_seed(0)
    attn = FeedbackAttention(8, P, 12, 1).eval()
    e = torch.randn(1, 8) * 100
    with torch.no_grad():
        u = attn.fold_query(e)
        h = torch.randn(1, 8, P)
        h[0, :4] = -3e37 * u[0, 0].sign()  # the first run's scores: -inf
        h = h.bfloat16()
        mask = torch.ones(1, 8, dtype=torch.bool)
        got, ref = attn(e, h, mask), attn(e, h.float(), mask)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # scores of ~1e3: a peaked softmax, run by run


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_head_is_finite_finds_one_bad_weight_anywhere(dtype: torch.dtype, bad: float) -> None:
    """One NaN or Inf at the first, the last or a random position of any weight (vectorised bodies and scalar tails
    alike) makes the head non-finite; a replica refuses it and the worker does not publish it."""
    torch.manual_seed(0)
    head = R2MHead(HeadConfig(rm_dim=40, policy_dim=203, attn_dim=3 * 43, n_heads=3, score_bias=True)).to(dtype)
    assert head.is_finite()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, w in head.named_parameters():
            flat = w.view(-1)
            for i in {0, flat.numel() - 1, *torch.randint(flat.numel(), (4,), generator=g).tolist()}:
                kept = flat[i].clone()
                flat[i] = bad
                assert not head.is_finite(), (name, i)
                flat[i] = kept
    assert head.is_finite()


def _widened(own, prefixes):  # noqa: ANN001, ANN202
    return [None if h is None else h.float() for h in own], [None if p is None else p.float() for p in prefixes]


def test_under_autograd_half_hidden_states_are_widened_once_and_give_the_float32_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker's update: one float32 copy shared by the scores and the pooling (blocks would each be kept for the
    backward pass), and the gradients of the float32 values."""
    calls = _no_native_half(monkeypatch)
    monkeypatch.setattr(widen, "UPCAST_BLOCK_BYTES", 4 * P * 4)  # would cut blocks, were blocks taken
    own, prefixes, _ = _mixed_batch(torch.bfloat16)
    rte = torch.randn(8, 8, generator=torch.Generator().manual_seed(2))
    weights = [0.6, 0.6, 0.7, 0.6, 0.8, 0.6, 1.0, 0.65]
    grads = []
    for hidden, shared in ((own, prefixes), _widened(own, prefixes)):
        head = _head(3)
        score_rte(head, rte, hidden, weights, shared).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in head.attention.parameters()]))
        if hidden is own:
            # two reads each of the widened h (6 x 11 rows) and of the widened prefixes (9 and 4 rows), whole
            whole = sorted(n * P * 4 for n in (6 * 11, 9, 4))
            assert sorted(c[2] for c in calls) == sorted(whole * 2), "two reads of one widened copy each"
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_compute_dtype_follows_the_setting_the_cpu_flags_and_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "_mode", "auto")
    for cap in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):  # a cap set for the run would measure instead of reading
        monkeypatch.delenv(cap, raising=False)
    for flags, native in (({"avx2", "avx512f"}, False), ({"avx512f", "avx512_bf16"}, True), ({"amx_bf16"}, True)):
        precision.native_half.cache_clear()
        monkeypatch.setattr(precision, "_cpu_flags", lambda flags=flags: flags)
        assert precision.compute_dtype(torch.bfloat16, cpu) == (torch.bfloat16 if native else torch.float32)
    precision.native_half.cache_clear()
    monkeypatch.setattr(precision, "_cpu_flags", lambda: None)  # unreadable: measured once
    monkeypatch.setattr(precision, "_measured_native", lambda dtype: dtype == torch.float16)
    assert precision.compute_dtype(torch.bfloat16, cpu) == torch.float32
    assert precision.compute_dtype(torch.float16, cpu) == torch.float16
    assert precision.native_half(torch.bfloat16) == (False, "measured once")
    precision.native_half.cache_clear()
    assert precision.compute_dtype(torch.float32, cpu) == torch.float32
    assert precision.compute_dtype(torch.bfloat16, "cuda") == torch.bfloat16  # GPUs read half precision as sent
    precision.configure("upcast")
    assert precision.compute_dtype(torch.float16, cpu) == torch.float32
    precision.configure("native")
    assert precision.compute_dtype(torch.bfloat16, cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="R2M_CPU_HALF_HIDDEN"):
        precision.configure("fast")


def test_a_capped_instruction_set_is_measured_instead_of_read_from_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """ONEDNN_MAX_CPU_ISA=AVX2 on a CPU with AVX512-BF16: torch's bf16 matmuls are emulated, whatever the flags."""
    monkeypatch.setattr(precision, "_mode", "auto")
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.setattr(precision, "_measured_native", lambda dtype: False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    precision.native_half.cache_clear()
    try:
        native, why = precision.native_half(torch.bfloat16)
        assert not native and "ONEDNN_MAX_CPU_ISA=AVX2" in why
        assert precision.compute_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")  # no cap: the flags decide
        precision.native_half.cache_clear()
        assert precision.native_half(torch.bfloat16) == (True, "cpu flags: avx512_bf16")
    finally:
        precision.native_half.cache_clear()


def test_bf16_rewards_are_within_the_documented_tolerance_of_float32(native_half) -> None:
    torch.manual_seed(0)
    head = R2MHead(HeadConfig(rm_dim=64, policy_dim=256, attn_dim=256, n_heads=1))
    with torch.no_grad():
        head.score.weight.normal_()
    h = _realistic(16, 300, 256)
    e = torch.randn(16, 64)
    mask = torch.ones(16, 300, dtype=torch.bool)
    mask[::2, 200:] = False
    w = torch.full((16,), 0.6)
    with torch.no_grad():
        ref = head(e, w, h.bfloat16().float(), mask)  # the same values, read in float32
        got = head(e, w, h.bfloat16(), mask)
    spread = float(ref.max() - ref.min())
    assert float((got - ref).abs().max()) <= BF16_REWARD_TOL * spread
    assert not torch.equal(got, ref), "the bf16 path really ran in bf16"


def test_the_grebt_update_backpropagates_through_bf16_hidden_states() -> None:
    grads = []
    for dtype in (torch.float32, torch.bfloat16):
        head = _head(2)
        own, prefixes, _ = _mixed_batch(dtype)
        rewards = score_rte(
            head, torch.randn(8, 8, generator=torch.Generator().manual_seed(4)), own, [0.6] * 8, prefixes
        )
        rewards.pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in head.parameters()]))
        assert all(p.grad.dtype == torch.float32 for p in head.parameters())
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.999, cos


def test_mixed_dtypes_in_one_batch_are_stacked_in_float32() -> None:
    h, mask = pad_hidden([torch.randn(2, P).bfloat16(), torch.randn(3, P)], None, torch.device("cpu"))
    assert h.dtype == torch.float32 and mask.sum() == 5


def test_backbone_chunks_bound_padding_and_return_rewards_in_input_order() -> None:
    from types import SimpleNamespace

    from r2m.service.backbone import Encoded
    from r2m.service.engine import ScoringEngine

    chunks: list[list[int]] = []

    def embed(batch: list[Encoded]) -> torch.Tensor:
        chunks.append([len(e) for e in batch])
        return torch.tensor([[float(len(e))] for e in batch])

    fake = SimpleNamespace(device=torch.device("cpu"), rm_dim=1, embed=embed)
    lengths = [100, 5, 6, 5, 101, 7, 5, 6]
    out = ScoringEngine.embed(SimpleNamespace(backbone=fake), [Encoded(list(range(n))) for n in lengths], 16384)
    assert out[:, 0].tolist() == [float(n) for n in lengths], "every RTE lands at its item's index"
    assert chunks == [[5, 5, 5, 6, 6, 7], [100, 101]], "short texts are not padded to the long ones' length"
    for chunk in chunks:
        assert sum(chunk) >= 0.8 * len(chunk) * max(chunk)
    chunks.clear()
    ScoringEngine.embed(SimpleNamespace(backbone=fake), [Encoded(list(range(10))) for _ in range(10)], 30)
    assert chunks == [[10, 10, 10]] * 3 + [[10]], "the token budget still caps a chunk"


@pytest.mark.parametrize("n_heads", [1, 2])
def test_serving_uses_fused_weights_that_equal_the_four_matrices(n_heads: int) -> None:
    """Eval + no autograd reads W_q W_k^T and W_v^T W_o^T (cached) instead of the four matrices; same read-out, with
    shared prefixes too, and the cache follows in-place weight changes."""
    torch.manual_seed(0)
    attn = FeedbackAttention(rm_dim=8, policy_dim=48, attn_dim=32, n_heads=n_heads).double()
    e, h = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 5, 48, dtype=torch.float64)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    prefixes, index = [torch.randn(3, 48, dtype=torch.float64)], torch.tensor([0, -1, 0, -1])
    want = attn(e, h, mask, prefixes, index).detach()  # training mode: the four matrices
    attn.eval()
    with torch.no_grad():
        got = attn(e, h, mask, prefixes, index)
        assert attn.fused() is not None and torch.allclose(got, want, atol=1e-10)
        attn.w_k.weight.mul_(2.0)  # an in-place change (a swap never does this, a test might)
        again = attn(e, h, mask, prefixes, index)
    attn.train()
    assert torch.allclose(again, attn(e, h, mask, prefixes, index).detach(), atol=1e-10)
    assert not torch.allclose(again, want)


def test_fused_weights_are_skipped_where_they_would_be_larger() -> None:
    attn = FeedbackAttention(rm_dim=64, policy_dim=64, attn_dim=16).eval()  # 64*64 > 16*(64+64)
    assert attn.fused() is None


# --- the read-out's scale at initialisation ---------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["default", "tiny_llama_rm"])
def test_the_scaled_init_reads_out_a_tenth_of_the_rte_on_any_backbone(fixture: str, request: pytest.FixtureRequest):
    from r2m.service.config import ServiceSettings
    from r2m.service.engine import build_engine
    from r2m.service.initial import readout_gain

    model = fixture if fixture == "default" else str(request.getfixturevalue(fixture))
    engine = build_engine(ServiceSettings(_env_file=None, model=model, policy_dim=256, attn_dim=64, device="cpu"))
    rte_norm = engine.backbone.reference_rte_norm()
    assert rte_norm == pytest.approx(1.0, rel=1e-4) if fixture == "default" else rte_norm > 1.5
    # For unit-RMS hidden states the read-out's norm is 0.1 of the RTE's (two significant digits, fp16 weights).
    assert readout_gain(engine.current.head) == pytest.approx(0.1 * rte_norm, rel=0.08)
    plain = build_engine(ServiceSettings(_env_file=None, model=model, policy_dim=256, attn_dim=64, device="cpu",
                                         attn_init="plain"))  # fmt: skip
    assert readout_gain(plain.current.head) > 3 * readout_gain(engine.current.head)


def test_the_zero_init_scores_w_times_the_plain_reward(tiny_llama_rm) -> None:  # noqa: ANN001
    from r2m.service.config import ServiceSettings
    from r2m.service.engine import PreparedItem, build_engine

    engine = build_engine(
        ServiceSettings(_env_file=None, model=str(tiny_llama_rm), policy_dim=16, attn_dim=8, device="cpu",
                        attn_init="zero")
    )  # fmt: skip
    enc = engine.backbone.encode("hello what is the answer", "the answer is good")
    plain = engine.score([PreparedItem(enc, None, 1.0)]).item()
    fed = engine.score([PreparedItem(enc, torch.randn(7, 16), 0.6)]).item()
    bias = float(engine.current.head.score.bias) if engine.current.head.score.bias is not None else 0.0
    assert fed == pytest.approx(0.6 * (plain - bias) + bias, rel=1e-5, abs=1e-6)


def test_pad_hidden_of_equal_lengths_writes_no_padding_and_one_item_is_not_copied() -> None:
    cpu = torch.device("cpu")
    same = [torch.randn(5, 8).bfloat16() for _ in range(3)]
    h, mask = pad_hidden(same, None, cpu)
    assert h.dtype == torch.bfloat16 and h.shape == (3, 5, 8) and bool(mask.all()) and mask.shape == (3, 5)
    assert all(torch.equal(h[i], same[i]) for i in range(3))
    one, mask1 = pad_hidden(same[:1], None, cpu)
    assert one.data_ptr() == same[0].data_ptr() and one.shape == (1, 5, 8) and bool(mask1.all())
    widened, _ = pad_hidden(same[:1], torch.float32, cpu)  # another dtype: a converted copy
    assert widened.dtype == torch.float32 and torch.equal(widened[0], same[0].float())
    ragged, mask2 = pad_hidden([same[0], torch.randn(2, 8).bfloat16()], None, cpu)
    assert ragged.shape == (2, 5, 8) and mask2.tolist()[1] == [True, True, False, False, False]
    assert not bool(ragged[1, 2:].any())
