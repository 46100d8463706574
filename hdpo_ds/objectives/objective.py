"""One interface over the loss family, so a recipe never branches on the loss type (docs/design.md §4, §6).

An objective says what it needs from the reference and turns per-sequence values into per-pair losses:

- `needs_reference`: False for the reference-free losses (SimPO, CPO, ORPO): the recipe then builds no
  reference at all (no engine, no cache, no reference pass) and never calls `reference_values`.
- `needs_reference_logits`: False for the sequence-level losses (H-DPO and its siblings), which need
  only the reference's summed log-prob per sequence (so an Arrow reference cache can serve them); True
  for TDPO, which needs the reference's whole next-token distribution at every response position.
- `sequence_kl(policy_logits, reference_logits, labels, seq_index, num_seqs, mask)`: the per-sequence
  summed token-level KL(ref || policy) the loss needs (None for sequence-level losses).
- `pair_loss(terms, alpha)`: the per-pair losses and rewards (`PairLoss`), from `PairTerms`.
- `pair_metrics`: the names of the per-pair values `pair_loss` adds in `PairLoss.extras` (a
  combination's `loss/<term>`), logged as means over the step's pairs.

The reference is duck-typed (anything with `sequence_logps(batch, token_weights)`, or `logits(batch)`
and `sums_from_logits(logits, batch)`): `reference_values(reference, batch, token_weights)` asks it for
what the objective needs; `token_weights` are LD-DPO's per-token weights (objectives/modifiers.py), or
None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from hdpo_ds.objectives.coupled import (
    AOT_LOSS_TYPES,
    COUPLED_LOSS_TYPES,
    aot_loss,
    bco_pair_loss,
)
from hdpo_ds.objectives.logprobs import segment_sums, token_kl
from hdpo_ds.objectives.losses import (
    ALPHA_LOSS_TYPES,
    DISCOPOP_DEFAULT_TAU,
    DPOP_DEFAULT_LAMBDA,
    TDPO_LOSS_TYPES,
    preference_loss,
    tdpo_loss,
)
from hdpo_ds.objectives.modifiers import SFT_TERM, sft_loss
from hdpo_ds.objectives.reference_free import REFERENCE_FREE_LOSS_TYPES, reference_free_loss

__all__ = [
    "CombinedObjective",
    "CoupledObjective",
    "Objective",
    "PairLoss",
    "PairTerms",
    "ReferenceFreeObjective",
    "SequenceObjective",
    "TokenKLObjective",
    "make_objective",
]


@dataclass
class PairTerms:
    """Per-pair inputs of a loss, each (num_pairs,) in pair order: summed policy and reference log-probs
    of the chosen and rejected responses, each response's token count (the NLL term and sigmoid_norm
    read them), and (TDPO) the summed token-level KL of each response."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    reference_chosen: torch.Tensor | None  # None for a reference-free objective (needs_reference False)
    reference_rejected: torch.Tensor | None
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    kl_chosen: torch.Tensor | None = None
    kl_rejected: torch.Tensor | None = None
    # What couples the pairs of a step (CoupledObjective), constants: BCO's reward baseline, or each
    # pair's partners in AOT's sorted pairing, (num_pairs, 2) (objectives/coupled.py `aot_partners`).
    reward_baseline: float | None = None
    partners: torch.Tensor | None = None
    # With loss.ld_alpha (LD-DPO) the log-prob fields above are the length-desensitised sums; the NLL
    # terms (nll_weight, a combination's sft) read the chosen response's plain sum from here.
    nll_chosen: torch.Tensor | None = None

    @property
    def chosen_for_nll(self) -> torch.Tensor:
        return self.policy_chosen if self.nll_chosen is None else self.nll_chosen


@dataclass
class PairLoss:
    """Per-pair outputs, each (num_pairs,); rewards and KLs detached. `kl` is None unless the objective
    has a KL term (then it is logged as kl/chosen and kl/rejected)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    kl: tuple[torch.Tensor, torch.Tensor] | None = None
    # Per-pair values logged as their mean over the step's pairs (names in the objective's
    # `pair_metrics`), e.g. each term of a weighted combination, unweighted: "loss/sft".
    extras: dict[str, torch.Tensor] | None = None


class Objective(Protocol):
    pair_metrics: tuple[str, ...]  # the PairLoss.extras names, the same on every rank and step
    needs_reference: bool
    coupling: str | None  # None, "baseline" (bco_pair) or "sort" (aot, aot_unpaired): CoupledObjective
    needs_reference_logits: bool
    has_kl: bool

    def reference_values(
        self, reference: Any, batch: Any, token_weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def sequence_kl(
        self,
        policy_logits: torch.Tensor,
        reference_logits: torch.Tensor | None,
        labels: torch.Tensor,
        seq_index: torch.Tensor,
        num_seqs: int,
        mask: torch.Tensor,
    ) -> torch.Tensor | None: ...

    def pair_loss(self, terms: PairTerms, alpha: float) -> PairLoss: ...


@dataclass(frozen=True)
class SequenceObjective:
    """The sequence-level losses (objectives/losses.py `preference_loss`, `LOSS_TYPES`: H-DPO, DPO, cDPO,
    IPO, hinge, f-DPO, rDPO, EXO, NCA, SPPO, APO, DiscoPOP, length-normalised DPO, DPOP) on summed sequence
    log-probs; alpha is H-DPO's and may change from step to step (the adaptive controller)."""

    loss_type: str
    beta: float
    label_smoothing: float = 0.0
    f_alpha: float = 0.5
    nll_weight: float = 0.0
    discopop_tau: float = DISCOPOP_DEFAULT_TAU
    dpop_lambda: float = DPOP_DEFAULT_LAMBDA
    needs_reference: bool = True
    needs_reference_logits: bool = False
    has_kl: bool = False
    coupling: str | None = None
    pair_metrics: tuple[str, ...] = ()

    def reference_values(self, reference: Any, batch: Any, token_weights=None) -> tuple[torch.Tensor, None]:
        return reference.sequence_logps(batch, token_weights), None

    def sequence_kl(self, policy_logits, reference_logits, labels, seq_index, num_seqs, mask) -> None:
        return None

    def pair_loss(self, terms: PairTerms, alpha: float) -> PairLoss:
        out = preference_loss(
            terms.policy_chosen,
            terms.policy_rejected,
            terms.reference_chosen,
            terms.reference_rejected,
            loss_type=self.loss_type,
            beta=self.beta,
            alpha=alpha,
            label_smoothing=self.label_smoothing,
            f_alpha=self.f_alpha,
            chosen_token_counts=terms.chosen_tokens,
            rejected_token_counts=terms.rejected_tokens,
            nll_weight=self.nll_weight,
            discopop_tau=self.discopop_tau,
            nll_logps=terms.nll_chosen,
            dpop_lambda=self.dpop_lambda,
        )
        return PairLoss(out.losses, out.chosen_rewards, out.rejected_rewards)


@dataclass(frozen=True)
class TokenKLObjective:
    """TDPO1 / TDPO2 (Zeng et al. 2024, Sec. 4; objectives/losses.py `tdpo_loss`): the sequence-level
    margin plus the difference of the responses' summed token-level KL(ref || policy)."""

    loss_type: str
    beta: float
    tdpo_alpha: float
    chunk_size: int
    needs_reference: bool = True
    needs_reference_logits: bool = True
    has_kl: bool = True
    coupling: str | None = None
    pair_metrics: tuple[str, ...] = ()

    def reference_values(
        self, reference: Any, batch: Any, token_weights=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if token_weights is not None:  # config refuses loss.ld_alpha with TDPO
            raise ValueError(f"loss.type={self.loss_type} takes no per-token weights (loss.ld_alpha)")
        logits = reference.logits(batch)
        return reference.sums_from_logits(logits, batch).sums, logits

    def sequence_kl(self, policy_logits, reference_logits, labels, seq_index, num_seqs, mask) -> torch.Tensor:
        kl_tokens = token_kl(policy_logits, reference_logits, labels, chunk_size=self.chunk_size)
        return segment_sums(kl_tokens, seq_index, num_seqs, mask=mask, dtype=torch.float32).sums

    def pair_loss(self, terms: PairTerms, alpha: float) -> PairLoss:
        out = tdpo_loss(
            terms.policy_chosen,
            terms.policy_rejected,
            terms.reference_chosen,
            terms.reference_rejected,
            terms.kl_chosen,
            terms.kl_rejected,
            loss_type=self.loss_type,
            beta=self.beta,
            tdpo_alpha=self.tdpo_alpha,
        )
        return PairLoss(
            out.losses, out.chosen_rewards, out.rejected_rewards, (out.chosen_kl, out.rejected_kl)
        )


@dataclass(frozen=True)
class ReferenceFreeObjective:
    """SimPO, CPO and ORPO (objectives/reference_free.py): losses of the policy's own log-probs and
    response lengths. No reference: the recipe builds none, `reference_values` is never called, and
    PairTerms' reference fields are None. H-DPO's alpha does not apply (config refuses loss.alpha)."""

    loss_type: str
    beta: float
    simpo_gamma: float = 0.5
    needs_reference: bool = False
    needs_reference_logits: bool = False
    has_kl: bool = False
    coupling: str | None = None
    pair_metrics: tuple[str, ...] = ()

    def reference_values(self, reference: Any, batch: Any, token_weights=None) -> tuple[torch.Tensor, None]:
        raise RuntimeError(f"loss.type={self.loss_type} is reference-free: no reference values to ask for")

    def sequence_kl(self, policy_logits, reference_logits, labels, seq_index, num_seqs, mask) -> None:
        return None

    def pair_loss(self, terms: PairTerms, alpha: float) -> PairLoss:
        out = reference_free_loss(
            self.loss_type,
            terms.policy_chosen,
            terms.policy_rejected,
            terms.chosen_tokens,
            terms.rejected_tokens,
            beta=self.beta,
            simpo_gamma=self.simpo_gamma,
        )
        return PairLoss(out.losses, out.chosen_rewards, out.rejected_rewards)


# ------------------------------------------------------------ losses coupled across the step (issue 21)
@dataclass(frozen=True)
class CoupledObjective:
    """bco_pair, aot, aot_unpaired (objectives/coupled.py): sequence-level losses whose pairs are coupled
    across the optimizer step. The recipe supplies the coupling as constants in PairTerms: the reward
    baseline (`coupling` "baseline") or each pair's sorted partners ("sort", after a no-grad pre-pass
    over the step). H-DPO's alpha does not apply (config refuses it)."""

    loss_type: str
    beta: float
    label_smoothing: float = 0.0
    nll_weight: float = 0.0
    needs_reference: bool = True
    needs_reference_logits: bool = False
    has_kl: bool = False
    pair_metrics: tuple[str, ...] = ()

    @property
    def coupling(self) -> str:
        return "sort" if self.loss_type in AOT_LOSS_TYPES else "baseline"

    @property
    def coupled_type(self) -> str:
        return self.loss_type

    def reference_values(self, reference: Any, batch: Any, token_weights=None) -> tuple[torch.Tensor, None]:
        return reference.sequence_logps(batch, token_weights), None

    def sequence_kl(self, policy_logits, reference_logits, labels, seq_index, num_seqs, mask) -> None:
        return None

    def pair_loss(self, terms: PairTerms, alpha: float) -> PairLoss:
        args = (terms.policy_chosen, terms.policy_rejected, terms.reference_chosen, terms.reference_rejected)
        if self.coupling == "baseline":
            if terms.reward_baseline is None:
                raise ValueError("loss.type=bco_pair needs PairTerms.reward_baseline (the running mean)")
            losses, chosen, rejected = bco_pair_loss(*args, beta=self.beta, baseline=terms.reward_baseline)
        else:
            if terms.partners is None:
                raise ValueError(f"loss.type={self.loss_type} needs PairTerms.partners (the sorted pairing)")
            losses, chosen, rejected = aot_loss(
                *args,
                terms.partners,
                beta=self.beta,
                label_smoothing=self.label_smoothing,
                unpaired=self.loss_type == "aot_unpaired",
            )
        if self.nll_weight > 0:  # the NLL regulariser of the other sequence losses (docs/design.md §4)
            losses = losses + self.nll_weight * sft_loss(
                terms.chosen_for_nll.to(losses.dtype), terms.chosen_tokens
            )
        return PairLoss(losses, chosen, rejected)


# ------------------------------------------------------------------ weighted combinations (issue 21)
@dataclass(frozen=True)
class CombinedObjective:
    """A weighted sum of losses, `loss.type: [hdpo, bco_pair, sft]` with `loss.weights` (MPO, Wang et al.
    2024, Sec. 3.2; objectives/modifiers.py). Each term is one of the objectives above, or None for the
    `sft` term (the chosen-response NLL, `sft_loss`). The loss of a pair is sum_i w_i * loss_i; alpha
    reaches only the terms where it applies (ALPHA_LOSS_TYPES), the others compute at alpha 1. The
    logged rewards are those of the step-coupled term when there is one (bco_pair's running baseline is
    their mean), else of the first term that has rewards; each term's unweighted loss is logged as
    `loss/<name>`; a term of weight 0 is logged and left out of the loss. At most one term couples the step
    (config.py refuses more)."""

    names: tuple[str, ...]
    terms: tuple[Any, ...]  # an Objective per name, None for sft
    weights: tuple[float, ...]

    @property
    def pair_metrics(self) -> tuple[str, ...]:
        return tuple(f"loss/{name}" for name in self.names)

    def _present(self) -> list[Any]:
        return [t for t in self.terms if t is not None]

    @property
    def needs_reference(self) -> bool:
        return any(t.needs_reference for t in self._present())

    @property
    def needs_reference_logits(self) -> bool:
        return any(t.needs_reference_logits for t in self._present())

    @property
    def has_kl(self) -> bool:
        return any(t.has_kl for t in self._present())

    @property
    def coupling(self) -> str | None:
        return next((t.coupling for t in self._present() if t.coupling is not None), None)

    @property
    def coupled_type(self) -> str | None:
        return next((t.loss_type for t in self._present() if t.coupling is not None), None)

    def _first(self, attribute: str) -> Any:
        return next(t for t in self._present() if getattr(t, attribute))

    def reference_values(self, reference: Any, batch: Any, token_weights=None):
        if self.needs_reference_logits:  # TDPO's logits; its sums serve the other terms
            return self._first("needs_reference_logits").reference_values(reference, batch, token_weights)
        return self._first("needs_reference").reference_values(reference, batch, token_weights)

    def sequence_kl(self, policy_logits, reference_logits, labels, seq_index, num_seqs, mask):
        if not self.has_kl:
            return None
        return self._first("has_kl").sequence_kl(
            policy_logits, reference_logits, labels, seq_index, num_seqs, mask
        )

    def pair_loss(self, terms: PairTerms, alpha: float) -> PairLoss:
        total, extras, rewards, kl = None, {}, None, None
        for name, term, weight in zip(self.names, self.terms, self.weights, strict=True):
            if term is None:
                losses = sft_loss(terms.chosen_for_nll, terms.chosen_tokens)
            else:
                out = term.pair_loss(terms, alpha if term.loss_type in ALPHA_LOSS_TYPES else 1.0)
                losses = out.losses
                if rewards is None or term.coupling is not None:
                    rewards = (out.chosen_rewards, out.rejected_rewards)
                kl = kl if out.kl is None else out.kl
            extras[f"loss/{name}"] = losses.detach()
            if weight == 0.0:  # logged only (an ablation control); 0 * inf would be nan
                continue
            total = weight * losses if total is None else total + weight * losses
        return PairLoss(total, rewards[0], rewards[1], kl, extras)


def make_objective(loss: Any, *, chunk_size: int) -> Objective:
    """The objective of a `loss` config section (duck-typed: type (a name or a list of names), weights,
    beta, label_smoothing, f_alpha, nll_weight, discopop_tau, dpop_lambda, tdpo_alpha, simpo_gamma);
    `chunk_size` bounds the (chunk, V) buffers of the token-level KL. config.py has validated the
    combination."""
    if isinstance(loss.type, (list, tuple)):
        weights = loss.weights or [1.0] * len(loss.type)
        terms = tuple(None if name == SFT_TERM else _single(loss, name, chunk_size) for name in loss.type)
        return CombinedObjective(tuple(loss.type), terms, tuple(float(w) for w in weights))
    return _single(loss, loss.type, chunk_size)


def _single(loss: Any, loss_type: str, chunk_size: int) -> Objective:
    if loss_type in REFERENCE_FREE_LOSS_TYPES:
        return ReferenceFreeObjective(loss_type, loss.beta, loss.simpo_gamma)
    if loss_type in TDPO_LOSS_TYPES:
        return TokenKLObjective(loss_type, loss.beta, loss.tdpo_alpha, chunk_size)
    if loss_type in COUPLED_LOSS_TYPES:
        return CoupledObjective(loss_type, loss.beta, loss.label_smoothing, loss.nll_weight)
    return SequenceObjective(
        loss_type,
        loss.beta,
        loss.label_smoothing,
        loss.f_alpha,
        loss.nll_weight,
        loss.discopop_tau,
        loss.dpop_lambda,
    )
