"""Metric names, the step accumulator, and the MLflow logger (rank 0) with its null twin.

Per optimizer step the trainer adds per-pair and per-token sums into a `StepAccumulator` on the
device, reduces them across ranks with one all-reduce (`dist.reduce_sums`: the step's second collective,
after the non-finite agreement before the update), and turns the global sums
into the metrics below (DESIGN.md §4-5). The same names, prefixed `eval/`, serve evaluations.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import platform
import time
from importlib import metadata
from typing import TYPE_CHECKING

import torch

from hdpo_ds.config import ConfigError

if TYPE_CHECKING:
    from hdpo_ds.config import Config

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

# The keys the trainer logs at every optimizer step (tests/test_trainer.py checks the set is exact); with
# loss.alpha=auto also alpha/next, alpha/entropy_smoothed, alpha/target_entropy, and for TDPO kl/*.
# Evaluations log the first block under "eval/".
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
STEP_METRICS = (
    *PAIR_METRICS,
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

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        pass

    def flush(self, timeout_s: float | None = None) -> bool:
        return True

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def reopen(self, resume_step: int | None = None) -> None:
        pass


class MlflowLogger:
    """One MLflow run, written through a durable spool and a background sender (hdpo_ds/spool.py).

    Every call writes a record to `<output_dir>/mlflow_spool/` and returns at once: the training loop
    never waits on the network. The sender delivers records in order and retries while the tracking
    server is unreachable; `finish` waits at most `flush_timeout_s` for the rest, and what is still
    unsent then goes out when the run resumes or with `python -m hdpo_ds.spool replay OUTPUT_DIR`. Each
    key's steps increase within a process; a resumed run's points at steps the server already has (it
    redoes them exactly) are skipped by the sender, so every step keeps one point.

    A new run is created at once (its id goes into checkpoints), so an unreachable server stops a
    new run at start-up; a resumed run (run_id given) needs no server to start.
    """

    _MAX_PARAM_CHARS = 6000

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        run_id: str | None = None,
        *,
        spool_dir: str,
        flush_timeout_s: float = 60.0,
        retry_max_interval_s: float = 30.0,
    ) -> None:
        from hdpo_ds import spool

        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.flush_timeout_s = flush_timeout_s
        self._spool = spool.Spool(
            spool_dir, tracking_uri
        )  # first: a held spool must not leave a new run behind
        try:
            sender = spool.MlflowSender(tracking_uri)
            self.run_id = run_id or sender.create_run(experiment, run_name)
        except BaseException:
            self._spool.close()
            raise
        where = f"MLflow at {tracking_uri}"
        self._spooler = spool.Spooler(
            self._spool, sender, retry_max_interval_s=retry_max_interval_s, describe=where
        )
        self._last_steps: dict[str, int] = {}  # per key, the last step this process logged
        self._finished = False
        atexit.register(self._at_exit)

    @classmethod
    def for_run(cls, cfg: Config, run_id: str | None = None) -> MlflowLogger:
        """The trainer's logger: cfg.logging's tracking URI and limits, the spool in cfg.output_dir."""
        from hdpo_ds import spool

        options = cfg.logging
        applied = spool.bound_http_retries(options.http_max_retries, options.http_timeout_s)
        if applied:
            logger.info("MLflow HTTP client bounded: %s", ", ".join(f"{k}={v}" for k, v in applied.items()))
        uri = resolve_tracking_uri(options.tracking_uri)
        try:
            return cls(uri, options.experiment, options.run_name, run_id=run_id,
                       spool_dir=spool.spool_dir(cfg.output_dir), flush_timeout_s=options.flush_timeout_s,
                       retry_max_interval_s=options.retry_max_interval_s)  # fmt: skip
        except spool.SpoolError as e:  # held by another run, or damaged
            raise ConfigError(f"output_dir: {e}") from e
        except spool.MlflowUnreachableError as e:
            raise ConfigError(
                f"logging.tracking_uri: {e}. A new run needs its tracking server at start-up: start it, or point "
                "logging.tracking_uri (or MLFLOW_TRACKING_URI) elsewhere. A resumed run starts without it."
            ) from e

    def _put(self, op: str, **payload) -> None:
        if self._finished:
            raise RuntimeError(f"MLflow run {self.run_id}: logging after finish()")
        self._spooler.put(op, self.run_id, **payload)

    def log_params(self, params: dict) -> None:
        self._put("params", params={k: str(v)[: self._MAX_PARAM_CHARS] for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        # One point per key and step: the sender skips a point at a step its key reached before.
        step = int(step)
        for key in metrics:
            if self._last_steps.get(key, step - 1) >= step:
                last = self._last_steps[key]
                raise ValueError(f"MLflow run {self.run_id}: {key!r} at step {step} after step {last}")
        self._last_steps.update(dict.fromkeys(metrics, step))
        # The timestamp is fixed here, so a replayed point is the same point.
        self._put("metrics", step=step, metrics={k: float(v) for k, v in metrics.items()})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._put("tags", tags={k: str(v) for k, v in tags.items()})

    def log_json_artifact(self, name: str, data: dict) -> None:
        text = json.dumps(data, indent=2, sort_keys=True).encode()
        self._put("artifact", file=self._spool.store_file(None, name, data=text), artifact_path=None)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """A file (or folder), copied into the spool now: the caller may change or delete it after."""
        if not os.path.exists(local_path):
            raise FileNotFoundError(f"log_artifact: no such file or folder {local_path}")
        self._put(
            "artifact", file=self._spool.store_file(local_path, local_path), artifact_path=artifact_path
        )

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait (at most timeout_s, default logging.flush_timeout_s) until every record is sent."""
        return self._spooler.flush(self.flush_timeout_s if timeout_s is None else timeout_s)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run: its spool summary as tags, the status, then a bounded wait for the backlog."""
        if self._finished:
            return
        self._put("summary")
        self._put("status", status=status)
        self._close()

    def _close(self) -> None:
        from hdpo_ds import spool

        self._finished = True
        drained = self._spooler.close(self.flush_timeout_s)
        line = spool.summary_line(self.run_id, self._spooler.counters_for(self.run_id), self._spool.pending,
                                  self._spool.root, self.tracking_uri)  # fmt: skip
        (logger.info if drained else logger.warning)(line)

    def _at_exit(self) -> None:
        # A run that ended on an exception: give its records the same bounded chance to go out.
        if not self._finished:
            self._close()

    def reopen(self, resume_step: int | None = None) -> None:
        """Mark a resumed run as running again (and tag the checkpoint step it resumed from). The steps it
        redoes need nothing more: their points reach MLflow once (spool.Spooler skips the copies)."""
        self._put("status", status="RUNNING")
        self._spooler.learn(self.run_id)
        if resume_step is not None:
            self.set_tags({f"hdpo_ds.resumed_at_step.{int(time.time())}": str(resume_step)})
