"""The router's load-balancing loss of a mixture-of-experts model, and the experts' load.

Switch Transformer (Fedus et al., JMLR 2022, Eqs. 4-6), in the top-k form Mixtral and the other
Hugging Face MoE models train with: over the tokens t of a forward and the MoE layers l, with
p_{l,t} = softmax(router logits) over the E experts and S_{l,t} the top-k experts chosen,

    f_e = (1/N) sum_{l,t} 1[e in S_{l,t}],   P_e = (1/N) sum_{l,t} p_{l,t,e},   aux = E * sum_e f_e P_e,

N = (number of layers) x (number of tokens counted). The gradient flows through P only (the choice is
discrete). aux is a product of two token averages, so it is defined per forward (per micro-batch), not
per token: the recipe weighs each micro-batch's aux by its share of the step's tokens (docs/design.md §4).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["RouterStats", "router_stats"]


class RouterStats(NamedTuple):
    """aux: the 0-d load-balancing loss (differentiable); counts: (layers, E) float64 number of top-k
    assignments of the counted tokens per layer and expert (no gradient), for the load metrics."""

    aux: torch.Tensor
    counts: torch.Tensor


def router_stats(router_logits, top_k: int, token_mask: torch.Tensor | None = None) -> RouterStats:
    """The load-balancing loss and the expert counts of one forward.

    Args:
        router_logits: a tuple (one per MoE layer) of (tokens, E) router logits, as the model returns
            them with `output_router_logits=True` (tokens = batch x sequence, flattened).
        top_k: experts per token (`num_experts_per_tok`).
        token_mask: optional (tokens,) or (batch, sequence) bool/0-1: only these tokens count (padding
            left out); None counts every token.

    Returns:
        RouterStats(aux float32, counts float64). With no counted token, aux is 0.
    """
    layers = tuple(router_logits)
    if not layers:
        raise ValueError("router_logits is empty: the model returned no router logits")
    num_experts = layers[0].shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must lie in [1, {num_experts}], got {top_k}")
    device = layers[0].device
    mask = None if token_mask is None else token_mask.reshape(-1).to(device=device, dtype=torch.float32)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    counts = torch.zeros(len(layers), num_experts, dtype=torch.float64, device=device)
    rows = 0.0
    for i, logits in enumerate(layers):
        if logits.dim() != 2 or logits.shape[-1] != num_experts:
            raise ValueError(f"router_logits[{i}] must be (tokens, {num_experts}); got {tuple(logits.shape)}")
        if mask is not None and mask.numel() != logits.shape[0]:
            raise ValueError(f"token_mask has {mask.numel()} tokens, router_logits[{i}] {logits.shape[0]}")
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.zeros_like(probs, dtype=torch.float64).scatter_(
            -1, probs.detach().topk(top_k, dim=-1).indices, 1.0
        )
        if mask is None:
            prob_sum = prob_sum + probs.sum(dim=0)
            counts[i] = chosen.sum(dim=0)
            rows += probs.shape[0]
        else:
            prob_sum = prob_sum + (probs * mask.unsqueeze(-1)).sum(dim=0)
            counts[i] = (chosen * mask.double().unsqueeze(-1)).sum(dim=0)
            rows = rows + mask.sum()
    rows_t = torch.as_tensor(rows, dtype=torch.float32, device=device).clamp(min=1.0)
    f = counts.sum(dim=0).float() / rows_t
    aux = num_experts * (f * (prob_sum / rows_t)).sum()
    return RouterStats(aux, counts)
