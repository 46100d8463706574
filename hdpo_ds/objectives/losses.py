"""Preference losses as pure functions over per-sequence log-probabilities.

Every function here takes summed log-probs of whole responses, one value per pair, and returns
per-pair losses; the caller reduces (docs/design.md §4, §8). Nothing here knows about packing, ranks or
engines.

References
- H-DPO: Omura, Fujita, Kataoka, "Entropy Controllable Direct Preference Optimization" (2024,
  arXiv:2411.07595), Sec. 3: the objective E[r] - beta * (-alpha * H(pi) + CE(pi, ref)), its optimum
  pi* ~ ref^(1/alpha) exp(r / (alpha*beta)) and the resulting pairwise loss (docs/design.md §4).
- DPO: Rafailov et al., "Direct Preference Optimization" (2023), Eq. (7).
- cDPO (label smoothing): Mitchell, "A note on DPO with noisy preferences & relationship to IPO" (2023),
  the conservative DPO loss.
- IPO: Azar et al., "A General Theoretical Paradigm to Understand Learning from Human
  Preferences" (2023), Eq. (17) (empirical IPO loss).
- Hinge: Zhao et al., "SLiC-HF" (2023), the calibration loss; Liu et al., "Statistical Rejection
  Sampling" (RSO, 2023), its hinge loss on the normalised likelihood ratio.
- TDPO: Zeng et al., "Token-level Direct Preference Optimization" (ICML 2024), Sec. 4: TDPO1 and
  TDPO2 (the latter with a stop-gradient on the chosen sequential KL and its own alpha).
- f-DPO: Wang et al., "Beyond Reverse KL: Generalizing DPO with Diverse Divergence Constraints"
  (2023), Sec. 4: the f-DPO loss with f'(pi/ref) in place of log(pi/ref), and its table of f'(u).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "LOSS_TYPES",
    "TDPO_LOSS_TYPES",
    "PreferenceLossOutput",
    "TDPOLossOutput",
    "canonical_loss_type",
    "preference_loss",
    "tdpo_loss",
]

# Canonical names, then aliases that map onto them.
LOSS_TYPES = ("hdpo", "ipo", "hinge", "fdpo_forward_kl", "fdpo_js", "fdpo_alpha")
_ALIASES = {"dpo": "hdpo", "sigmoid": "hdpo"}
# Losses whose per-pair loss is a logistic loss of a logit, so cDPO label smoothing applies.
_LOGISTIC_LOSSES = frozenset({"hdpo", "fdpo_forward_kl", "fdpo_js", "fdpo_alpha"})

# exp(40) ~ 2.4e17: past this exponent f-DPO's exp() continues linearly (first-order extension), so
# values stay finite in float32 even after a sum over thousands of pairs, and the gradient stays
# positive instead of vanishing as a hard clamp would make it.
FDPO_MAX_EXPONENT = 40.0


class PreferenceLossOutput(NamedTuple):
    """Per-pair outputs, each of shape (num_pairs,). Rewards are detached."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def canonical_loss_type(loss_type: str) -> str:
    """Map a loss name or alias to its canonical name; unknown names raise ValueError listing all."""
    name = _ALIASES.get(loss_type, loss_type)
    if name not in LOSS_TYPES:
        valid = ", ".join([*LOSS_TYPES, *sorted(_ALIASES)])
        raise ValueError(f"unknown loss_type {loss_type!r}; valid loss types: {valid}")
    return name


def _check_hyperparameters(
    loss_type: str, beta: float, alpha: float, label_smoothing: float, f_alpha: float, nll_weight: float
) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got beta={beta!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got alpha={alpha!r}")
    if not 0 < f_alpha < 1:
        raise ValueError(f"f_alpha must lie in (0, 1), got f_alpha={f_alpha!r}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got label_smoothing={label_smoothing!r}")
    if not nll_weight >= 0:
        raise ValueError(f"nll_weight must be >= 0, got nll_weight={nll_weight!r}")
    if label_smoothing > 0 and canonical_loss_type(loss_type) not in _LOGISTIC_LOSSES:
        raise ValueError(
            f"label_smoothing={label_smoothing!r} applies only to logistic losses "
            f"({', '.join(sorted(_LOGISTIC_LOSSES))}), not to loss_type={loss_type!r}"
        )
    if loss_type in _ALIASES and alpha != 1.0:
        raise ValueError(
            f"loss_type={loss_type!r} is H-DPO with alpha=1, but alpha={alpha!r}; "
            "use loss_type='hdpo' to set alpha"
        )


def _capped_exp(x: torch.Tensor) -> torch.Tensor:
    """exp(x) for x <= FDPO_MAX_EXPONENT, continued linearly (value and slope match) beyond it."""
    capped = x.clamp(max=FDPO_MAX_EXPONENT)
    return torch.exp(capped) * (1 + (x - capped))


def _fdpo_g(log_ratio: torch.Tensor, loss_type: str, f_alpha: float) -> torch.Tensor:
    """f'(u) at u = pi/ref = exp(log_ratio) for the f-divergences of f-DPO (Wang et al., Sec. 4)."""
    if loss_type == "fdpo_forward_kl":
        # f(u) = -log u  ->  f'(u) = -1/u = -exp(-r)
        return -_capped_exp(-log_ratio)
    if loss_type == "fdpo_js":
        # f(u) = u log u - (1 + u) log((1 + u)/2)  ->  f'(u) = log(2u / (1 + u)) = log 2 - softplus(-r)
        return math.log(2.0) - F.softplus(-log_ratio)
    # alpha-divergence, f(u) = (u^(1-a) - (1-a) u - a) / (a (a - 1))  ->  f'(u) = (1 - u^(-a)) / a
    return (1 - _capped_exp(-f_alpha * log_ratio)) / f_alpha


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    loss_type: str = "hdpo",
    beta: float = 0.1,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    f_alpha: float = 0.5,
    chosen_token_counts: torch.Tensor | None = None,
    nll_weight: float = 0.0,
) -> PreferenceLossOutput:
    """Per-pair preference loss of the DPO family.

    Args:
        policy_chosen_logps, policy_rejected_logps: (num_pairs,) summed log-probs of the chosen /
            rejected response tokens under the policy (lp_w, lp_l). They carry the gradient.
        reference_chosen_logps, reference_rejected_logps: (num_pairs,) the same under the reference
            (ref_w, ref_l). Treated as constants.
        loss_type: "hdpo" (aliases "dpo", "sigmoid" = hdpo with alpha=1), "ipo", "hinge",
            "fdpo_forward_kl", "fdpo_js", "fdpo_alpha".
        beta: strength of the divergence penalty, > 0.
        alpha: H-DPO entropy coefficient, > 0 (1 = DPO; < 1 sharpens, > 1 spreads). Used by hdpo only.
        label_smoothing: cDPO eps in [0, 0.5), the assumed probability that a label is flipped.
            Logistic losses only (hdpo, f-DPO).
        f_alpha: the alpha-divergence parameter in (0, 1), for "fdpo_alpha".
        chosen_token_counts: (num_pairs,) number of chosen response tokens; needed when nll_weight > 0.
        nll_weight: lambda of the NLL regulariser lambda * (-lp_w / n_w), added per pair.

    Returns:
        PreferenceLossOutput(losses, chosen_rewards, rejected_rewards), each (num_pairs,), computed in
        float32 (float64 for float64 inputs). Losses are per pair, not reduced; rewards are detached:
        H-DPO alpha*beta*lp - beta*ref, the others beta*(lp - ref).

    Formulas (docs/design.md §4):
        hdpo:   z = alpha*beta*(lp_w - lp_l) - beta*(ref_w - ref_l)        (H-DPO, Omura et al. Sec. 3)
                loss = -(1-eps)*logsigmoid(z) - eps*logsigmoid(-z)          (cDPO, Mitchell)
        ipo:    h = (lp_w - ref_w) - (lp_l - ref_l); loss = (h - 1/(2*beta))^2    (Azar et al. Eq. 17)
                Summed log-probs, as in the paper; TRL divides h by the response lengths instead.
        hinge:  loss = max(0, 1 - beta*h)                                   (SLiC-HF, RSO)
        f-DPO:  r = lp - ref; z = beta*(g(r_w) - g(r_l)), loss as for hdpo  (Wang et al. Sec. 4)
                g = f'(exp(r)): forward KL -exp(-r); JS log 2 - softplus(-r);
                alpha-divergence (1 - exp(-f_alpha*r)) / f_alpha, exponents capped (FDPO_MAX_EXPONENT).
    """
    _check_hyperparameters(loss_type, beta, alpha, label_smoothing, f_alpha, nll_weight)
    name = canonical_loss_type(loss_type)
    inputs = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    shape = policy_chosen_logps.shape
    if policy_chosen_logps.dim() != 1 or any(t.shape != shape for t in inputs):
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise ValueError(f"all four log-prob tensors must have the same shape (num_pairs,), got {shapes}")

    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    lp_w, lp_l = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    ref_w, ref_l = reference_chosen_logps.to(dtype).detach(), reference_rejected_logps.to(dtype).detach()

    if name == "hdpo":
        chosen_rewards = alpha * beta * lp_w - beta * ref_w
        rejected_rewards = alpha * beta * lp_l - beta * ref_l
        logits = chosen_rewards - rejected_rewards
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    else:
        chosen_log_ratio, rejected_log_ratio = lp_w - ref_w, lp_l - ref_l
        chosen_rewards, rejected_rewards = beta * chosen_log_ratio, beta * rejected_log_ratio
        if name in ("ipo", "hinge"):
            h = chosen_log_ratio - rejected_log_ratio
            losses = (h - 1 / (2 * beta)) ** 2 if name == "ipo" else torch.relu(1 - beta * h)
        else:
            logits = beta * (
                _fdpo_g(chosen_log_ratio, name, f_alpha) - _fdpo_g(rejected_log_ratio, name, f_alpha)
            )
            losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)

    if nll_weight > 0:
        if chosen_token_counts is None:
            raise ValueError("nll_weight > 0 needs chosen_token_counts (tokens per chosen response)")
        if chosen_token_counts.shape != shape:
            raise ValueError(
                f"chosen_token_counts must have shape {tuple(shape)}, got {tuple(chosen_token_counts.shape)}"
            )
        # A response with no tokens has lp_w = 0; dividing by 1 keeps its term 0 rather than NaN.
        counts = chosen_token_counts.to(dtype).clamp(min=1)
        losses = losses + nll_weight * (-lp_w / counts)

    return PreferenceLossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


TDPO_LOSS_TYPES = ("tdpo1", "tdpo2")


class TDPOLossOutput(NamedTuple):
    """Per-pair outputs, each (num_pairs,); rewards and KL terms detached."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_kl: torch.Tensor
    rejected_kl: torch.Tensor


def tdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_seq_kl: torch.Tensor,
    rejected_seq_kl: torch.Tensor,
    *,
    loss_type: str = "tdpo2",
    beta: float = 0.1,
    tdpo_alpha: float = 0.5,
) -> TDPOLossOutput:
    """Token-level DPO (Zeng et al. 2024, Sec. 4), per pair.

    Args:
        policy_*_logps, reference_*_logps: (num_pairs,) summed response log-probs (as for
            `preference_loss`).
        chosen_seq_kl, rejected_seq_kl: (num_pairs,) sequential KL, the sum over response tokens of
            KL(p_ref || p_pol) at each position (`logprobs.token_kl`); they carry gradient.
        loss_type: "tdpo1" or "tdpo2" (the paper code's default).
        beta: > 0 (default 0.1). tdpo_alpha: TDPO2's KL weight, > 0 (default 0.5).

    Formulas, with U = (lp_w - ref_w) - (lp_l - ref_l):
        TDPO1: loss = -logsigmoid(beta * (U - (SeqKL_l - SeqKL_w)))
        TDPO2: loss = -logsigmoid(beta * (U - tdpo_alpha * (SeqKL_l - stopgrad(SeqKL_w))))
    Rewards (as the paper's code logs them): beta * (lp - ref), detached.
    """
    if loss_type not in TDPO_LOSS_TYPES:
        raise ValueError(f"unknown TDPO loss_type {loss_type!r}; valid: {', '.join(TDPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got beta={beta!r}")
    if not tdpo_alpha > 0:
        raise ValueError(f"tdpo_alpha must be > 0, got tdpo_alpha={tdpo_alpha!r}")
    inputs = (
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        chosen_seq_kl,
        rejected_seq_kl,
    )
    shape = policy_chosen_logps.shape
    if policy_chosen_logps.dim() != 1 or any(t.shape != shape for t in inputs):
        raise ValueError(
            "all six tensors must have the same shape (num_pairs,), got "
            + ", ".join(str(tuple(t.shape)) for t in inputs)
        )
    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    lp_w, lp_l, ref_w, ref_l, kl_w, kl_l = (t.to(dtype) for t in inputs)
    ref_w, ref_l = ref_w.detach(), ref_l.detach()
    u = (lp_w - ref_w) - (lp_l - ref_l)
    # TDPO2 stops the gradient through the chosen response's KL and weighs the KL margin by tdpo_alpha.
    logits = u - (kl_l - kl_w) if loss_type == "tdpo1" else u - tdpo_alpha * (kl_l - kl_w.detach())
    losses = -F.logsigmoid(beta * logits)
    return TDPOLossOutput(
        losses,
        (beta * (lp_w - ref_w)).detach(),
        (beta * (lp_l - ref_l)).detach(),
        kl_w.detach(),
        kl_l.detach(),
    )
