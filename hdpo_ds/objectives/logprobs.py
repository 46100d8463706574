"""Token log-probs, the over-optimisation monitors, and per-sequence segment sums.

Logits for T tokens over a vocabulary of V entries are T*V values: at T=8192, V=256k that is 8 GiB in
float32. Nothing here builds a second tensor of that size: `token_stats` walks the tokens in chunks,
so forward and backward need O(chunk_size * V) floats beyond the logits and their gradient
(docs/design.md §4).

Monitors per response token t, from the next-token distribution p = softmax(logits_t):
- entropy H_t = -sum_v p_v ln p_v (nats);
- top-k mass M_t = sum of the k largest p_v;
- top-k entropy E_t = -sum_i q_i log2 q_i, q = the top-k probabilities renormalised (bits, in [0, log2 k]);
- log collision probability C_t = log sum_v p_v^2 (WPO's weight alignment needs it; -C_t is the
  Renyi entropy of order 2).
Shi et al., "Understanding Likelihood Over-optimisation in Direct Alignment Algorithms" (2024,
arXiv:2410.11677) use the top-k entropy and top-k mass as early signs of likelihood over-optimisation.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch

__all__ = ["SegmentSums", "TokenStats", "segment_sums", "token_kl", "token_logps", "token_stats"]


class TokenStats(NamedTuple):
    """Per-token statistics, each shaped like `labels`; 0 where the label is `ignore_index`."""

    logps: torch.Tensor
    entropy: torch.Tensor
    topk_mass: torch.Tensor
    topk_entropy: torch.Tensor
    # log sum_v p_v^2, the log collision probability of the next-token distribution (WPO's weight
    # alignment, objectives/modifiers.py): -log_sum_p2 is its Renyi-2 entropy. None unless asked for.
    log_sum_p2: torch.Tensor | None = None


class SegmentSums(NamedTuple):
    """Per-sequence sums, shape (num_segments,), and the number of tokens that entered each sum."""

    sums: torch.Tensor
    counts: torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_blocks(t: torch.Tensor) -> list[torch.Tensor]:
    """2-D views (rows, V) of a (..., T, V) tensor that together cover its rows in row-major order.

    Flattening a non-contiguous tensor, such as `logits[:, :-1]` for a batch of several rows, would
    copy it whole; walking its leading dimensions keeps every block a view.
    """
    vocab = t.shape[-1]
    if t.dim() == 2:
        return [t]
    try:
        return [t.view(-1, vocab)]
    except RuntimeError:
        return [t[index] for index in itertools.product(*(range(n) for n in t.shape[:-2]))]


def _chunk_ranges(blocks: list[torch.Tensor], chunk_size: int):
    """Yield (block, start, stop, flat_offset) over chunks of at most chunk_size rows."""
    offset = 0
    for block in blocks:
        rows = block.shape[0]
        for start in range(0, rows, chunk_size):
            stop = min(start + chunk_size, rows)
            yield block, start, stop, offset + start
        offset += rows


class _TokenStatsFunction(torch.autograd.Function):
    """Chunked forward of all four statistics; the backward recomputes softmax chunk by chunk."""

    @staticmethod
    def forward(ctx, logits, labels, valid, top_k, chunk_size, collision):
        cdtype = _compute_dtype(logits.dtype)
        n = labels.numel()
        logps = torch.zeros(n, dtype=cdtype, device=logits.device)
        entropy = torch.zeros_like(logps)
        topk_mass = torch.zeros_like(logps)
        topk_entropy = torch.zeros_like(logps)
        # an empty tensor when not asked for: the extra reduction costs ~9% of this forward
        log_sum_p2 = torch.zeros_like(logps) if collision else logps.new_zeros(0)
        lse_all = torch.zeros_like(logps)
        k = min(top_k, logits.shape[-1])
        for block, start, stop, flat in _chunk_ranges(_row_blocks(logits), chunk_size):
            x = block[start:stop]
            rows = slice(flat, flat + stop - start)
            row_max = x.amax(dim=-1, keepdim=True).to(cdtype)
            # One (chunk, V) buffer in the computation dtype, then only in-place ops on it: a mixed-dtype
            # `x - row_max` would cast x into a second temporary on CPU.
            buf = x.to(cdtype, copy=True).sub_(row_max)
            buf.exp_()
            sum_exp = buf.sum(dim=-1)
            # sum_v p_v^2 = |e|^2 / S^2; a norm reduction needs no second (chunk, V) buffer, and the
            # largest e is 1, so |e| >= 1 never underflows
            norm_e = torch.linalg.vector_norm(buf, dim=-1) if collision else None
            # entr(e) = -e ln e = -e (x - max): sum_v entr(e_v) / S = -sum_v p_v (x_v - max) + 0,
            # so H = ln S + sum entr(e) / S, computed in place on the same buffer.
            torch.special.entr(buf, out=buf)
            log_sum_exp = sum_exp.log()
            if collision:
                log_sum_p2[rows] = 2.0 * (norm_e.log() - log_sum_exp)
            entropy[rows] = log_sum_exp + buf.sum(dim=-1) / sum_exp
            del buf
            lse = row_max.squeeze(-1) + log_sum_exp
            lse_all[rows] = lse
            label_logits = x.gather(-1, labels[rows].unsqueeze(-1)).squeeze(-1).to(cdtype)
            logps[rows] = label_logits - lse
            top = x.topk(k, dim=-1, sorted=False).values.to(cdtype)
            top_lse = top.logsumexp(dim=-1)
            topk_mass[rows] = (top_lse - lse).exp()
            q_log = top - top_lse.unsqueeze(-1)
            topk_entropy[rows] = -(q_log.exp() * q_log).sum(dim=-1) / math.log(2.0)
        for stat in (logps, entropy, topk_mass, topk_entropy, *((log_sum_p2,) if collision else ())):
            stat.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(logits, labels, valid, lse_all)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(entropy, topk_mass, topk_entropy, log_sum_p2)
        return logps, entropy, topk_mass, topk_entropy, log_sum_p2

    @staticmethod
    def backward(ctx, grad_logps, *unused_grads):
        logits, labels, valid, lse_all = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        cdtype = lse_all.dtype
        # d logp_t / d x_t = onehot(label_t) - softmax(x_t); masked positions contribute nothing.
        g = torch.where(valid, grad_logps.to(cdtype), torch.zeros((), dtype=cdtype, device=valid.device))
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        writes_in_place = logits.dtype == cdtype
        for (block, start, stop, flat), grad_block in zip(
            _chunk_ranges(_row_blocks(logits), ctx.chunk_size),
            _grad_block_views(grad_logits, _row_blocks(logits), ctx.chunk_size),
            strict=True,
        ):
            rows = slice(flat, flat + stop - start)
            x = block[start:stop]
            g_rows = g[rows].unsqueeze(-1)
            lse = lse_all[rows].unsqueeze(-1)
            # For float32/64 logits the chunk's gradient is built directly in the output: no extra buffer.
            buf = torch.sub(x, lse, out=grad_block) if writes_in_place else x.to(cdtype, copy=True).sub_(lse)
            buf.exp_().mul_(-g_rows)
            buf.scatter_add_(-1, labels[rows].unsqueeze(-1), g_rows)
            if not writes_in_place:
                grad_block.copy_(buf)
            del buf  # free this chunk's buffer before the next one is allocated
        return grad_logits, None, None, None, None, None


def _grad_block_views(grad: torch.Tensor, logit_blocks: list[torch.Tensor], chunk_size: int):
    """Chunk views of the (contiguous) gradient that line up with `_chunk_ranges` over the logits."""
    flat = grad.view(-1, grad.shape[-1])
    for block, start, stop, offset in _chunk_ranges(logit_blocks, chunk_size):
        del block
        yield flat[offset : offset + stop - start]


def token_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    top_k: int = 10,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    collision: bool = False,
) -> TokenStats:
    """Log-prob of each label and the distribution monitors, chunk by chunk over tokens.

    Args:
        logits: (..., T, V) float16/bfloat16/float32/float64; `logits[..., t, :]` predicts
            `labels[..., t]` (the caller has already shifted). May be a non-contiguous view.
        labels: (..., T) integer token ids; positions equal to `ignore_index` are masked.
        top_k: k of the top-k statistics (clamped to V).
        chunk_size: tokens per chunk; extra memory is O(chunk_size * V).
        ignore_index: label value of masked positions.
        collision: also compute `log_sum_p2` (log sum_v p_v^2, for WPO); None otherwise.

    Returns:
        TokenStats(logps, entropy, topk_mass, topk_entropy, log_sum_p2), each shaped like `labels`, in
        float32 (float64 for float64 logits), 0 at masked positions. Only `logps` carries gradient (to the
        logits); the backward recomputes each chunk's softmax from the saved per-token logsumexp.
    """
    if logits.dim() < 2 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits must be (..., T, V) with labels (..., T); got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating tensor, got {logits.dtype}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    safe_labels = torch.where(valid, flat_labels, torch.zeros_like(flat_labels))
    stats = _TokenStatsFunction.apply(logits, safe_labels, valid, top_k, chunk_size, collision)
    *monitors, log_sum_p2 = (s.view(labels.shape) if s.numel() == valid.numel() else None for s in stats)
    return TokenStats(*monitors, log_sum_p2 if collision else None)


@torch.no_grad()
def token_logps(
    logits: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = 1024, ignore_index: int = -100
) -> torch.Tensor:
    """Log-prob of each label only, without gradient: the reference pass's share of `token_stats`.

    Shapes, shifting and dtypes as in `token_stats`; 0 at masked positions. Extra memory is one
    (chunk_size, V) buffer in the computation dtype.
    """
    if logits.dim() < 2 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits must be (..., T, V) with labels (..., T); got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    cdtype = _compute_dtype(logits.dtype)
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    safe_labels = torch.where(valid, flat_labels, torch.zeros_like(flat_labels))
    out = torch.zeros(flat_labels.numel(), dtype=cdtype, device=logits.device)
    for block, start, stop, flat in _chunk_ranges(_row_blocks(logits), chunk_size):
        x = block[start:stop]
        rows = slice(flat, flat + stop - start)
        lse = x.to(cdtype).logsumexp(dim=-1)
        out[rows] = x.gather(-1, safe_labels[rows].unsqueeze(-1)).squeeze(-1).to(cdtype) - lse
    return out.masked_fill_(~valid, 0.0).view(labels.shape)


class _TokenKLFunction(torch.autograd.Function):
    """kl_t = sum_v p_ref(v) (log p_ref(v) - log p_pol(v)), chunk by chunk; gradient to the policy's
    logits only: d kl_t / d x_pol = p_pol - p_ref (recomputed per chunk in the backward)."""

    @staticmethod
    def forward(ctx, policy_logits, reference_logits, valid, chunk_size):
        cdtype = _compute_dtype(policy_logits.dtype)
        kl = torch.zeros(valid.numel(), dtype=cdtype, device=policy_logits.device)
        pairs = zip(
            _chunk_ranges(_row_blocks(policy_logits), chunk_size),
            _chunk_ranges(_row_blocks(reference_logits), chunk_size),
            strict=True,
        )
        for (pol_block, start, stop, flat), (ref_block, _, _, _) in pairs:
            rows = slice(flat, flat + stop - start)
            # log_softmax, not log of softmax: a vanishing probability stays finite.
            log_ref = torch.log_softmax(ref_block[start:stop].to(cdtype), dim=-1)
            log_pol = torch.log_softmax(pol_block[start:stop].to(cdtype), dim=-1)
            log_pol.neg_().add_(log_ref)  # log p_ref - log p_pol, in place
            kl[rows] = log_ref.exp_().mul_(log_pol).sum(dim=-1)  # p_ref * (log p_ref - log p_pol), in place
            del log_ref, log_pol
        kl.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(policy_logits, reference_logits, valid)
        ctx.chunk_size = chunk_size
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        policy_logits, reference_logits, valid = ctx.saved_tensors
        cdtype = _compute_dtype(policy_logits.dtype)
        g = torch.where(valid, grad_kl.to(cdtype), torch.zeros((), dtype=cdtype, device=valid.device))
        grad = torch.empty(policy_logits.shape, dtype=policy_logits.dtype, device=policy_logits.device)
        pairs = zip(
            _chunk_ranges(_row_blocks(policy_logits), ctx.chunk_size),
            _chunk_ranges(_row_blocks(reference_logits), ctx.chunk_size),
            _grad_block_views(grad, _row_blocks(policy_logits), ctx.chunk_size),
            strict=True,
        )
        for (pol_block, start, stop, flat), (ref_block, _, _, _), grad_block in pairs:
            rows = slice(flat, flat + stop - start)
            p_pol = torch.softmax(pol_block[start:stop].to(cdtype), dim=-1)
            p_pol.sub_(torch.softmax(ref_block[start:stop].to(cdtype), dim=-1)).mul_(g[rows].unsqueeze(-1))
            grad_block.copy_(p_pol)
            del p_pol
        return grad, None, None, None


def token_kl(
    policy_logits: torch.Tensor,
    reference_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = 1024,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token forward KL from the reference's to the policy's next-token distribution (TDPO).

    kl_t = sum_v p_ref(v) * (log p_ref(v) - log p_pol(v)): Zeng et al., "Token-level Direct Preference
    Optimization" (ICML 2024), Sec. 4, the sequential KL D_SeqKL summed over response positions.

    Args:
        policy_logits, reference_logits: (..., T, V), same shape; position t predicts `labels[..., t]`
            (already shifted). Low-precision inputs compute in float32.
        labels: (..., T); positions equal to `ignore_index` give 0 (only response tokens count).
        chunk_size: tokens per chunk; beyond the two logits tensors (and the policy's gradient) forward
            and backward hold O(chunk_size * V) floats (two chunk buffers).

    Returns:
        (..., T) float32 (float64 for float64 logits); differentiable in `policy_logits` only.
    """
    if policy_logits.shape != reference_logits.shape or policy_logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"policy_logits {tuple(policy_logits.shape)}, reference_logits {tuple(reference_logits.shape)} "
            f"and labels {tuple(labels.shape)} do not match"
        )
    valid = labels.reshape(-1) != ignore_index
    kl = _TokenKLFunction.apply(policy_logits, reference_logits.detach(), valid, chunk_size)
    return kl.view(labels.shape)


def segment_sums(
    values: torch.Tensor,
    seq_index: torch.Tensor,
    num_segments: int,
    *,
    mask: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> SegmentSums:
    """Sum per-token values into per-sequence sums (differentiable in `values`).

    Args:
        values: (..., T) per-token values, e.g. `token_stats(...).logps`.
        seq_index: (..., T) long, the sequence each token belongs to, in [0, num_segments); tokens with
            a negative index (padding) are left out.
        num_segments: number of sequences.
        mask: optional (..., T) bool; only True tokens enter the sums and the counts (e.g.
            `labels != -100`, the response tokens).
        dtype: accumulation and output dtype of `sums` (default: that of `values`), e.g. float64.

    Returns:
        SegmentSums(sums (num_segments,), counts (num_segments,) long).
    """
    if values.shape != seq_index.shape:
        raise ValueError(f"values {tuple(values.shape)} and seq_index {tuple(seq_index.shape)} differ")
    keep = seq_index.reshape(-1) >= 0
    if mask is not None:
        keep = keep & mask.reshape(-1)
    index = seq_index.reshape(-1)[keep]
    kept_values = values.reshape(-1)[keep].to(dtype or values.dtype)
    sums = torch.zeros(num_segments, dtype=kept_values.dtype, device=values.device)
    sums = sums.index_add(0, index, kept_values)
    counts = torch.bincount(index, minlength=num_segments)
    return SegmentSums(sums, counts)
