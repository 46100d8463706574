"""Metric names and the step accumulator (the MLflow logger: mlflow_logger.py).

Per optimizer step the trainer adds per-pair and per-token sums into a `StepAccumulator` on the
device, reduces them across ranks with one all-reduce (`dist.reduce_sums`: the step's second collective,
after the non-finite agreement before the update), and turns the global sums
into the metrics below (docs/design.md §4-5). The same names, prefixed `eval/`, serve evaluations.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

__all__ = [
    "PERF_METRICS",
    "REFERENCE_METRICS",
    "STEP_METRICS",
    "SYNC_METRICS",
    "StepAccumulator",
    "peak_memory_mib",
    "source_metrics",
    "source_sums",
]

# The keys the trainer logs at every optimizer step (tests/test_trainer.py checks the set is exact); with
# loss.alpha=auto also alpha/next, alpha/entropy_smoothed, alpha/target_entropy, and for TDPO kl/*; with
# reference.sync on, reference/syncs (SYNC_METRICS: the reference updates so far); without a reference
# (SimPO, CPO, ORPO) no REFERENCE_METRICS; bco_pair adds bco/baseline, aot and aot_unpaired
# aot/prepass_s (recipes/preference.py `_coupling_metrics`). Evaluations log the first block under "eval/".
PAIR_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logps/chosen_mean",
    "logps/rejected_mean",
    "logratio/chosen",
    "logratio/rejected",
    "entropy/chosen",
    "entropy/rejected",
    "topk_mass/chosen",
    "topk_mass/rejected",
    "topk_entropy/chosen",
    "topk_entropy/rejected",
)
# The metrics that compare the policy with a reference: absent from a reference-free run.
REFERENCE_METRICS = ("logratio/chosen", "logratio/rejected")
SYNC_METRICS = ("reference/syncs",)
# Throughput and model FLOPs utilisation per step (runtime/perf.py); the times are rank 0's phases.
PERF_METRICS = (
    "perf/mfu",
    "perf/tflops_per_device",
    "perf/tokens_per_second_per_device",
    "perf/time/data_s",
    "perf/time/forward_s",
    "perf/time/backward_s",
    "perf/time/optimizer_s",
    "perf/time/reference_s",
    "perf/time/other_s",
)
STEP_METRICS = (
    *PAIR_METRICS,
    *PERF_METRICS,
    "alpha",
    "grad_norm",
    "lr",
    "tokens",
    "step_time_s",
    "tokens_per_second",
    "padding_fraction",
    "packing_fill",
    "nonfinite/skipped_steps",
)


class StepAccumulator:
    """Sums, kept on the device, that become the pair and token metrics after one global reduction.

    Pair sums are divided by the global pair count; token sums by the global count of chosen or
    rejected response tokens, so `entropy/chosen` is a mean over tokens, not over sequences.
    `with_reference=False` (a reference-free objective): `add_pairs` takes no reference log-probs and
    `metrics` has no REFERENCE_METRICS; their sums stay 0, so every rank still reduces the same vector.
    """

    # Fixed names in a fixed order: every rank reduces the same vector, even one that ran only fillers.
    # "stop_requests" counts the ranks that got a stop signal (hdpo_ds/runtime/stop.py); it is no metric.
    SUM_KEYS = (
        "pairs",
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "tokens/chosen",
        "tokens/rejected",
        "logratio/chosen",
        "logratio/rejected",
        "entropy/chosen",
        "entropy/rejected",
        "topk_mass/chosen",
        "topk_mass/rejected",
        "topk_entropy/chosen",
        "topk_entropy/rejected",
        "real_tokens",
        "kl/chosen",
        "kl/rejected",
        "stop_requests",
    )

    def __init__(
        self,
        device: torch.device | str,
        with_kl: bool = False,
        with_reference: bool = True,
        pair_means: tuple[str, ...] = (),
    ) -> None:
        """`pair_means`: more per-pair sums that become means over the step's pairs (the objective's
        `pair_metrics`, e.g. loss/<term> of a combination, wpo/weight): fixed per run, so every rank
        still reduces the same vector."""
        self.device = device
        self.with_kl = with_kl
        self.with_reference = with_reference
        self.pair_means = tuple(pair_means)
        clash = set(self.pair_means) & set(self.SUM_KEYS)
        if clash:
            raise ValueError(f"pair_means {sorted(clash)} are StepAccumulator.SUM_KEYS already")
        self.sums: dict[str, torch.Tensor | float] = dict.fromkeys((*self.SUM_KEYS, *self.pair_means), 0.0)

    def add(self, name: str, value: torch.Tensor | float) -> None:
        if name not in self.sums:
            raise KeyError(f"{name!r} is not one of StepAccumulator.SUM_KEYS or its pair_means")
        value = value.detach().to(self.device, torch.float64) if torch.is_tensor(value) else float(value)
        self.sums[name] = self.sums[name] + value

    def add_pairs(
        self,
        *,
        losses: torch.Tensor,
        chosen_rewards: torch.Tensor,
        rejected_rewards: torch.Tensor,
        chosen_logps: torch.Tensor,
        rejected_logps: torch.Tensor,
        chosen_ref_logps: torch.Tensor | None,
        rejected_ref_logps: torch.Tensor | None,
        chosen_tokens: torch.Tensor,
        rejected_tokens: torch.Tensor,
        chosen_token_sums: dict[str, torch.Tensor],
        rejected_token_sums: dict[str, torch.Tensor],
    ) -> None:
        """Per-pair tensors of shape (num_pairs,); token sums are per pair sums of per-token values. The
        reference log-probs are given exactly when the accumulator was made `with_reference`."""
        given = (chosen_ref_logps is not None, rejected_ref_logps is not None)
        if given != (self.with_reference, self.with_reference):
            raise ValueError(
                f"StepAccumulator(with_reference={self.with_reference}): chosen_ref_logps and "
                f"rejected_ref_logps must {'both be given' if self.with_reference else 'be None'}"
            )
        self.add("pairs", losses.numel())
        self.add("loss", losses.sum())
        self.add("rewards/chosen", chosen_rewards.sum())
        self.add("rewards/rejected", rejected_rewards.sum())
        self.add("rewards/accuracies", (chosen_rewards > rejected_rewards).sum())
        self.add("logps/chosen", chosen_logps.sum())
        self.add("logps/rejected", rejected_logps.sum())
        self.add("tokens/chosen", chosen_tokens.sum())
        self.add("tokens/rejected", rejected_tokens.sum())
        if self.with_reference:
            self.add("logratio/chosen", (chosen_logps - chosen_ref_logps).sum())
            self.add("logratio/rejected", (rejected_logps - rejected_ref_logps).sum())
        for name, value in chosen_token_sums.items():
            self.add(f"{name}/chosen", value.sum())
        for name, value in rejected_token_sums.items():
            self.add(f"{name}/rejected", value.sum())

    def metrics(self, global_sums: dict[str, float], prefix: str = "") -> dict[str, float]:
        """Turn globally reduced sums into the pair metrics (PAIR_METRICS; less REFERENCE_METRICS
        without a reference)."""
        pairs = max(global_sums.get("pairs", 0.0), 1.0)
        tokens = {side: max(global_sums.get(f"tokens/{side}", 0.0), 1.0) for side in ("chosen", "rejected")}
        out = {
            "loss": global_sums["loss"] / pairs,
            "rewards/chosen": global_sums["rewards/chosen"] / pairs,
            "rewards/rejected": global_sums["rewards/rejected"] / pairs,
            "rewards/margins": (global_sums["rewards/chosen"] - global_sums["rewards/rejected"]) / pairs,
            "rewards/accuracies": global_sums["rewards/accuracies"] / pairs,
        }
        if self.with_kl:  # TDPO: the sequential KL per pair, and rejected minus chosen
            out["kl/chosen"] = global_sums["kl/chosen"] / pairs
            out["kl/rejected"] = global_sums["kl/rejected"] / pairs
            out["kl/margin"] = out["kl/rejected"] - out["kl/chosen"]
        for side in ("chosen", "rejected"):
            out[f"logps/{side}"] = global_sums[f"logps/{side}"] / pairs
            out[f"logps/{side}_mean"] = global_sums[f"logps/{side}"] / tokens[side]
            if self.with_reference:
                out[f"logratio/{side}"] = global_sums[f"logratio/{side}"] / tokens[side]
            for name in ("entropy", "topk_mass", "topk_entropy"):
                out[f"{name}/{side}"] = global_sums[f"{name}/{side}"] / tokens[side]
        for name in self.pair_means:
            out[name] = global_sums[name] / pairs
        return {f"{prefix}{k}": v for k, v in out.items()}


# Per source of the evaluation data (its data.eval_files entry), logged as eval/source<i>/<name> when the
# evaluation data has more than one source.
SOURCE_METRICS = ("pairs", "loss", "rewards/accuracies", "rewards/margins")


def source_sums(
    losses: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    sources: torch.Tensor,
    num_sources: int,
) -> dict[str, torch.Tensor]:
    """Per-source sums of one micro-batch's pairs, all (num_pairs,) tensors, ``sources`` the pairs' source
    indices in [0, num_sources): ``source<i>/pairs``, ``/loss`` (sum of losses), ``/rewards/accuracies``
    (pairs with chosen reward > rejected reward, as in :class:`StepAccumulator`), ``/rewards/margins``
    (sum of chosen - rejected rewards). Reduce across ranks, then :func:`source_metrics`."""
    sources = sources.to(device=losses.device, dtype=torch.long)
    per_pair = {
        "pairs": torch.ones_like(losses, dtype=torch.float64),
        "loss": losses.detach().double(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).double(),
        "rewards/margins": (chosen_rewards - rejected_rewards).detach().double(),
    }
    out = {}
    for name, values in per_pair.items():
        sums = torch.zeros(num_sources, dtype=torch.float64, device=losses.device)
        sums.index_add_(0, sources, values)
        out.update({f"source{i}/{name}": sums[i] for i in range(num_sources)})
    return out


def source_metrics(global_sums: dict[str, float], num_sources: int, prefix: str = "") -> dict[str, float]:
    """Globally reduced :func:`source_sums` -> ``<prefix>source<i>/pairs`` and the per-pair means of
    loss, rewards/accuracies and rewards/margins (a source with no pairs: only its count, 0)."""
    out = {}
    for i in range(num_sources):
        pairs = global_sums.get(f"source{i}/pairs", 0.0)
        out[f"{prefix}source{i}/pairs"] = pairs
        if pairs:
            for name in SOURCE_METRICS[1:]:
                out[f"{prefix}source{i}/{name}"] = global_sums[f"source{i}/{name}"] / pairs
    return out


def peak_memory_mib() -> dict[str, float]:
    """This process's peak host RSS and, on CUDA, peak allocated device memory (MiB)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    out["peak_host_rss_mib"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    if torch.cuda.is_available():
        out["peak_device_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out
