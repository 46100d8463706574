"""fused_token_stats against today's path: the materialised logits (h W^T + b, scaled, softcapped) through
token_stats; per-token values and gradients w.r.t. hidden states, weight and bias; gradcheck in float64."""

from __future__ import annotations

import pytest
import torch

from hdpo_ds.objectives.fused_head import fused_token_logps, fused_token_stats, fused_token_stats_kl
from hdpo_ds.objectives.logprobs import token_kl, token_logps, token_stats

IGNORE = -100
RTOL, ATOL = 1e-5, 1e-6  # the atol floor of tests/test_trainer.py's comparisons


def _case(batch, t, hidden, vocab, seed, dtype=torch.float32, masked_fraction=0.3, with_bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, t, hidden, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g, dtype=torch.float64) / hidden**0.5 * 3).to(dtype)
    b = torch.randn(vocab, generator=g, dtype=torch.float64).to(dtype) if with_bias else None
    labels = torch.randint(0, vocab, (batch, t), generator=g)
    labels[torch.rand(batch, t, generator=g) < masked_fraction] = IGNORE
    return h, w, b, labels


def _logits(h, w, b, logit_scale, softcap):
    """The model's own computation (Cohere: logits * logit_scale; Gemma-2: c * tanh(logits / c))."""
    z = torch.nn.functional.linear(h, w, b) * logit_scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _both(h, w, b, labels, *, logit_scale=1.0, softcap=None, chunk=5, top_k=4):
    """(fused stats, its grads) and (token_stats on the logits, its grads) for a loss that weighs every
    token's log-prob differently, so that a wrong row or chunk shows in the gradient."""
    weights = torch.linspace(-1.0, 2.0, labels.numel(), dtype=h.dtype).view(labels.shape)
    out = []
    for fused in (True, False):
        leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in (h, w, b)]
        hh, ww, bb = leaves
        if fused:
            stats = fused_token_stats(
                hh,
                ww,
                labels,
                bias=bb,
                logit_scale=logit_scale,
                softcap=softcap,
                top_k=top_k,
                chunk_size=chunk,
                collision=True,
            )
        else:
            stats = token_stats(
                _logits(hh, ww, bb, logit_scale, softcap),
                labels,
                top_k=top_k,
                chunk_size=chunk,
                collision=True,
            )
        (stats.logps * weights).sum().backward()
        out.append((stats, [x.grad if x is not None else None for x in leaves]))
    return out


# T=12 per row, 2 rows: chunk sizes 5 and 7 divide neither 12 nor the 24 flattened rows; 4, 12, 24 do.
@pytest.mark.parametrize("chunk", [1, 4, 5, 7, 12, 24, 1000])
@pytest.mark.parametrize(
    ("logit_scale", "softcap", "with_bias"),
    [(1.0, None, False), (0.0625, None, False), (1.0, 3.0, False), (0.5, 2.0, True)],
    ids=["plain", "cohere_scale", "gemma2_softcap", "bias_scale_softcap"],
)
def test_float32_equals_logits_path(chunk, logit_scale, softcap, with_bias):
    h, w, b, labels = _case(2, 12, 16, 37, seed=chunk, with_bias=with_bias)
    (fused, fused_grads), (ref, ref_grads) = _both(
        h, w, b, labels, logit_scale=logit_scale, softcap=softcap, chunk=chunk
    )
    for name in ("logps", "entropy", "topk_mass", "topk_entropy", "log_sum_p2"):
        got, want = getattr(fused, name), getattr(ref, name)
        assert got.dtype == torch.float32 and got.shape == labels.shape
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
    for name, got, want in zip(("dh", "dW", "db"), fused_grads, ref_grads, strict=True):
        if want is None:
            assert got is None
            continue
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
    masked = labels == IGNORE
    assert masked.any() and (fused.logps[masked] == 0).all() and (fused.log_sum_p2[masked] == 0).all()
    assert (fused_grads[0][masked] == 0).all()  # a masked token sends no gradient to its hidden state


def test_log_sum_p2_and_values_against_float64_softmax():
    h, w, b, labels = _case(1, 9, 8, 23, seed=3, dtype=torch.float64, with_bias=True)
    stats = fused_token_stats(
        h, w, labels, bias=b, logit_scale=0.7, softcap=4.0, top_k=3, chunk_size=4, collision=True
    )
    p = torch.softmax(_logits(h, w, b, 0.7, 4.0), dim=-1)
    valid = labels != IGNORE
    want = torch.where(valid, p.square().sum(-1).log(), torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(stats.log_sum_p2, want, rtol=0, atol=1e-12)
    assert fused_token_stats(h, w, labels, chunk_size=4).log_sum_p2 is None
    assert not stats.log_sum_p2.requires_grad and not stats.entropy.requires_grad


def test_tied_embeddings_gradient_sums_both_uses():
    """A tied model uses one matrix as input embedding and output head: its gradient is the sum of the
    embedding lookup's and the head's, the same on both paths."""
    g = torch.Generator().manual_seed(7)
    vocab, hidden = 29, 12
    ids = torch.randint(0, vocab, (2, 10), generator=g)
    labels = torch.randint(0, vocab, (2, 10), generator=g)
    labels[:, :3] = IGNORE
    w0 = torch.randn(vocab, hidden, generator=g)
    mix = torch.randn(hidden, hidden, generator=g) / hidden**0.5
    grads = []
    for fused in (True, False):
        w = w0.clone().requires_grad_(True)
        h = torch.tanh(torch.nn.functional.embedding(ids, w) @ mix)  # a stand-in decoder
        if fused:
            logps = fused_token_stats(h, w, labels, chunk_size=6).logps
        else:
            logps = token_stats(h @ w.t(), labels, chunk_size=6).logps
        logps.sum().backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("softcap", "with_bias"), [(None, False), (2.5, True)])
def test_gradcheck_float64(softcap, with_bias):
    h, w, b, labels = _case(2, 5, 4, 7, seed=11, dtype=torch.float64, with_bias=with_bias)
    inputs = [h.requires_grad_(True), w.requires_grad_(True)]
    if with_bias:
        inputs.append(b.requires_grad_(True))

    def f(*args):
        bias = args[2] if with_bias else None
        return fused_token_stats(
            args[0], args[1], labels, bias=bias, logit_scale=0.8, softcap=softcap, chunk_size=3
        ).logps

    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-8)


def test_no_grad_logps_equal_token_logps():
    h, w, b, labels = _case(2, 12, 16, 37, seed=5, with_bias=True)
    got = fused_token_logps(h, w, labels, bias=b, logit_scale=0.5, softcap=3.0, chunk_size=5)
    want = token_logps(_logits(h, w, b, 0.5, 3.0), labels, chunk_size=5)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(
        got, fused_token_stats(h, w, labels, bias=b, logit_scale=0.5, softcap=3.0, chunk_size=7).logps
    )


def test_bfloat16_close_to_logits_path():
    """Low precision: the product runs in bf16 as lm_head's does, the statistics in float32; the weight
    gradient accumulates chunk by chunk in bf16, so only closeness is claimed."""
    h, w, b, labels = _case(2, 12, 16, 37, seed=9, dtype=torch.bfloat16)
    (fused, fused_grads), (ref, ref_grads) = _both(h, w, b, labels, chunk=5)
    torch.testing.assert_close(fused.logps, ref.logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_grads[0].float(), ref_grads[0].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused_grads[1].float(), ref_grads[1].float(), rtol=2e-2, atol=2e-2)


def test_refuses_bad_shapes_and_arguments():
    h, w, _, labels = _case(1, 4, 8, 11, seed=1)
    with pytest.raises(ValueError, match="weight must be"):
        fused_token_stats(h, w[:, :4], labels)
    with pytest.raises(ValueError, match="labels"):
        fused_token_stats(h, w, labels[:, :3])
    with pytest.raises(TypeError, match="share a floating dtype"):
        fused_token_stats(h, w.double(), labels)
    with pytest.raises(ValueError, match="softcap"):
        fused_token_stats(h, w, labels, softcap=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_token_stats(h, w, labels, chunk_size=0)


# TDPO: the policy's statistics and the token KL from both heads together (fused_token_stats_kl) against
# token_stats, token_kl and token_logps on the two materialised logits tensors.


def _kl_case(seed, dtype=torch.float32, ref_hidden=10, with_bias=True):
    h, w, b, labels = _case(2, 12, 16, 37, seed=seed, dtype=dtype, with_bias=with_bias)
    hr, wr, br, _ = _case(2, 12, ref_hidden, 37, seed=seed + 100, dtype=dtype, with_bias=with_bias)
    return h, w, b, hr, wr, br, labels


def _kl_both(case, *, policy_transform=(1.0, None), reference_transform=(1.0, None), chunk=5, top_k=4):
    """(fused outputs, grads of h, W, b) and (logits-path outputs, grads) for a loss weighing every
    token's log-prob and KL differently."""
    h, w, b, hr, wr, br, labels = case
    lp_weights = torch.linspace(-1.0, 2.0, labels.numel(), dtype=h.dtype).view(labels.shape)
    kl_weights = torch.linspace(1.5, -0.5, labels.numel(), dtype=h.dtype).view(labels.shape)
    out = []
    for fused in (True, False):
        leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in (h, w, b)]
        hh, ww, bb = leaves
        if fused:
            res = fused_token_stats_kl(
                hh,
                ww,
                hr,
                wr,
                labels,
                bias=bb,
                reference_bias=br,
                logit_scale=policy_transform[0],
                softcap=policy_transform[1],
                reference_logit_scale=reference_transform[0],
                reference_softcap=reference_transform[1],
                top_k=top_k,
                chunk_size=chunk,
                collision=True,
            )
            stats, kl, ref_logps = res.stats, res.kl, res.reference_logps
        else:
            logits = _logits(hh, ww, bb, *policy_transform)
            ref_logits = _logits(hr, wr, br, *reference_transform)
            stats = token_stats(logits, labels, top_k=top_k, chunk_size=chunk, collision=True)
            kl = token_kl(logits, ref_logits, labels, chunk_size=chunk)
            ref_logps = token_logps(ref_logits, labels, chunk_size=chunk)
        ((stats.logps * lp_weights).sum() + (kl * kl_weights).sum()).backward()
        out.append(((stats, kl, ref_logps), [x.grad if x is not None else None for x in leaves]))
    return out


@pytest.mark.parametrize("chunk", [1, 5, 7, 24, 1000])
@pytest.mark.parametrize(
    ("policy_transform", "reference_transform"),
    [((1.0, None), (1.0, None)), ((0.0625, None), (0.5, None)), ((1.0, 3.0), (0.7, 2.0))],
    ids=["plain", "scales", "softcaps"],
)
def test_kl_float32_equals_logits_path(chunk, policy_transform, reference_transform):
    case = _kl_case(seed=chunk)
    labels = case[-1]
    ((stats, kl, ref_lp), grads), ((want_stats, want_kl, want_ref_lp), want_grads) = _kl_both(
        case, policy_transform=policy_transform, reference_transform=reference_transform, chunk=chunk
    )
    for name in ("logps", "entropy", "topk_mass", "topk_entropy", "log_sum_p2"):
        torch.testing.assert_close(
            getattr(stats, name),
            getattr(want_stats, name),
            rtol=RTOL,
            atol=ATOL,
            msg=lambda m, n=name: f"{n}: {m}",
        )
    torch.testing.assert_close(kl, want_kl, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ref_lp, want_ref_lp, rtol=RTOL, atol=ATOL)
    for name, got, want in zip(("dh", "dW", "db"), grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
    masked = labels == IGNORE
    assert (kl[masked] == 0).all() and (ref_lp[masked] == 0).all() and (grads[0][masked] == 0).all()
    assert (kl[~masked] > 0).all()


def test_kl_of_the_same_head_is_zero_and_its_gradient_is_the_logps_alone():
    """Policy == reference: every token's KL is 0 (to float32 rounding) and the KL adds no gradient."""
    h, w, b, labels = _case(2, 12, 16, 37, seed=4, with_bias=True)
    res = fused_token_stats_kl(
        h, w.requires_grad_(True), h, w.detach(), labels, bias=b, reference_bias=b, chunk_size=5
    )
    torch.testing.assert_close(res.kl, torch.zeros_like(res.kl), rtol=0, atol=1e-6)
    (res.stats.logps.sum() + res.kl.sum()).backward()
    plain = w.detach().clone().requires_grad_(True)
    fused_token_stats(h, plain, labels, bias=b, chunk_size=5).logps.sum().backward()
    torch.testing.assert_close(w.grad, plain.grad, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(res.reference_logps, res.stats.logps.detach(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("softcap", [None, 2.5])
def test_kl_gradcheck_float64(softcap):
    h, w, b, hr, wr, br, labels = _kl_case(seed=12, dtype=torch.float64)
    h, w, b, hr, wr, br = (x[..., :5, :] if x.dim() == 3 else x for x in (h, w, b, hr, wr, br))
    labels = labels[:, :5]
    w, wr, b, br = w[:7, :], wr[:7, :], b[:7], br[:7]
    labels = labels.clamp(max=6).masked_fill(labels == IGNORE, IGNORE)
    labels[0, 0] = IGNORE
    inputs = (
        h.requires_grad_(True),
        w.contiguous().requires_grad_(True),
        b.contiguous().requires_grad_(True),
    )

    def f(hh, ww, bb):
        res = fused_token_stats_kl(
            hh, ww, hr, wr, labels, bias=bb, reference_bias=br, logit_scale=0.8, softcap=softcap, chunk_size=3
        )
        return res.stats.logps, res.kl

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8)


def test_kl_refuses_a_vocabulary_mismatch():
    h, w, _, hr, wr, _, labels = _kl_case(seed=2, with_bias=False)
    with pytest.raises(ValueError, match="vocabulary"):
        fused_token_stats_kl(h, w, hr, torch.cat([wr, wr[:1]]), labels)
