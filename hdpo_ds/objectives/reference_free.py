"""Reference-free preference losses: SimPO, CPO and ORPO as pure functions on per-pair tensors.

None of them reads a reference model: the policy's own summed response log-probs (and, where a loss
length-normalises, the responses' token counts) are all they take. Like objectives/losses.py they
return per-pair losses, unreduced, and detached rewards (docs/design.md §4, §8).

Notation, per pair: lp_w, lp_l the policy's summed log-probs of the chosen / rejected response given the
prompt (<= 0); n_w, n_l their token counts; m = lp / n the mean per-token log-prob; beta > 0;
softplus(z) = log(1 + e^z), so -logsigmoid(z) = softplus(-z).

References
- SimPO: Meng, Xia, Chen, "SimPO: Simple Preference Optimization with a Reference-Free Reward" (NeurIPS
  2024, arXiv:2405.14734), Sec. 2: the reward beta/|y| * log pi(y|x) (the length-normalised log-prob
  that also guides generation) and the Bradley-Terry objective with a target reward margin gamma,
  loss = -logsigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma).
- CPO: Xu et al., "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in
  Machine Translation" (ICML 2024, arXiv:2401.08417), Sec. 3: DPO with a uniform reference, whose
  ratio cancels, L_prefer = -logsigmoid(beta log pi(y_w|x) - beta log pi(y_l|x)), plus the behaviour
  cloning term L_NLL = -log pi(y_w|x) on the chosen response: L_CPO = L_prefer + L_NLL.
- ORPO: Hong, Lee, Thorne, "ORPO: Monolithic Preference Optimization without Reference Model" (EMNLP
  2024, arXiv:2403.07691), Sec. 4, Eq. (6): L_ORPO = L_SFT + lambda * L_OR with
  L_OR = -logsigmoid(log odds(y_w|x) - log odds(y_l|x)), odds(y|x) = P(y|x) / (1 - P(y|x)), where
  log P(y|x) is the mean per-token log-prob (the paper's length normalisation) and L_SFT the chosen
  response's NLL per token.

Conventions (TRL's CPOTrainer / ORPOTrainer documentation, which users of these losses know): ORPO's
lambda is `beta` (default 0.1); SimPO's margin is `gamma` in reward units (TRL's `simpo_gamma`; SimPO's
own code sets it as gamma/beta, so ratio 0.5 at beta 2.0 is gamma 1.0). The NLL terms of CPO and ORPO
are means over the chosen response's tokens, as the implementations compute them: the CPO paper writes
-log pi(y_w|x) for a whole response, which summed would outweigh the preference term on long responses.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "ORPO_MAX_MEAN_LOGP",
    "REFERENCE_FREE_LOSS_TYPES",
    "ReferenceFreeLossOutput",
    "cpo_loss",
    "log1mexp",
    "orpo_loss",
    "reference_free_loss",
    "simpo_loss",
]

REFERENCE_FREE_LOSS_TYPES = ("simpo", "cpo", "orpo")

# ORPO's mean log-prob is capped just below 0: at exactly 0 (every token certain, which float32 rounds
# to) log(1 - p) is -inf and its gradient 0 * inf = NaN; at -1e-12 both stay finite in float32.
ORPO_MAX_MEAN_LOGP = -1e-12

_LN2 = math.log(2.0)


class ReferenceFreeLossOutput(NamedTuple):
    """Per-pair outputs, each (num_pairs,): losses (carry the gradient) and detached rewards."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x <= 0, elementwise, stable at both ends.

    Near 0 (x > -ln 2) 1 - e^x cancels: log(-expm1(x)) keeps its digits; further out e^x is small and
    log1p(-exp(x)) is the accurate form (Maechler 2012, "Accurately computing log(1 - exp(-|a|))").
    Each branch is fed only inputs on its own side of -ln 2, so the branch torch.where discards has a
    finite gradient too (0 * inf would be NaN). x = 0 gives -inf, as log(0) should."""
    near = x > -_LN2
    near_x = torch.where(near, x, torch.full_like(x, -_LN2))
    far_x = torch.where(near, torch.full_like(x, -_LN2), x)
    return torch.where(near, torch.log(-torch.expm1(near_x)), torch.log1p(-torch.exp(far_x)))


def _inputs(*tensors: torch.Tensor | None, names: tuple[str, ...]) -> list[torch.Tensor]:
    """Check the per-pair tensors share one shape (num_pairs,); promote to float32 (float64 stays)."""
    given = [(n, t) for n, t in zip(names, tensors, strict=True)]
    for name, t in given:
        if t is None:
            raise ValueError(f"{name} is required")
    shape = tensors[0].shape
    if tensors[0].dim() != 1 or any(t.shape != shape for t in tensors):
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in given)
        raise ValueError(f"all inputs must have the same shape (num_pairs,), got {shapes}")
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return [t.to(dtype) for t in tensors]


def _mean(logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    # A response with no tokens has a sum of 0: dividing by 1 keeps its mean 0 rather than NaN.
    return logps / tokens.clamp(min=1)


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got beta={beta!r}")


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> ReferenceFreeLossOutput:
    """SimPO (Meng et al. 2024, Sec. 2), per pair.

    Args:
        policy_chosen_logps, policy_rejected_logps: (num_pairs,) summed response log-probs lp_w, lp_l.
        chosen_tokens, rejected_tokens: (num_pairs,) response token counts n_w, n_l (no gradient).
        beta: reward scale, > 0 (the paper trains with 2.0 to 10). gamma: target margin, >= 0, in
            reward units (0.5: TRL's `simpo_gamma` default).

    Returns losses, chosen_rewards, rejected_rewards, each (num_pairs,):
        reward r = beta * lp / n (SimPO's length-normalised reward), loss = -logsigmoid(r_w - r_l - gamma).
    With n_w = n_l = n it is DPO without a reference at beta/n, shifted by gamma.
    """
    _check_beta(beta)
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got gamma={gamma!r}")
    names = ("policy_chosen_logps", "policy_rejected_logps", "chosen_tokens", "rejected_tokens")
    lp_w, lp_l, n_w, n_l = _inputs(
        policy_chosen_logps, policy_rejected_logps, chosen_tokens, rejected_tokens, names=names
    )
    chosen_rewards, rejected_rewards = beta * _mean(lp_w, n_w), beta * _mean(lp_l, n_l)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return ReferenceFreeLossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    *,
    beta: float = 0.1,
) -> ReferenceFreeLossOutput:
    """CPO (Xu et al. 2024, Sec. 3), per pair.

    Args:
        policy_chosen_logps, policy_rejected_logps: (num_pairs,) summed response log-probs lp_w, lp_l.
        chosen_tokens: (num_pairs,) the chosen response's token count n_w (for the NLL term).
        beta: > 0 (default 0.1, as TRL's CPOConfig).

    Returns losses, chosen_rewards, rejected_rewards, each (num_pairs,):
        reward r = beta * lp, loss = -logsigmoid(r_w - r_l) + (-lp_w / n_w).
    """
    _check_beta(beta)
    names = ("policy_chosen_logps", "policy_rejected_logps", "chosen_tokens")
    lp_w, lp_l, n_w = _inputs(policy_chosen_logps, policy_rejected_logps, chosen_tokens, names=names)
    chosen_rewards, rejected_rewards = beta * lp_w, beta * lp_l
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards) - _mean(lp_w, n_w)
    return ReferenceFreeLossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float = 0.1,
) -> ReferenceFreeLossOutput:
    """ORPO (Hong et al. 2024, Sec. 4, Eq. (6)), per pair; `beta` is the paper's lambda (as in TRL).

    Args:
        policy_chosen_logps, policy_rejected_logps: (num_pairs,) summed response log-probs lp_w, lp_l.
        chosen_tokens, rejected_tokens: (num_pairs,) response token counts n_w, n_l (no gradient).
        beta: lambda, the weight of the odds-ratio term, > 0 (default 0.1).

    Returns losses, chosen_rewards, rejected_rewards, each (num_pairs,), with m = lp / n and
    log odds = m - log(1 - e^m) (`log1mexp`; m capped at ORPO_MAX_MEAN_LOGP inside the odds only):
        loss = -m_w + beta * softplus(-(log odds_w - log odds_l));
        reward r = beta * m, what TRL logs for ORPO (the paper names no reward). log odds is increasing
        in m, so reward accuracy is the share of pairs whose odds ratio favours the chosen response.
    """
    _check_beta(beta)
    names = ("policy_chosen_logps", "policy_rejected_logps", "chosen_tokens", "rejected_tokens")
    lp_w, lp_l, n_w, n_l = _inputs(
        policy_chosen_logps, policy_rejected_logps, chosen_tokens, rejected_tokens, names=names
    )
    m_w, m_l = _mean(lp_w, n_w), _mean(lp_l, n_l)
    # the cap is for the odds alone: the NLL keeps its gradient -1/n_w up to certainty
    capped_w, capped_l = m_w.clamp(max=ORPO_MAX_MEAN_LOGP), m_l.clamp(max=ORPO_MAX_MEAN_LOGP)
    log_odds_ratio = (capped_w - log1mexp(capped_w)) - (capped_l - log1mexp(capped_l))
    losses = -m_w + beta * F.softplus(-log_odds_ratio)
    return ReferenceFreeLossOutput(losses, (beta * m_w).detach(), (beta * m_l).detach())


def reference_free_loss(
    loss_type: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor | None,
    *,
    beta: float,
    simpo_gamma: float = 0.5,
) -> ReferenceFreeLossOutput:
    """Dispatch on `loss_type` (one of REFERENCE_FREE_LOSS_TYPES); CPO does not read rejected_tokens."""
    if loss_type == "simpo":
        return simpo_loss(
            policy_chosen_logps,
            policy_rejected_logps,
            chosen_tokens,
            rejected_tokens,
            beta=beta,
            gamma=simpo_gamma,
        )
    if loss_type == "cpo":
        return cpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_tokens, beta=beta)
    if loss_type == "orpo":
        return orpo_loss(
            policy_chosen_logps, policy_rejected_logps, chosen_tokens, rejected_tokens, beta=beta
        )
    valid = ", ".join(REFERENCE_FREE_LOSS_TYPES)
    raise ValueError(f"unknown reference-free loss_type {loss_type!r}; valid: {valid}")
