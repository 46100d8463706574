"""Losses that couple the pairs of a step: BCO's reward baseline, AOT's sorted pairing (docs/design.md §4).

Each loss here is still a pure per-pair function: what couples the pairs enters as a constant computed
before the gradient pass, the reward baseline `delta` (`bco_pair_loss`) or each element's partner in
the sorted order (`aot_loss`). The recipe computes these constants over the whole optimizer step on all
ranks (recipes/preference.py); `aot_sorted_loss` is the definition the two-pass computation reproduces.

References
- BCO: Jung et al., "Binary Classifier Optimization for Large Language Model Alignment" (2024,
  arXiv:2404.04656; ACL 2025): the implied reward r = beta*(lp - ref) as the logit of a binary
  classifier, shifted by a reward baseline delta, the running mean of the rewards (equation number not
  pinned).
- AOT: Melnyk et al., "Distributional Preference Alignment of LLMs via Optimal Transport" (NeurIPS
  2024, arXiv:2406.05882): first-order stochastic dominance of the chosen over the rejected reward
  distribution, made a loss on sorted samples, the one-dimensional optimal transport (equation number
  not pinned). `aot` and `aot_unpaired` follow the conventions of TRL's `aot` and `aot_pair`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "AOT_LOSS_TYPES",
    "COUPLED_LOSS_TYPES",
    "RewardBaseline",
    "aot_loss",
    "aot_partners",
    "aot_sort_values",
    "aot_sorted_loss",
    "bco_pair_loss",
]

AOT_LOSS_TYPES = ("aot", "aot_unpaired")
COUPLED_LOSS_TYPES = ("bco_pair", *AOT_LOSS_TYPES)

_Terms = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # losses, chosen rewards, rejected rewards


def _promote(*tensors: torch.Tensor) -> list[torch.Tensor]:
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return [t.to(dtype) for t in tensors]


def bco_pair_loss(lp_w, lp_l, ref_w, ref_l, *, beta: float, baseline: float) -> _Terms:
    """BCO on a pair (Jung et al. 2024, arXiv:2404.04656), with the reward baseline as a constant.

    With the rewards r = beta*(lp - ref) and the baseline delta:
        loss = -logsigmoid(r_w - delta) - logsigmoid(-(r_l - delta))
    the chosen response classified as good, the rejected as bad, both against delta. Hand-worked: beta 1,
    delta 0.5, r_w = 1.5, r_l = -0.5: 2 * softplus(-1) = 2 * 0.31326 = 0.62652. The recipe's delta is
    the mean of every reward (chosen and rejected) of all updating optimizer steps before this one, 0
    before the first (`RewardBaseline`). Rewards: beta*(lp - ref), detached.
    """
    lp_w, lp_l, ref_w, ref_l = _promote(lp_w, lp_l, ref_w, ref_l)
    u_w, u_l = beta * (lp_w - ref_w.detach()), beta * (lp_l - ref_l.detach())
    losses = F.softplus(-(u_w - baseline)) + F.softplus(u_l - baseline)
    return losses, u_w.detach(), u_l.detach()


class RewardBaseline:
    """BCO's delta: the running mean of the rewards (chosen and rejected alike) of all optimizer steps
    that updated before the current one; 0 before the first. `update` takes a step's globally reduced
    reward sum and count (the metrics all-reduce carries them: no collective of its own)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0.0

    @property
    def value(self) -> float:
        return self.total / self.count if self.count > 0 else 0.0

    def update(self, reward_sum: float, reward_count: float) -> None:
        self.total += float(reward_sum)
        self.count += float(reward_count)

    def state_dict(self) -> dict[str, float]:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.total, self.count = float(state["total"]), float(state["count"])


def aot_sort_values(lp_w, lp_l, ref_w, ref_l, *, unpaired: bool) -> torch.Tensor:
    """(num_pairs, 2), detached: what AOT sorts. aot: the policy's and the reference's chosen-minus-
    rejected log-ratios (lp_w - lp_l, ref_w - ref_l); aot_unpaired: the chosen and rejected log-ratios
    (lp_w - ref_w, lp_l - ref_l)."""
    lp_w, lp_l, ref_w, ref_l = (t.detach() for t in _promote(lp_w, lp_l, ref_w, ref_l))
    if unpaired:
        return torch.stack([lp_w - ref_w, lp_l - ref_l], dim=1)
    return torch.stack([lp_w - lp_l, ref_w - ref_l], dim=1)


def aot_partners(values: torch.Tensor) -> torch.Tensor:
    """Each element's partner in the sorted pairing, (N, 2), from `aot_sort_values` of the whole step.

    Both columns are sorted ascending (stable: ties keep the step's pair order, so every rank and every
    world size pairs alike) and the k-th of one column meets the k-th of the other. Row i gets, in column
    0, the column-1 value ranked where its column-0 value ranks, and in column 1 the column-0 value ranked
    where its column-1 value ranks.
    """
    partners = torch.empty_like(values)
    sorted0, order0 = torch.sort(values[:, 0], stable=True)
    sorted1, order1 = torch.sort(values[:, 1], stable=True)
    partners[order0, 0] = sorted1
    partners[order1, 1] = sorted0
    return partners


def _smoothed_logistic(z: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def aot_loss(
    lp_w, lp_l, ref_w, ref_l, partners, *, beta: float, label_smoothing: float, unpaired: bool
) -> _Terms:
    """AOT per pair (Melnyk et al. 2024), each element against its constant partner from `aot_partners`.

    The sorted loss of a step of N pairs (`aot_sorted_loss`), with L(z) = cDPO's smoothed logistic:
        aot:          sum_k L(beta*(sort(lp_w - lp_l)_k - sort(ref_w - ref_l)_k))
        aot_unpaired: sum_k L(beta*(sort(r_w)_k - sort(r_l)_k)),    r = lp - ref
    Why the gradient is exact: a sort is piecewise constant. Where no two values tie, the order is fixed
    in a neighbourhood, and there the sorted loss is a sum of terms that each read one element and its
    fixed partner; its gradient is that of the sum with the partners held constant, which is what this
    function differentiates. Ties form a set of measure zero, where either order gives a subgradient.
        aot:          loss_i = L(beta*((lp_w - lp_l)_i - p_i)),  p_i the reference value at i's rank
        aot_unpaired: a_i = L(beta*(r_w,i - p_i)), b_i = L(beta*(q_i - r_l,i)), p, q the partners;
                      loss_i = (a_i + b_i) - (a_i + b_i)/2 detached
    In aot_unpaired every sorted term appears twice (once as some a_i, once as some b_j), so the values
    are halved while the gradient of a_i + b_i is kept: summed over the step, the losses equal the sorted
    loss and their gradient its gradient. A single pair's value is a share of the sum, not one sorted term.
    Hand-worked (aot, beta 1, eps 0): policy margins (2, 0), reference margins (1, 3): the sorted pairing
    is (0 with 1) and (2 with 3), losses softplus(1) = 1.31326 and softplus(1) = 1.31326.
    Rewards: beta*(lp - ref), detached.
    """
    lp_w, lp_l, ref_w, ref_l, partners = _promote(lp_w, lp_l, ref_w, ref_l, partners)
    ref_w, ref_l, partners = ref_w.detach(), ref_l.detach(), partners.detach()
    r_w, r_l = lp_w - ref_w, lp_l - ref_l
    if unpaired:
        both = _smoothed_logistic(beta * (r_w - partners[:, 0]), label_smoothing) + _smoothed_logistic(
            beta * (partners[:, 1] - r_l), label_smoothing
        )
        losses = both - 0.5 * both.detach()
    else:
        losses = _smoothed_logistic(beta * ((lp_w - lp_l) - partners[:, 0]), label_smoothing)
    return losses, (beta * r_w).detach(), (beta * r_l).detach()


def aot_sorted_loss(lp_w, lp_l, ref_w, ref_l, *, beta: float, label_smoothing: float, unpaired: bool):
    """The definition: AOT's summed loss over one whole step with the sort inside autograd (tests and
    documentation; training uses `aot_partners` + `aot_loss`, which need no step-wide graph)."""
    lp_w, lp_l, ref_w, ref_l = _promote(lp_w, lp_l, ref_w, ref_l)
    if unpaired:
        a, b = lp_w - ref_w.detach(), lp_l - ref_l.detach()
    else:
        a, b = lp_w - lp_l, (ref_w - ref_l).detach()
    delta = torch.sort(a, stable=True).values - torch.sort(b, stable=True).values
    return _smoothed_logistic(beta * delta, label_smoothing).sum()
