"""What modifies a preference loss rather than being one: the SFT term of a weighted combination, WPO's
pair weights and LD-DPO's length-desensitised log-probs (docs/design.md §4). Pure functions on tensors.

References
- Weighted combinations with an SFT term: Wang et al., "Enhancing the Reasoning Ability of Multimodal
  Large Language Models via Mixed Preference Optimization" (MPO, 2024, arXiv:2411.10442), Sec. 3.2: a
  weighted sum of a preference, a quality (BCO) and a generation (SFT) loss.
- WPO: Zhou et al., "WPO: Enhancing RLHF with Weighted Preference Optimization" (EMNLP 2024,
  arXiv:2406.11827), Sec. 3: each pair's loss weighted by w(x, y_w) * w(x, y_l), with the "weight
  alignment" w(x, y) = exp((1/|y|) sum_t log(pi(y_t | x, y_<t) / sum_v pi(v | x, y_<t)^2)) (equation
  number not pinned).
- LD-DPO: Liu et al., "Length Desensitization in Direct Preference Optimization" (2024,
  arXiv:2409.06411), Sec. 4: the longer response's log-prob beyond the shorter one's length l_p is
  scaled by alpha: log pi_ld(y) = sum_{t <= l_p} log p_t + alpha * sum_{t > l_p} log p_t, for the policy
  and the reference alike (equation number not pinned).
"""

from __future__ import annotations

import torch

__all__ = ["SFT_TERM", "ld_token_weights", "sft_loss", "wpo_weights"]

# The name of the chosen-response NLL as a term of a weighted combination (`loss.type: [hdpo, sft]`).
SFT_TERM = "sft"


def sft_loss(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """The chosen response's mean NLL per token, -lp_w / n_w: (num_pairs,) from the summed log-probs
    and the token counts (num_pairs,). The same term as `loss.nll_weight` adds (objectives/losses.py);
    a response of no tokens counts as one token (its sum is 0)."""
    counts = chosen_tokens.to(policy_chosen.dtype).clamp(min=1)
    return -policy_chosen / counts


def wpo_weights(
    adjusted_chosen: torch.Tensor,
    adjusted_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
) -> torch.Tensor:
    """WPO's pair weight w(x, y_w) * w(x, y_l), clamped at 1, without gradient.

    Args:
        adjusted_chosen, adjusted_rejected: (num_pairs,) each response's sum over its tokens of
            log p_t - log sum_v p_v^2 (the policy's label log-prob minus `TokenStats.log_sum_p2`).
        chosen_tokens, rejected_tokens: (num_pairs,) the responses' token counts (0 reads as 1).

    Returns:
        (num_pairs,) weights in (0, 1]: exp(mean_w + mean_l), detached. The weight alignment makes a
        response the policy would pick greedily weigh about 1 however peaked the distribution; the
        clamp keeps a pair from ever weighing more than in plain DPO (as TRL's use_weighting does).
    """
    n_w = chosen_tokens.to(adjusted_chosen.dtype).clamp(min=1)
    n_l = rejected_tokens.to(adjusted_rejected.dtype).clamp(min=1)
    log_w = adjusted_chosen.detach() / n_w + adjusted_rejected.detach() / n_l
    return log_w.clamp(max=0.0).exp()


def ld_token_weights(
    labels: torch.Tensor,
    seq_index: torch.Tensor,
    pair_index: torch.Tensor,
    num_pairs: int,
    ld_alpha: float,
    *,
    ignore_index: int = -100,
) -> torch.Tensor:
    """LD-DPO's per-token weights: 1 on the first l_p response tokens of each sequence (l_p the shorter
    response length of its pair), `ld_alpha` on the longer response's tokens beyond l_p, 0 elsewhere.
    `segment_sums(logps * weights, ...)` is then log pi_ld of every sequence, policy and reference alike.

    Args:
        labels: (..., T) shifted labels, `ignore_index` outside the response tokens.
        seq_index: (..., T) the sequence of each token (-1 on padding). The response tokens of a
            sequence are contiguous, and sequences appear in index order in the flattened tensors (both
            layouts of data/packing.py `collate`): a token's position in its response is then its rank
            among the flattened response tokens minus its sequence's first rank.
        pair_index: (num_seqs,) the pair of each sequence.
        num_pairs: the pair count.
        ld_alpha: the weight of the tokens past the shorter length, in [0, 1].

    Returns:
        Float32 weights shaped like `labels`.
    """
    flat_seq = seq_index.reshape(-1)
    response = (labels.reshape(-1) != ignore_index) & (flat_seq >= 0)
    seqs = flat_seq[response]
    num_seqs = pair_index.numel()
    counts = torch.bincount(seqs, minlength=num_seqs)
    first = torch.cumsum(counts, 0) - counts  # each sequence's first rank among the response tokens
    position = torch.arange(seqs.numel(), device=seqs.device) - first[seqs]
    shorter = torch.full((num_pairs,), torch.iinfo(torch.long).max, dtype=torch.long, device=seqs.device)
    shorter = shorter.scatter_reduce(0, pair_index, counts, reduce="amin")
    weights = torch.zeros(flat_seq.shape, dtype=torch.float32, device=labels.device)
    inside = position < shorter[pair_index[seqs]]
    weights[response] = torch.where(inside, 1.0, float(ld_alpha))
    return weights.view(labels.shape)
