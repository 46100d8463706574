"""token_stats against a naive full-vocabulary float64 computation; gradients; segment sums."""

from __future__ import annotations

import math

import pytest
import torch

from hdpo_ds.objectives.logprobs import segment_sums, token_stats

IGNORE = -100


def naive_stats(logits: torch.Tensor, labels: torch.Tensor, top_k: int):
    """The obvious float64 computation with a full log_softmax over the vocabulary."""
    x = logits.double()
    logp = torch.log_softmax(x, dim=-1)
    p = logp.exp()
    valid = labels != IGNORE
    safe = labels.clamp(min=0)
    lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    entropy = -(p * logp).sum(-1)
    k = min(top_k, x.shape[-1])
    top_p = p.topk(k, dim=-1).values
    mass = top_p.sum(-1)
    q = top_p / mass.unsqueeze(-1)
    topk_entropy = -(q * torch.log2(q)).sum(-1)
    log_sum_p2 = (p * p).sum(-1).log()
    zero = torch.zeros((), dtype=torch.float64)
    return [torch.where(valid, s, zero) for s in (lp, entropy, mass, topk_entropy, log_sum_p2)]


def _random_case(t, v, seed, scale=3.0, batch=2, masked_fraction=0.3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, t, v, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, v, (batch, t), generator=g)
    labels[torch.rand(batch, t, generator=g) < masked_fraction] = IGNORE
    return logits, labels


# T=12 tokens per row: chunk sizes 1, 5, 7 do not divide it (nor the 24 flattened rows); 4, 12 do.
CASES = [(v, chunk) for v in (1, 2, 17, 50, 257) for chunk in (1, 4, 5, 7, 12, 1000)]


@pytest.mark.parametrize(("vocab", "chunk"), CASES)
def test_float64_matches_naive(vocab, chunk):
    logits, labels = _random_case(12, vocab, seed=vocab * 31 + chunk)
    got = token_stats(logits, labels, top_k=10, chunk_size=chunk, collision=True)
    for name, g, e in zip(
        ("logps", "entropy", "topk_mass", "topk_entropy", "log_sum_p2"),
        got,
        naive_stats(logits, labels, 10),
        strict=True,
    ):
        assert g.dtype == torch.float64 and g.shape == labels.shape
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(("vocab", "chunk"), [(50, 5), (257, 7), (1000, 16)])
def test_float32_matches_naive(vocab, chunk):
    logits, labels = _random_case(20, vocab, seed=vocab + chunk, scale=5.0)
    x = logits.float()
    got = token_stats(x, labels, top_k=10, chunk_size=chunk, collision=True)
    for g, e in zip(got, naive_stats(x, labels, 10), strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_naive_on_rounded_logits(dtype):
    """Stated tolerance: rtol=atol=1e-5 against float64 on the same rounded logits. The rounding is
    the input's; the computation itself is float32, so only float32 arithmetic error remains."""
    logits, labels = _random_case(20, 300, seed=7, scale=4.0)
    x = logits.to(dtype)
    got = token_stats(x, labels, top_k=10, chunk_size=6, collision=True)
    for g, e in zip(got, naive_stats(x, labels, 10), strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5)


def test_masked_positions_are_zero_and_topk_entropy_in_range():
    logits, labels = _random_case(16, 64, seed=3, masked_fraction=0.5)
    got = token_stats(logits, labels, top_k=8, chunk_size=5, collision=True)
    masked = labels == IGNORE
    assert masked.any() and (~masked).any()
    for s in got:
        assert (s[masked] == 0).all()
    e = got.topk_entropy[~masked]
    assert (e >= 0).all() and (e <= math.log2(8) + 1e-12).all()
    m = got.topk_mass[~masked]
    assert (m > 0).all() and (m <= 1 + 1e-12).all()


def test_uniform_distribution_hand_worked():
    """Uniform logits over V=16: logp = -ln 16 = -2.7725887, H = ln 16, top-4 mass = 4/16 = 0.25,
    top-4 entropy = log2 4 = 2 bits, log sum p^2 = log(16 / 16^2) = -ln 16."""
    logits = torch.zeros(1, 3, 16, dtype=torch.float64)
    labels = torch.tensor([[0, 5, IGNORE]])
    got = token_stats(logits, labels, top_k=4, chunk_size=2, collision=True)
    expected = [
        [-math.log(16), -math.log(16), 0.0],
        [math.log(16), math.log(16), 0.0],
        [0.25, 0.25, 0.0],
        [2.0, 2.0, 0.0],
        [-math.log(16), -math.log(16), 0.0],
    ]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, torch.tensor([e], dtype=torch.float64), rtol=0, atol=1e-12)


def test_the_collision_term_is_computed_only_when_asked_and_changes_nothing_else():
    logits, labels = _random_case(10, 33, seed=9)
    with_p2 = token_stats(logits, labels, chunk_size=3, collision=True)
    without = token_stats(logits, labels, chunk_size=3)
    assert without.log_sum_p2 is None and with_p2.log_sum_p2 is not None
    for a, b in zip(with_p2[:4], without[:4], strict=True):
        assert torch.equal(a, b)


def test_only_logps_carry_gradient():
    logits, labels = _random_case(6, 9, seed=4)
    logits.requires_grad_()
    got = token_stats(logits, labels, chunk_size=4, collision=True)
    assert got.logps.requires_grad
    assert not got.entropy.requires_grad
    assert not got.topk_mass.requires_grad
    assert not got.topk_entropy.requires_grad
    assert not got.log_sum_p2.requires_grad


@pytest.mark.parametrize(("t", "v", "chunk"), [(5, 17, 2), (4, 3, 3), (5, 1, 4), (3, 17, 10)])
def test_gradcheck_float64(t, v, chunk):
    logits, labels = _random_case(t, v, seed=t * v, batch=2)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: token_stats(x, labels, top_k=3, chunk_size=chunk).logps, (logits,), eps=1e-6, atol=1e-8
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_naive_autograd(dtype):
    logits, labels = _random_case(13, 70, seed=11)
    weights = torch.randn(labels.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = logits.to(dtype).requires_grad_()
    (token_stats(x, labels, chunk_size=4).logps.double() * weights).sum().backward()
    ref = x.detach().double().requires_grad_()
    (naive_stats(ref, labels, 10)[0] * weights).sum().backward()
    assert x.grad.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
    torch.testing.assert_close(x.grad.double(), ref.grad, **tol)
    assert (x.grad[labels == IGNORE] == 0).all()


def test_non_contiguous_shifted_view_equals_contiguous_copy():
    """The usual call shifts: logits[:, :-1] predicts input_ids[:, 1:]. That view is not flattenable
    without a copy when the batch has several rows; results and gradients must not depend on it."""
    logits, labels = _random_case(9, 40, seed=5, batch=3)
    a = logits.clone().requires_grad_()
    b = logits[:, :-1].contiguous().requires_grad_()
    view = a[:, :-1]
    assert not view.is_contiguous()
    got_view = token_stats(view, labels[:, 1:], chunk_size=3, collision=True)
    got_copy = token_stats(b, labels[:, 1:], chunk_size=3, collision=True)
    for g, e in zip(got_view, got_copy, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    got_view.logps.sum().backward()
    got_copy.logps.sum().backward()
    torch.testing.assert_close(a.grad[:, :-1], b.grad, rtol=0, atol=0)
    assert (a.grad[:, -1] == 0).all()


def test_shape_errors():
    with pytest.raises(ValueError, match=r"logits must be \(\.\.\., T, V\)"):
        token_stats(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="floating"):
        token_stats(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long))


def test_segment_sums_matches_python_loop():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(1, 40, generator=g, dtype=torch.float32, requires_grad=True)
    seq_index = torch.tensor([[0] * 7 + [1] * 12 + [2] * 3 + [4] * 10 + [-1] * 8])
    mask = torch.rand(1, 40, generator=g) > 0.3
    got = segment_sums(values, seq_index, 5, mask=mask, dtype=torch.float64)
    expected_sums = [0.0] * 5
    expected_counts = [0] * 5
    for v, s, m in zip(values[0].tolist(), seq_index[0].tolist(), mask[0].tolist(), strict=True):
        if s >= 0 and m:
            expected_sums[s] += v
            expected_counts[s] += 1
    assert got.sums.dtype == torch.float64
    torch.testing.assert_close(
        got.sums, torch.tensor(expected_sums, dtype=torch.float64), rtol=1e-12, atol=1e-12
    )
    assert got.counts.tolist() == expected_counts
    assert expected_counts[3] == 0  # an empty segment sums to 0
    got.sums.sum().backward()
    expected_grad = ((seq_index >= 0) & mask).float()
    torch.testing.assert_close(values.grad, expected_grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_token_logps_equals_token_stats_logps(dtype):
    from hdpo_ds.objectives.logprobs import token_logps

    logits, labels = _random_case(11, 90, seed=13)
    x = logits.to(dtype)
    got = token_logps(x[:, :-1], labels[:, 1:], chunk_size=4)
    expected = token_stats(x[:, :-1], labels[:, 1:], chunk_size=4).logps
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)
    assert not got.requires_grad and (got[labels[:, 1:] == IGNORE] == 0).all()
