"""The output layer and the per-token statistics in one chunked pass: never the full logits.

`token_stats` (objectives/logprobs.py) needs the logits, T*V values, and the lm_head's backward needs
their gradient, T*V more: at T=8192 and V=256,000 that is 16 GiB in float32. `fused_token_stats` takes
the final hidden states h (T, H) and the output embedding W (V, H) instead and walks the tokens in chunks
of `chunk_size`: per chunk it builds the chunk's logits, takes the statistics, and keeps only the
per-token logsumexp. The backward recomputes each chunk's logits from h and W and accumulates dh and dW,
so beyond h, W and dW it holds O(chunk_size * V) values at a time (docs/design.md §4).

Logits, as the Hugging Face models compute them: z = h W^T (+ b); z *= logit_scale (Cohere's
`logit_scale`; Granite divides by `logits_scaling`, i.e. logit_scale = 1 / logits_scaling); with a
softcap c (Gemma-2's `final_logit_softcapping`) z = c * tanh(z / c). The statistics are those of
`token_stats` (entropy in nats, top-k mass, top-k entropy in bits; Shi et al. 2024, arXiv:2410.11677),
plus sum_v p_v^2 (the "collision probability" of the next-token distribution, which WPO's weighting uses:
Zhou et al., "WPO: Enhancing RLHF with Weighted Preference Optimization", EMNLP 2024, Eq. 4).
Gradient flows through the log-prob only, as in `token_stats`: d logp_t / d z_t = onehot(label_t) - p_t.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from hdpo_ds.objectives.logprobs import TokenStats

__all__ = ["FusedKL", "fused_token_logps", "fused_token_stats", "fused_token_stats_kl"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_logits(h, weight, bias, logit_scale, softcap, cdtype):
    """(rows, V) logits of one chunk in the computation dtype; the product runs in the inputs' dtype, as
    the model's lm_head does, and is cast once."""
    z = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
    z = z.to(cdtype)
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _chunk_stats(x, labels, k, collision, out):
    """The statistics of one chunk's logits x (rows, V), written into `out` (views of the rows of logps,
    entropy, topk_mass, topk_entropy, log_sum_p2 and the logsumexp). Consumes x: it is the chunk's one
    (rows, V) buffer, overwritten in place."""
    logps, entropy, topk_mass, topk_entropy, log_sum_p2, lse_out = out
    label_logits = x.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    top = x.topk(k, dim=-1, sorted=False).values
    row_max = x.amax(dim=-1, keepdim=True)
    x.sub_(row_max).exp_()  # e = exp(x - max), in place
    sum_exp = x.sum(dim=-1)
    log_sum_exp = sum_exp.log()
    if collision:  # log sum_v p_v^2 = 2 (log |e| - log S); a norm needs no second (rows, V) buffer
        log_sum_p2.copy_(2.0 * (torch.linalg.vector_norm(x, dim=-1).log() - log_sum_exp))
    # entr(e) = -e (x - max): H = ln S + sum_v entr(e_v) / S (as token_stats computes it)
    torch.special.entr(x, out=x)
    entropy.copy_(log_sum_exp + x.sum(dim=-1) / sum_exp)
    lse = row_max.squeeze(-1) + log_sum_exp
    lse_out.copy_(lse)
    logps.copy_(label_logits - lse)
    top_lse = top.logsumexp(dim=-1)
    topk_mass.copy_((top_lse - lse).exp())
    q_log = top - top_lse.unsqueeze(-1)
    topk_entropy.copy_(-(q_log.exp() * q_log).sum(dim=-1) / math.log(2.0))


def _gradient_buffers(hidden, weight, bias, need_h, need_w, need_b):
    """[dh, dW, db] (None where not needed). dW and db accumulate in the weight's dtype: one (V, H)
    buffer, as the lm_head's own gradient is."""
    return [
        torch.empty_like(hidden) if need_h else None,
        torch.zeros_like(weight) if need_w else None,
        torch.zeros_like(bias) if need_b else None,
    ]


def _backward_chunk(x, scale, h, weight, rows, grads) -> None:
    """x (rows, V): d objective / d (scaled) logits of one chunk, the softcap's derivative already
    applied; consumed in place. Chains it through the scale into dz, then dh[rows] = dz W,
    dW += dz^T h, db += sum dz."""
    grad_h, grad_w, grad_b = grads
    if scale != 1.0:
        x.mul_(scale)
    grad_z = x.to(h.dtype)
    if grad_h is not None:
        torch.matmul(grad_z, weight, out=grad_h[rows])
    if grad_w is not None:
        grad_w.addmm_(grad_z.t(), h)
    if grad_b is not None:
        grad_b.add_(grad_z.sum(dim=0))


class _FusedHeadFunction(torch.autograd.Function):
    """Forward: per chunk, logits -> statistics, saving the logsumexp. Backward: per chunk, logits again,
    d logits = g (onehot - p), chained through softcap and scale into dh (chunk rows) and dW (summed)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, valid, top_k, chunk_size, logit_scale, softcap, collision):
        cdtype = _compute_dtype(hidden.dtype)
        n = hidden.shape[0]
        # Separate tensors, not views of one: autograd refuses in-place edits of a Function's view outputs.
        stats = [torch.zeros(n, dtype=cdtype, device=hidden.device) for _ in range(5)]
        logps, entropy, topk_mass, topk_entropy, log_sum_p2 = stats
        lse_all = torch.zeros(n, dtype=cdtype, device=hidden.device)
        k = min(top_k, weight.shape[0])
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            x = _chunk_logits(hidden[rows], weight, bias, logit_scale, softcap, cdtype)
            _chunk_stats(x, labels[rows], k, collision, [stat[rows] for stat in (*stats, lse_all)])
            del x
        for stat in stats:
            stat.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, bias, labels, valid, lse_all)
        ctx.chunk_size, ctx.logit_scale, ctx.softcap = chunk_size, logit_scale, softcap
        ctx.mark_non_differentiable(entropy, topk_mass, topk_entropy, log_sum_p2)
        return logps, entropy, topk_mass, topk_entropy, log_sum_p2

    @staticmethod
    def backward(ctx, grad_logps, *unused_grads):
        hidden, weight, bias, labels, valid, lse_all = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if not (need_h or need_w or need_b):
            return (None,) * 10
        cdtype = lse_all.dtype
        scale, softcap = ctx.logit_scale, ctx.softcap
        g = torch.where(valid, grad_logps.to(cdtype), torch.zeros((), dtype=cdtype, device=valid.device))
        grads = _gradient_buffers(hidden, weight, bias, need_h, need_w, need_b)
        n = hidden.shape[0]
        for start in range(0, n, ctx.chunk_size):
            rows = slice(start, min(start + ctx.chunk_size, n))
            h = hidden[rows]
            x = _chunk_logits(h, weight, bias, scale, softcap, cdtype)
            g_rows = g[rows].unsqueeze(-1)
            # d(c tanh(u/c))/du = 1 - tanh^2
            cap_grad = None if softcap is None else 1.0 - (x / softcap).square_()
            x.sub_(lse_all[rows].unsqueeze(-1)).exp_().mul_(-g_rows)  # -g p
            x.scatter_add_(-1, labels[rows].unsqueeze(-1), g_rows)  # g (onehot - p): d logp / d logits
            if cap_grad is not None:
                x.mul_(cap_grad)
                del cap_grad  # freed before the two products
            _backward_chunk(x, scale, h, weight, rows, grads)
            del x
        return (*grads, None, None, None, None, None, None, None)


def _row_dot(a, b):
    """sum_v a[r, v] * b[r, v] per row, without a (rows, V) product buffer."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class _FusedHeadKLFunction(torch.autograd.Function):
    """The policy's statistics and TDPO's per-token KL(ref || policy) from both heads, chunk by chunk.

    Forward, per chunk: the policy's logits A and the reference's B; B becomes log q, then q goes to a
    third buffer and B to log q - log p, so kl = sum_v q (log q - log p) is summed term by term (no
    cancellation between two large sums); then A gives the policy's statistics (`_chunk_stats`). Saved:
    both logsumexps. Backward: A and B again; d/dz [g_lp log p_y + g_kl kl] = g_lp (onehot - p) + g_kl (p - q)
    (sum_v q = 1), chained through the policy's softcap and scale. The reference gets no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, valid, settings):
        top_k, chunk_size, scale, softcap, ref_scale, ref_softcap, collision = settings
        cdtype = _compute_dtype(hidden.dtype)
        n = hidden.shape[0]
        outputs = [torch.zeros(n, dtype=cdtype, device=hidden.device) for _ in range(7)]
        _, entropy, topk_mass, topk_entropy, log_sum_p2, kl, ref_logps = outputs
        lse_all = torch.zeros(n, dtype=cdtype, device=hidden.device)
        ref_lse_all = torch.zeros(n, dtype=cdtype, device=hidden.device)
        k = min(top_k, weight.shape[0])
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            a = _chunk_logits(hidden[rows], weight, bias, scale, softcap, cdtype)
            b = _chunk_logits(ref_hidden[rows], ref_weight, ref_bias, ref_scale, ref_softcap, cdtype)
            lse, ref_lse = a.logsumexp(dim=-1), b.logsumexp(dim=-1)
            ref_lse_all[rows] = ref_lse
            b.sub_(ref_lse.unsqueeze(-1))  # log q
            ref_logps[rows] = b.gather(-1, labels[rows].unsqueeze(-1)).squeeze(-1)
            q = b.exp()
            b.sub_(a).add_(lse.unsqueeze(-1))  # log q - log p
            kl[rows] = _row_dot(q, b)
            del b, q
            _chunk_stats(a, labels[rows], k, collision, [o[rows] for o in (*outputs[:5], lse_all)])
            del a
        for out in outputs:
            out.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(
            hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, valid, lse_all, ref_lse_all
        )
        ctx.settings = settings
        ctx.mark_non_differentiable(entropy, topk_mass, topk_entropy, log_sum_p2, ref_logps)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_logps, _entropy, _mass, _topk_entropy, _p2, grad_kl, _ref_logps):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, valid, lse_all, ref_lse_all = (
            ctx.saved_tensors
        )
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if not (need_h or need_w or need_b):
            return (None,) * 9
        _, chunk_size, scale, softcap, ref_scale, ref_softcap, _ = ctx.settings
        cdtype = lse_all.dtype
        zero = torch.zeros((), dtype=cdtype, device=valid.device)
        g_lp = torch.where(valid, grad_logps.to(cdtype), zero) if grad_logps is not None else None
        g_kl = torch.where(valid, grad_kl.to(cdtype), zero) if grad_kl is not None else None
        grads = _gradient_buffers(hidden, weight, bias, need_h, need_w, need_b)
        n = hidden.shape[0]
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            h = hidden[rows]
            x = _chunk_logits(h, weight, bias, scale, softcap, cdtype)
            cap_grad = None if softcap is None else 1.0 - (x / softcap).square_()
            x.sub_(lse_all[rows].unsqueeze(-1)).exp_()  # p
            coef_p = torch.zeros(x.shape[0], dtype=cdtype, device=x.device)
            if g_lp is not None:
                coef_p -= g_lp[rows]
            if g_kl is not None:
                coef_p += g_kl[rows]
            x.mul_(coef_p.unsqueeze(-1))  # (g_kl - g_lp) p
            if g_kl is not None:
                q = _chunk_logits(ref_hidden[rows], ref_weight, ref_bias, ref_scale, ref_softcap, cdtype)
                q.sub_(ref_lse_all[rows].unsqueeze(-1)).exp_().mul_(g_kl[rows].unsqueeze(-1))
                x.sub_(q)  # - g_kl q
                del q
            if g_lp is not None:
                x.scatter_add_(-1, labels[rows].unsqueeze(-1), g_lp[rows].unsqueeze(-1))
            if cap_grad is not None:
                x.mul_(cap_grad)
                del cap_grad  # freed before the two products
            _backward_chunk(x, scale, h, weight, rows, grads)
            del x
        return (*grads, None, None, None, None, None, None)


def _check(hidden, weight, bias, labels, top_k, chunk_size):
    if hidden.dim() < 2 or hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden must be (..., T, H) with labels (..., T); got {tuple(hidden.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, H={hidden.shape[-1]}); got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be (V={weight.shape[0]},); got {tuple(bias.shape)}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a floating dtype")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def fused_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    top_k: int = 10,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    collision: bool = False,
) -> TokenStats:
    """Log-prob of each label and the distribution monitors, from hidden states and the output embedding.

    Args:
        hidden: (..., T, H) final hidden states (after the model's last norm); `hidden[..., t, :]`
            predicts `labels[..., t]` (already shifted). float16/bfloat16/float32/float64.
        weight: (V, H) output embedding (lm_head.weight, or the tied input embedding), hidden's dtype.
        labels: (..., T) integer token ids; positions equal to `ignore_index` are masked (0, no gradient).
        bias: optional (V,) output bias.
        logit_scale: multiplies the logits (Cohere's logit_scale; 1 / Granite's logits_scaling).
        softcap: Gemma-2's final_logit_softcapping c: logits = c * tanh(logits / c); None: none.
        top_k: k of the top-k statistics (clamped to V).
        chunk_size: tokens per chunk; extra memory is O(chunk_size * V), plus dW in the backward.
        collision: also compute `log_sum_p2` (log sum_v p_v^2, WPO's weight alignment); None otherwise.

    Returns:
        TokenStats(logps, entropy, topk_mass, topk_entropy, log_sum_p2), each shaped like `labels`,
        float32 (float64 for float64 inputs), 0 at masked positions. Only `logps` carries gradient, to
        `hidden`, `weight` and `bias`. Equals `token_stats` on the materialised logits.
    """
    _check(hidden, weight, bias, labels, top_k, chunk_size)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    safe_labels = torch.where(valid, flat_labels, torch.zeros_like(flat_labels))
    stats = _FusedHeadFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        safe_labels,
        valid,
        top_k,
        chunk_size,
        float(logit_scale),
        None if softcap is None else float(softcap),
        collision,
    )
    *monitors, log_sum_p2 = (s.view(labels.shape) for s in stats)
    return TokenStats(*monitors, log_sum_p2 if collision else None)


class FusedKL(NamedTuple):
    """What `fused_token_stats_kl` returns: the policy's TokenStats, TDPO's per-token KL(ref || policy)
    (differentiable in the policy's hidden states and head) and the reference's label log-probs."""

    stats: TokenStats
    kl: torch.Tensor
    reference_logps: torch.Tensor


def fused_token_stats_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    reference_hidden: torch.Tensor,
    reference_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    reference_bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    reference_logit_scale: float = 1.0,
    reference_softcap: float | None = None,
    top_k: int = 10,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    collision: bool = False,
) -> FusedKL:
    """`fused_token_stats` of the policy plus TDPO's token KL, both heads in the same token chunks.

    kl_t = sum_v q_t(v) (log q_t(v) - log p_t(v)), q the reference's and p the policy's next-token
    distribution (Zeng et al., "Token-level Direct Preference Optimization", ICML 2024, Sec. 4: the terms
    of D_SeqKL), as `objectives/logprobs.token_kl` computes it from the two logits tensors.

    Args:
        hidden, weight, bias, logit_scale, softcap: the policy's final hidden states (..., T, H), output
            embedding (V, H), bias and logit transform, as for `fused_token_stats`.
        reference_hidden, reference_weight, reference_bias, reference_logit_scale, reference_softcap: the
            reference's, same shapes (its own H is allowed; V must match); no gradient reaches them.
        labels: (..., T), already shifted; `ignore_index` positions are masked (0, no gradient).

    Returns:
        FusedKL(stats, kl, reference_logps), each tensor shaped like `labels`, float32 (float64 for
        float64 inputs), 0 at masked positions. Gradient flows from `stats.logps` and `kl` to `hidden`,
        `weight` and `bias`. Beyond both heads' inputs it holds three (chunk_size, V) buffers in the
        forward and two in the backward (three with a softcap).
    """
    _check(hidden, weight, bias, labels, top_k, chunk_size)
    _check(reference_hidden, reference_weight, reference_bias, labels, top_k, chunk_size)
    if reference_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"the reference's vocabulary ({reference_weight.shape[0]}) differs from the policy's "
            f"({weight.shape[0]})"
        )
    for name, cap in (("softcap", softcap), ("reference_softcap", reference_softcap)):
        if cap is not None and not cap > 0:
            raise ValueError(f"{name} must be > 0 or None, got {cap}")
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    safe_labels = torch.where(valid, flat_labels, torch.zeros_like(flat_labels))
    settings = (
        top_k,
        chunk_size,
        float(logit_scale),
        None if softcap is None else float(softcap),
        float(reference_logit_scale),
        None if reference_softcap is None else float(reference_softcap),
        collision,
    )
    out = _FusedHeadKLFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        reference_hidden.reshape(-1, reference_hidden.shape[-1]).detach(),
        reference_weight.detach(),
        None if reference_bias is None else reference_bias.detach(),
        safe_labels,
        valid,
        settings,
    )
    logps, entropy, topk_mass, topk_entropy, log_sum_p2, kl, ref_logps = (o.view(labels.shape) for o in out)
    stats = TokenStats(logps, entropy, topk_mass, topk_entropy, log_sum_p2 if collision else None)
    return FusedKL(stats, kl, ref_logps)


@torch.no_grad()
def fused_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_size: int = 1024,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Log-prob of each label only, without gradient (the reference pass's share): `token_logps` on the
    logits `fused_token_stats` would build, one (chunk_size, V) buffer at a time. Shapes as there."""
    _check(hidden, weight, bias, labels, 1, chunk_size)
    cdtype = _compute_dtype(hidden.dtype)
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    safe_labels = torch.where(valid, flat_labels, torch.zeros_like(flat_labels))
    out = torch.zeros(flat_labels.numel(), dtype=cdtype, device=hidden.device)
    for start in range(0, flat_h.shape[0], chunk_size):
        rows = slice(start, min(start + chunk_size, flat_h.shape[0]))
        x = _chunk_logits(flat_h[rows], weight, bias, float(logit_scale), softcap, cdtype)
        out[rows] = x.gather(-1, safe_labels[rows].unsqueeze(-1)).squeeze(-1) - x.logsumexp(dim=-1)
        del x
    return out.masked_fill_(~valid, 0.0).view(labels.shape)
