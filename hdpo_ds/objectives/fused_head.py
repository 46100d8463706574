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

import torch

from hdpo_ds.objectives.logprobs import TokenStats

__all__ = ["fused_token_logps", "fused_token_stats"]


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
            label_logits = x.gather(-1, labels[rows].unsqueeze(-1)).squeeze(-1)
            top = x.topk(k, dim=-1, sorted=False).values
            row_max = x.amax(dim=-1, keepdim=True)
            x.sub_(row_max).exp_()  # e = exp(x - max), in place: the chunk's one (rows, V) buffer
            sum_exp = x.sum(dim=-1)
            if collision:  # log sum_v p_v^2 = 2 (log |e| - log S); a norm needs no second (rows, V) buffer
                log_sum_p2[rows] = 2.0 * (torch.linalg.vector_norm(x, dim=-1).log() - sum_exp.log())
            # entr(e) = -e (x - max): H = ln S + sum_v entr(e_v) / S (as token_stats computes it)
            torch.special.entr(x, out=x)
            log_sum_exp = sum_exp.log()
            entropy[rows] = log_sum_exp + x.sum(dim=-1) / sum_exp
            del x
            lse = row_max.squeeze(-1) + log_sum_exp
            lse_all[rows] = lse
            logps[rows] = label_logits - lse
            top_lse = top.logsumexp(dim=-1)
            topk_mass[rows] = (top_lse - lse).exp()
            q_log = top - top_lse.unsqueeze(-1)
            topk_entropy[rows] = -(q_log.exp() * q_log).sum(dim=-1) / math.log(2.0)
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
            return (None,) * 9
        cdtype = lse_all.dtype
        scale, softcap = ctx.logit_scale, ctx.softcap
        g = torch.where(valid, grad_logps.to(cdtype), torch.zeros((), dtype=cdtype, device=valid.device))
        grad_h = torch.empty_like(hidden) if need_h else None
        # dW and db accumulate in the weight's dtype: one (V, H) buffer, as the lm_head's own gradient is.
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        n = hidden.shape[0]
        for start in range(0, n, ctx.chunk_size):
            rows = slice(start, min(start + ctx.chunk_size, n))
            h = hidden[rows]
            x = _chunk_logits(h, weight, bias, scale, softcap, cdtype)
            g_rows = g[rows].unsqueeze(-1)
            if softcap is not None:
                cap_grad = 1.0 - (x / softcap).square_()  # d(c tanh(u/c))/du = 1 - tanh^2
            x.sub_(lse_all[rows].unsqueeze(-1)).exp_().mul_(-g_rows)  # -g p
            x.scatter_add_(-1, labels[rows].unsqueeze(-1), g_rows)  # g (onehot - p): d logp / d logits
            if softcap is not None:
                x.mul_(cap_grad)
                del cap_grad
            if scale != 1.0:
                x.mul_(scale)
            grad_z = x.to(hidden.dtype)
            del x
            if need_h:
                torch.matmul(grad_z, weight, out=grad_h[rows])
            if need_w:
                grad_w.addmm_(grad_z.t(), h)
            if need_b:
                grad_b.add_(grad_z.sum(dim=0))
            del grad_z
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


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
