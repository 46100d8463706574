"""Metric names, the step accumulator, and the MLflow logger (rank 0) with its null twin.

Per optimizer step the trainer adds per-pair and per-token sums into a `StepAccumulator` on the
device, reduces them across ranks with one collective (`dist.reduce_sums`), and turns the global sums
into the metrics below (DESIGN.md §4-5). The same names, prefixed `eval/`, serve evaluations.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from importlib import metadata

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "STEP_METRICS",
    "MlflowLogger",
    "NullLogger",
    "StepAccumulator",
    "package_versions",
    "peak_memory_mib",
    "resolve_tracking_uri",
]

# Every key the trainer logs per optimizer step; evaluations log the first block under "eval/".
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
STEP_METRICS = (*PAIR_METRICS, "alpha", "grad_norm", "lr", "tokens_per_second", "padding_fraction")
TDPO_METRICS = ("kl/chosen", "kl/rejected", "kl/margin")  # also logged (and under eval/) for TDPO runs


class StepAccumulator:
    """Sums, kept on the device, that become the pair and token metrics after one global reduction.

    Pair sums are divided by the global pair count; token sums by the global count of chosen or
    rejected response tokens, so `entropy/chosen` is a mean over tokens, not over sequences.
    """

    # Fixed names in a fixed order: every rank reduces the same vector, even one that ran only fillers.
    # "stop_requests" counts the ranks that got a stop signal (hdpo_ds/stop.py); it is no metric.
    SUM_KEYS = (
        "pairs", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
        "logps/chosen", "logps/rejected", "tokens/chosen", "tokens/rejected",
        "logratio/chosen", "logratio/rejected", "entropy/chosen", "entropy/rejected",
        "topk_mass/chosen", "topk_mass/rejected", "topk_entropy/chosen", "topk_entropy/rejected",
        "real_tokens", "kl/chosen", "kl/rejected", "stop_requests",
    )  # fmt: skip

    def __init__(self, device: torch.device | str, with_kl: bool = False) -> None:
        self.device = device
        self.with_kl = with_kl
        self.sums: dict[str, torch.Tensor | float] = dict.fromkeys(self.SUM_KEYS, 0.0)

    def add(self, name: str, value: torch.Tensor | float) -> None:
        if name not in self.sums:
            raise KeyError(f"{name!r} is not one of StepAccumulator.SUM_KEYS")
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
        chosen_ref_logps: torch.Tensor,
        rejected_ref_logps: torch.Tensor,
        chosen_tokens: torch.Tensor,
        rejected_tokens: torch.Tensor,
        chosen_token_sums: dict[str, torch.Tensor],
        rejected_token_sums: dict[str, torch.Tensor],
    ) -> None:
        """Per-pair tensors of shape (num_pairs,); token sums are per pair sums of per-token values."""
        self.add("pairs", losses.numel())
        self.add("loss", losses.sum())
        self.add("rewards/chosen", chosen_rewards.sum())
        self.add("rewards/rejected", rejected_rewards.sum())
        self.add("rewards/accuracies", (chosen_rewards > rejected_rewards).sum())
        self.add("logps/chosen", chosen_logps.sum())
        self.add("logps/rejected", rejected_logps.sum())
        self.add("tokens/chosen", chosen_tokens.sum())
        self.add("tokens/rejected", rejected_tokens.sum())
        self.add("logratio/chosen", (chosen_logps - chosen_ref_logps).sum())
        self.add("logratio/rejected", (rejected_logps - rejected_ref_logps).sum())
        for name, value in chosen_token_sums.items():
            self.add(f"{name}/chosen", value.sum())
        for name, value in rejected_token_sums.items():
            self.add(f"{name}/rejected", value.sum())

    def metrics(self, global_sums: dict[str, float], prefix: str = "") -> dict[str, float]:
        """Turn globally reduced sums into the pair metrics (PAIR_METRICS)."""
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
            out[f"logratio/{side}"] = global_sums[f"logratio/{side}"] / tokens[side]
            for name in ("entropy", "topk_mass", "topk_entropy"):
                out[f"{name}/{side}"] = global_sums[f"{name}/{side}"] / tokens[side]
        return {f"{prefix}{k}": v for k, v in out.items()}


def resolve_tracking_uri(configured: str) -> str:
    """logging.tracking_uri, else MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (DESIGN.md §3)."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + os.path.abspath("mlflow.db")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in (
        "hdpo_ds",
        "torch",
        "deepspeed",
        "transformers",
        "datasets",
        "tokenizers",
        "mlflow",
        "flash-attn",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


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


class NullLogger:
    """What ranks other than 0 hold: the same interface, doing nothing."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def log_params(self, params: dict) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_json_artifact(self, name: str, data: dict) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def reopen(self) -> None:
        pass

    def discard_redone_steps(self, resume_step: int) -> int:
        return 0


class MlflowLogger:
    """One MLflow run, written through MlflowClient (no global active-run state)."""

    _MAX_PARAMS_PER_CALL = 100  # MLflow's log_batch limit
    _MAX_PARAM_CHARS = 6000

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, run_id: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        if run_id:
            self.run_id = run_id
        else:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run = self.client.create_run(experiment_id, run_name=run_name or None)
            self.run_id = run.info.run_id
        self.experiment = experiment

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[: self._MAX_PARAM_CHARS]) for k, v in sorted(params.items())]
        for start in range(0, len(items), self._MAX_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=items[start : start + self._MAX_PARAMS_PER_CALL])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_json_artifact(self, name: str, data: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, name)
            with open(path, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
            self.client.log_artifact(self.run_id, path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def reopen(self) -> None:
        """Mark a resumed run as running again."""
        self.client.update_run(self.run_id, status="RUNNING")

    def discard_redone_steps(self, resume_step: int) -> int:
        """Before a resumed run logs steps again: remove the points it will log anew, so that they
        replace the old ones instead of standing twice (MLflow has no API for it: issue mlflow#2973).

        Removes training metrics at steps >= resume_step and evaluation metrics at steps > resume_step
        (the evaluation at resume_step ran before the checkpoint was written). Works on database
        tracking stores (sqlite, postgresql, mysql); a remote tracking server cannot delete points,
        so there the old points stay and a warning and a `hdpo_ds.resumed_at_step` tag say so.
        Returns the number of points removed.
        """
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        self.set_tags({f"hdpo_ds.resumed_at_step.{int(time.time())}": str(resume_step)})
        store = self.client._tracking_client.store
        if not isinstance(store, SqlAlchemyStore):
            logger.warning(
                "MLflow at %s cannot delete metric points: steps from %d on, logged before the restart, "
                "appear twice in run %s", self.tracking_uri, resume_step, self.run_id,
            )  # fmt: skip
            return 0
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric
        from sqlalchemy import and_, or_

        redone = or_(
            and_(~SqlMetric.key.like("eval/%"), SqlMetric.step >= resume_step),
            SqlMetric.step > resume_step,
        )
        with store.ManagedSessionMaker(read_only=False) as session:
            removed = (
                session.query(SqlMetric)
                .filter(SqlMetric.run_uuid == self.run_id, redone)
                .delete(synchronize_session=False)
            )
            # latest_metrics holds one row per key; rebuild it from the points that remain
            session.query(SqlLatestMetric).filter(SqlLatestMetric.run_uuid == self.run_id).delete(
                synchronize_session=False
            )
            latest: dict[str, SqlMetric] = {}
            for m in session.query(SqlMetric).filter(SqlMetric.run_uuid == self.run_id):
                best = latest.get(m.key)
                if best is None or (m.step, m.timestamp, m.value) > (best.step, best.timestamp, best.value):
                    latest[m.key] = m
            for m in latest.values():
                session.add(SqlLatestMetric(key=m.key, value=m.value, timestamp=m.timestamp, step=m.step,
                                            is_nan=m.is_nan, run_uuid=m.run_uuid))  # fmt: skip
        logger.info("MLflow run %s: removed %d metric point(s) from step %d on, to be logged again",
                    self.run_id, removed, resume_step)  # fmt: skip
        return removed
