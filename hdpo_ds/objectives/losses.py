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
- rDPO: Chowdhury, Kini, Natarajan, "Provably Robust DPO: Aligning Language Models with Noisy
  Feedback" (ICML 2024, arXiv:2403.00409): the de-biased loss for labels flipped with rate eps < 1/2
  (equation number not pinned).
- EXO: Ji et al., "Towards Efficient Exact Optimization of Language Model Alignment" (ICML 2024,
  arXiv:2402.00856), Eq. (16): the reverse KL between the policy's and the labels' pair distributions.
- NCA: Chen et al., "Noise Contrastive Alignment of Language Models with Explicit Rewards" (NeurIPS
  2024, arXiv:2402.05369): the NCA loss on a preference pair (equation number not pinned).
- SPPO: Wu et al., "Self-Play Preference Optimization for Language Model Alignment" (2024,
  arXiv:2405.00675), Eq. (4.7) of Algorithm 1, with hard win probabilities 1 and 0.
- APO: D'Oosterlinck et al., "Anchored Preference Optimization and Contrastive Revisions" (2024,
  arXiv:2408.06266), Eq. (7) (APO-zero) and Eq. (8) (APO-down).
- DiscoPOP: Lu et al., "Discovering Preference Optimization Algorithms with and for Large Language
  Models" (NeurIPS 2024, arXiv:2406.08414), Sec. 6.1, Eq. (5): the log-ratio modulated loss (LRML).
- Length-normalised DPO: Lambert et al., "Tulu 3: Pushing Frontiers in Open Language Model
  Post-Training" (2024, arXiv:2411.15124), its preference-tuning section: DPO with each log-ratio
  divided by its length (equation number not pinned).
The equation numbers of EXO, SPPO and APO are the ones TRL's DPOTrainer cites; docs/design.md §4 says
which were read in the papers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "ALPHA_LOSS_TYPES",
    "DISCOPOP_DEFAULT_TAU",
    "DPOP_DEFAULT_LAMBDA",
    "EXO_DEFAULT_EPSILON",
    "LABEL_SMOOTHING_LOSS_TYPES",
    "LOSS_TYPES",
    "TDPO_LOSS_TYPES",
    "PreferenceLossOutput",
    "TDPOLossOutput",
    "alpha_does_not_apply",
    "canonical_loss_type",
    "preference_loss",
    "tdpo_loss",
]

# Canonical names, then aliases that map onto them.
LOSS_TYPES = (
    "hdpo",
    "ipo",
    "hinge",
    "fdpo_forward_kl",
    "fdpo_js",
    "fdpo_alpha",
    "robust",
    "exo_pair",
    "nca_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "dpop",
)
_ALIASES = {"dpo": "hdpo", "sigmoid": "hdpo"}
# The losses whose logit is built on H-DPO's z, a difference of rewards alpha*beta*lp - beta*ref (dpop
# subtracts its penalty from it): alpha applies.
ALPHA_LOSS_TYPES = frozenset({"hdpo", "robust", "sigmoid_norm", "dpop"})
# What label_smoothing (eps) is to each loss that reads it: cDPO's smoothing for the logistic losses,
# rDPO's flip rate for robust, EXO's target mass on the rejected response for exo_pair.
LABEL_SMOOTHING_LOSS_TYPES = frozenset(
    {"hdpo", "fdpo_forward_kl", "fdpo_js", "fdpo_alpha", "sigmoid_norm", "robust", "exo_pair"}
    | {"aot", "aot_unpaired"}  # cDPO's smoothing of AOT's logistic (objectives/coupled.py)
)
EXO_DEFAULT_EPSILON = 1e-3  # EXO's eps when none is given (TRL's default); eps = 0 makes the loss infinite
DISCOPOP_DEFAULT_TAU = 0.05  # the temperature of DiscoPOP's mixing weight, as the paper sets it
# DPOP's lambda: our default, large enough that any fall of the chosen log-ratio below 0 outweighs the
# margin it buys (a tuning choice of this project; set loss.dpop_lambda for your data)
DPOP_DEFAULT_LAMBDA = 50.0

# Why H-DPO's alpha has no meaning for the other losses (config.py and preference_loss refuse alpha != 1).
_NO_ALPHA = {
    "ipo": "IPO regresses the log-ratio margin onto 1/(2*beta); it is no likelihood of H-DPO's reward",
    "hinge": "the hinge is a margin loss on the log-ratio margin, not a likelihood of H-DPO's reward",
    "sppo_hard": "SPPO regresses each log-ratio onto +-1/(2*beta); it is no likelihood of H-DPO's reward",
    "exo_pair": "EXO matches the pair distribution of the plain log-ratio beta*(lp - ref), derived for the "
    "reverse-KL objective without an entropy weight",
    "nca_pair": "NCA scores each response by its plain log-ratio beta*(lp - ref), derived for the "
    "reverse-KL objective without an entropy weight",
    "apo_zero": "APO anchors each plain log-ratio beta*(lp - ref) at 0",
    "apo_down": "APO anchors each plain log-ratio beta*(lp - ref) at 0",
    "discopop": "DiscoPOP was discovered and tuned on the plain DPO margin",
    **dict.fromkeys(
        ("fdpo_forward_kl", "fdpo_js", "fdpo_alpha"),
        "an f-divergence does not split into entropy and cross-entropy as the reverse KL does",
    ),
    # the losses coupled across the step (objectives/coupled.py)
    "bco_pair": "BCO classifies each plain reward beta*(lp - ref) against the running mean of the rewards",
    **dict.fromkeys(
        ("aot", "aot_unpaired"),
        "AOT compares the sorted distributions of the plain log-ratios, derived without an entropy weight",
    ),
    **dict.fromkeys(
        ("tdpo1", "tdpo2"),
        "TDPO adds the sequential KL to the plain log-ratio margin; it has no entropy weight",
    ),
}

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


def alpha_does_not_apply(loss_type: str) -> str | None:
    """Why H-DPO's alpha means nothing for `loss_type` (a canonical or TDPO name), or None where it applies.

    alpha weighs the policy's entropy in H-DPO's objective, so its reward is alpha*beta*lp - beta*ref: it
    multiplies the policy's log-prob and nothing else. A loss built on that reward takes the alpha.
    """
    if loss_type in ALPHA_LOSS_TYPES:
        return None
    return (
        "alpha is H-DPO's entropy weight, the factor on the policy's log-prob in the reward "
        f"alpha*beta*lp - beta*ref that only {', '.join(sorted(ALPHA_LOSS_TYPES))} build; "
        + _NO_ALPHA[loss_type]
    )


def _check_hyperparameters(
    loss_type: str,
    beta: float,
    alpha: float,
    label_smoothing: float,
    f_alpha: float,
    nll_weight: float,
    discopop_tau: float,
    dpop_lambda: float,
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
    if not discopop_tau > 0:
        raise ValueError(f"discopop_tau must be > 0, got discopop_tau={discopop_tau!r}")
    if not (dpop_lambda >= 0 and math.isfinite(dpop_lambda)):
        raise ValueError(f"dpop_lambda must be a finite number >= 0, got dpop_lambda={dpop_lambda!r}")
    name = canonical_loss_type(loss_type)
    if label_smoothing > 0 and name not in LABEL_SMOOTHING_LOSS_TYPES:
        raise ValueError(
            f"label_smoothing={label_smoothing!r} applies only to "
            f"{', '.join(sorted(LABEL_SMOOTHING_LOSS_TYPES))}, not to loss_type={loss_type!r}"
        )
    if name == "exo_pair" and label_smoothing == 0:
        raise ValueError(
            "loss_type='exo_pair' needs label_smoothing (EXO's eps) in (0, 0.5): its target gives the "
            f"rejected response probability eps, and eps = 0 makes the loss infinite ({EXO_DEFAULT_EPSILON} "
            "is the usual choice)"
        )
    if loss_type in _ALIASES and alpha != 1.0:
        raise ValueError(
            f"loss_type={loss_type!r} is H-DPO with alpha=1, but alpha={alpha!r}; "
            "use loss_type='hdpo' to set alpha"
        )
    if alpha != 1.0 and (why := alpha_does_not_apply(name)) is not None:
        raise ValueError(f"alpha={alpha!r} has no effect with loss_type={loss_type!r}: {why}")


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


def _smoothed_logistic(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """cDPO: -(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z) (Mitchell 2023); eps = 0 is -logsigmoid(z)."""
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


_Terms = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # losses, chosen rewards, rejected rewards


def _robust(lp_w, lp_l, ref_w, ref_l, *, beta: float, alpha: float, eps: float) -> _Terms:
    """rDPO (Chowdhury, Kini, Natarajan, ICML 2024, arXiv:2403.00409: the robust DPO loss, de-biased for
    labels flipped at rate eps; equation number not pinned), with H-DPO's reward.

    With z = alpha*beta*(lp_w - lp_l) - beta*(ref_w - ref_l), H-DPO's logit, and the flip rate eps < 1/2:
        loss = ((1 - eps) * softplus(-z) - eps * softplus(z)) / (1 - 2*eps)
    Its expectation over labels flipped with probability eps is the loss on the clean labels. Unlike
    cDPO it is not bounded below (the -eps*softplus(z) term); eps = 0 is H-DPO. alpha enters as in H-DPO
    (the factor on the policy's log-prob), alpha = 1 is the paper's rDPO. Rewards: alpha*beta*lp - beta*ref.
    """
    chosen, rejected = alpha * beta * lp_w - beta * ref_w, alpha * beta * lp_l - beta * ref_l
    z = chosen - rejected
    losses = ((1 - eps) * F.softplus(-z) - eps * F.softplus(z)) / (1 - 2 * eps)
    return losses, chosen, rejected


def _dpop(lp_w, lp_l, ref_w, ref_l, *, beta: float, alpha: float, lam: float) -> _Terms:
    """DPO-Positive (Pal et al. 2024, "Smaug", arXiv:2402.13228: the DPOP loss; equation number not
    pinned), with H-DPO's reward.

    With z = alpha*beta*(lp_w - lp_l) - beta*(ref_w - ref_l), H-DPO's logit, and a penalty on any fall of
    the chosen response's log-prob below the reference's:
        loss = -logsigmoid(z - beta * lam * max(0, ref_w - lp_w))
    DPO can lower both responses' likelihood as long as the rejected one falls further (on pairs that
    differ in a few tokens, the shared ones go down too); the penalty takes that route away. It reads the
    plain chosen log-ratio whatever alpha, so it holds the chosen likelihood at the reference's; alpha = 1
    is the paper's DPOP, lam = 0 is H-DPO. Rewards: alpha*beta*lp - beta*ref (without the penalty).
    """
    chosen, rejected = alpha * beta * lp_w - beta * ref_w, alpha * beta * lp_l - beta * ref_l
    penalty = beta * lam * torch.relu(ref_w - lp_w)
    return F.softplus(penalty - (chosen - rejected)), chosen, rejected


def _exo_pair(r_w, r_l, *, beta: float, eps: float) -> _Terms:
    """EXO on a pair (Ji et al., ICML 2024, arXiv:2402.00856, Eq. (16): K = 2, the preference label
    smoothed to the target (1 - eps, eps)).

    With z = beta*(r_w - r_l), the policy's pair distribution is (sigmoid(z), sigmoid(-z)); the loss is its
    reverse KL to the target:
        loss = sigmoid(z) * (logsigmoid(z) - log(1 - eps)) + sigmoid(-z) * (logsigmoid(-z) - log eps)
    >= 0, and 0 at z = log((1 - eps) / eps). The authors' code uses eps = exp(-10) and a target of log 1
    for the chosen response; TRL uses eps = 1e-3 and log(1 - eps) as here. Rewards: beta*(lp - ref).
    """
    z = beta * (r_w - r_l)
    losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )
    return losses, beta * r_w, beta * r_l


def _nca_pair(r_w, r_l, *, beta: float) -> _Terms:
    """NCA on a preference pair (Chen et al., NeurIPS 2024, arXiv:2402.05369: the NCA loss with the
    chosen response as the positive and both responses as noise, each of weight 1/2; equation number
    not pinned).

    With the rewards u = beta*(lp - ref) of each response:
        loss = -logsigmoid(u_w) - 1/2 * logsigmoid(-u_w) - 1/2 * logsigmoid(-u_l)
    Each response is scored on its own log-ratio, not on the margin, so the chosen response's likelihood
    is pushed up rather than only above the rejected one's. Rewards: u_w, u_l.
    """
    u_w, u_l = beta * r_w, beta * r_l
    losses = F.softplus(-u_w) + 0.5 * F.softplus(u_w) + 0.5 * F.softplus(u_l)
    return losses, u_w, u_l


def _sppo_hard(r_w, r_l, *, beta: float) -> _Terms:
    """SPPO with hard labels (Wu et al. 2024, arXiv:2405.00675, Eq. (4.7) of Algorithm 1).

    SPPO regresses log(pi/pi_t)(y) onto eta * (P(y beats pi_t) - 1/2); with P = 1 for the chosen and 0 for
    the rejected response, eta = 1/beta and the reference as pi_t:
        loss = (r_w - 1/(2*beta))^2 + (r_l + 1/(2*beta))^2
    0 exactly at r_w = 1/(2*beta), r_l = -1/(2*beta). It equals (h - 1/beta)^2 / 2 + (r_w + r_l)^2 / 2
    (h = r_w - r_l): half of IPO at beta/2 plus a term that pins the two log-ratios' sum at 0. The paper's
    pi_t is the previous iterate of a self-play loop; here it is the fixed reference. Rewards: beta*r.
    """
    margin = 1 / (2 * beta)
    losses = (r_w - margin) ** 2 + (r_l + margin) ** 2
    return losses, beta * r_w, beta * r_l


def _apo(r_w, r_l, *, beta: float, down: bool) -> _Terms:
    """APO (D'Oosterlinck et al. 2024, arXiv:2408.06266): APO-zero, Eq. (7), and APO-down, Eq. (8).

    With u = beta*(lp - ref), each anchored at the reference (u = 0):
        apo_zero: loss = (1 - sigmoid(u_w)) + sigmoid(u_l)        chosen up, rejected down
        apo_down: loss = sigmoid(u_w) + (1 - sigmoid(u_w - u_l))   both down, rejected more
    The paper writes -sigmoid(u_w) + sigmoid(u_l) and sigmoid(u_w) - sigmoid(u_w - u_l); the added 1 makes
    each loss lie in [0, 2] and changes no gradient. Rewards: u_w, u_l.
    """
    u_w, u_l = beta * r_w, beta * r_l
    if down:
        losses = torch.sigmoid(u_w) + torch.sigmoid(u_l - u_w)  # 1 - sigmoid(x) = sigmoid(-x)
    else:
        losses = torch.sigmoid(-u_w) + torch.sigmoid(u_l)
    return losses, u_w, u_l


def _discopop(r_w, r_l, *, beta: float, tau: float) -> _Terms:
    """DiscoPOP, the log-ratio modulated loss (Lu et al., NeurIPS 2024, arXiv:2406.08414, Sec. 6.1,
    Eq. (5)).

    With z = beta*(r_w - r_l), DPO's logit, and the mixing weight m = sigmoid(z / tau):
        loss = (1 - m) * (-logsigmoid(z)) + m * exp(-z)
    a logistic loss where the margin is negative and an exponential one where it is positive; tau = 0.05
    in the paper. The exponential term is computed as exp(logsigmoid(z/tau) - z), which stays finite where
    exp(-z) alone would overflow (m ~ e^(z/tau) there). Rewards: beta*(lp - ref).
    """
    z = beta * (r_w - r_l)
    losses = torch.sigmoid(-z / tau) * F.softplus(-z) + torch.exp(F.logsigmoid(z / tau) - z)
    return losses, beta * r_w, beta * r_l


def _sigmoid_norm(lp_w, lp_l, ref_w, ref_l, n_w, n_l, *, beta: float, alpha: float, eps: float) -> _Terms:
    """Length-normalised DPO (Tulu 3, Lambert et al. 2024, arXiv:2411.15124: the length-normalised DPO
    objective of its preference-tuning section; equation number not pinned), with H-DPO's reward and
    cDPO smoothing.

    Each response's reward is divided by its token count n (at least 1):
        reward = (alpha*beta*lp - beta*ref) / n,   z = reward_w - reward_l
        loss   = -(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z)
    alpha multiplies the policy's term as in H-DPO (alpha*beta*lp/n - beta*ref/n); alpha = 1 is the
    paper's loss. With n_w = n_l = n it is H-DPO at beta/n. Rewards: the normalised ones, so that their
    difference is the logit the loss reads.
    """
    chosen = (alpha * beta * lp_w - beta * ref_w) / n_w
    rejected = (alpha * beta * lp_l - beta * ref_l) / n_l
    return _smoothed_logistic(chosen - rejected, eps), chosen, rejected


def _token_counts(counts: torch.Tensor | None, name: str, shape: torch.Size, dtype: torch.dtype, why: str):
    if counts is None:
        raise ValueError(f"{why} needs {name} (tokens per response, shape (num_pairs,))")
    if counts.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(counts.shape)}")
    # A response with no tokens has lp = 0; dividing by 1 keeps its term 0 rather than NaN.
    return counts.to(dtype).clamp(min=1)


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
    rejected_token_counts: torch.Tensor | None = None,
    nll_weight: float = 0.0,
    discopop_tau: float = DISCOPOP_DEFAULT_TAU,
    nll_logps: torch.Tensor | None = None,
    dpop_lambda: float = DPOP_DEFAULT_LAMBDA,
) -> PreferenceLossOutput:
    """Per-pair preference loss of the DPO family.

    Args:
        policy_chosen_logps, policy_rejected_logps: (num_pairs,) summed log-probs of the chosen /
            rejected response tokens under the policy (lp_w, lp_l). They carry the gradient.
        reference_chosen_logps, reference_rejected_logps: (num_pairs,) the same under the reference
            (ref_w, ref_l). Treated as constants.
        loss_type: one of LOSS_TYPES ("hdpo"; aliases "dpo", "sigmoid" = hdpo with alpha=1).
        beta: strength of the divergence penalty, > 0.
        alpha: H-DPO entropy coefficient, > 0 (1 = DPO; < 1 sharpens, > 1 spreads). It multiplies the
            policy's log-prob in the reward alpha*beta*lp - beta*ref, so it applies to the losses built on
            that reward, ALPHA_LOSS_TYPES (hdpo, robust, sigmoid_norm, dpop); alpha != 1 elsewhere raises,
            saying why (`alpha_does_not_apply`).
        label_smoothing: eps in [0, 0.5): cDPO's assumed flip probability for hdpo, f-DPO and
            sigmoid_norm; rDPO's flip rate for robust; EXO's target mass on the rejected response for
            exo_pair (which needs eps > 0; EXO_DEFAULT_EPSILON is the usual value). Refused elsewhere.
        f_alpha: the alpha-divergence parameter in (0, 1), for "fdpo_alpha".
        chosen_token_counts, rejected_token_counts: (num_pairs,) response token counts: the chosen ones
            for nll_weight > 0 and sigmoid_norm, the rejected ones for sigmoid_norm.
        nll_weight: lambda of the NLL regulariser lambda * (-lp_w / n_w), added per pair.
        discopop_tau: DiscoPOP's temperature, > 0 (default 0.05), for "discopop".
        nll_logps: (num_pairs,) the chosen log-probs the NLL term reads, when they differ from
            `policy_chosen_logps` (LD-DPO's desensitised sums feed the loss, the plain ones the NLL).
        dpop_lambda: DPOP's lambda, >= 0 (default DPOP_DEFAULT_LAMBDA = 50), for "dpop".

    Returns:
        PreferenceLossOutput(losses, chosen_rewards, rejected_rewards), each (num_pairs,), computed in
        float32 (float64 for float64 inputs). Losses are per pair, not reduced; rewards are detached:
        alpha*beta*lp - beta*ref for hdpo, robust and dpop, that divided by n for sigmoid_norm,
        beta*(lp - ref) for the others.

    Formulas (docs/design.md §4), with r = lp - ref and h = r_w - r_l:
        hdpo:   z = alpha*beta*(lp_w - lp_l) - beta*(ref_w - ref_l)        (H-DPO, Omura et al. Sec. 3)
                loss = -(1-eps)*logsigmoid(z) - eps*logsigmoid(-z)          (cDPO, Mitchell)
        ipo:    loss = (h - 1/(2*beta))^2                                   (Azar et al. Eq. 17)
                Summed log-probs, as in the paper; TRL divides h by the response lengths instead.
        hinge:  loss = max(0, 1 - beta*h)                                   (SLiC-HF, RSO)
        f-DPO:  z = beta*(g(r_w) - g(r_l)), loss as for hdpo                (Wang et al. Sec. 4)
                g = f'(exp(r)): forward KL -exp(-r); JS log 2 - softplus(-r);
                alpha-divergence (1 - exp(-f_alpha*r)) / f_alpha, exponents capped (FDPO_MAX_EXPONENT).
        robust, exo_pair, nca_pair, sppo_hard, apo_zero, apo_down, discopop, sigmoid_norm, dpop: see the
                private function of each name (its paper and equation).
    """
    _check_hyperparameters(
        loss_type, beta, alpha, label_smoothing, f_alpha, nll_weight, discopop_tau, dpop_lambda
    )
    name = canonical_loss_type(loss_type)
    inputs = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    shape = policy_chosen_logps.shape
    if policy_chosen_logps.dim() != 1 or any(t.shape != shape for t in inputs):
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise ValueError(f"all four log-prob tensors must have the same shape (num_pairs,), got {shapes}")

    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    lp_w, lp_l = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    ref_w, ref_l = reference_chosen_logps.to(dtype).detach(), reference_rejected_logps.to(dtype).detach()
    r_w, r_l = lp_w - ref_w, lp_l - ref_l
    eps = label_smoothing

    if name == "hdpo":
        chosen_rewards = alpha * beta * lp_w - beta * ref_w
        rejected_rewards = alpha * beta * lp_l - beta * ref_l
        losses = _smoothed_logistic(chosen_rewards - rejected_rewards, eps)
    elif name in ("ipo", "hinge"):
        chosen_rewards, rejected_rewards = beta * r_w, beta * r_l
        h = r_w - r_l
        losses = (h - 1 / (2 * beta)) ** 2 if name == "ipo" else torch.relu(1 - beta * h)
    elif name.startswith("fdpo_"):
        chosen_rewards, rejected_rewards = beta * r_w, beta * r_l
        logits = beta * (_fdpo_g(r_w, name, f_alpha) - _fdpo_g(r_l, name, f_alpha))
        losses = _smoothed_logistic(logits, eps)
    elif name == "robust":
        losses, chosen_rewards, rejected_rewards = _robust(
            lp_w, lp_l, ref_w, ref_l, beta=beta, alpha=alpha, eps=eps
        )
    elif name == "exo_pair":
        losses, chosen_rewards, rejected_rewards = _exo_pair(r_w, r_l, beta=beta, eps=eps)
    elif name == "nca_pair":
        losses, chosen_rewards, rejected_rewards = _nca_pair(r_w, r_l, beta=beta)
    elif name == "sppo_hard":
        losses, chosen_rewards, rejected_rewards = _sppo_hard(r_w, r_l, beta=beta)
    elif name in ("apo_zero", "apo_down"):
        losses, chosen_rewards, rejected_rewards = _apo(r_w, r_l, beta=beta, down=name == "apo_down")
    elif name == "discopop":
        losses, chosen_rewards, rejected_rewards = _discopop(r_w, r_l, beta=beta, tau=discopop_tau)
    elif name == "dpop":
        losses, chosen_rewards, rejected_rewards = _dpop(
            lp_w, lp_l, ref_w, ref_l, beta=beta, alpha=alpha, lam=dpop_lambda
        )
    else:  # sigmoid_norm
        why = "loss_type='sigmoid_norm'"
        n_w = _token_counts(chosen_token_counts, "chosen_token_counts", shape, dtype, why)
        n_l = _token_counts(rejected_token_counts, "rejected_token_counts", shape, dtype, why)
        losses, chosen_rewards, rejected_rewards = _sigmoid_norm(
            lp_w, lp_l, ref_w, ref_l, n_w, n_l, beta=beta, alpha=alpha, eps=eps
        )

    if nll_weight > 0:
        counts = _token_counts(chosen_token_counts, "chosen_token_counts", shape, dtype, "nll_weight > 0")
        nll_lp = lp_w if nll_logps is None else nll_logps.to(dtype)
        losses = losses + nll_weight * (-nll_lp / counts)

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
