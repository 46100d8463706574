"""The MLflow logger (rank 0), written through the durable spool, with its null twin for other ranks."""

from __future__ import annotations

import atexit
import json
import logging
import os
import time
from typing import TYPE_CHECKING

from hdpo_ds.config import ConfigError

if TYPE_CHECKING:
    from hdpo_ds.config import Config

logger = logging.getLogger(__name__)

__all__ = ["MlflowLogger", "NullLogger", "resolve_tracking_uri"]


def resolve_tracking_uri(configured: str) -> str:
    """logging.tracking_uri, else MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (docs/design.md §3)."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + os.path.abspath("mlflow.db")


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
    """One MLflow run, written through a durable spool and a background sender (hdpo_ds/tracking/spool.py).

    Every call writes a record to `<output_dir>/mlflow_spool/` and returns at once: the training loop never
    waits on the network. The sender delivers records in order and retries while the tracking server is
    unreachable; `finish` waits at most `flush_timeout_s` for the rest, and what is still unsent then goes out
    when the run resumes or with `python -m hdpo_ds.tracking.spool replay OUTPUT_DIR`. Each key's steps
    increase within a process; a resumed run's points at steps the server already has (it redoes them exactly)
    are skipped by the sender, so every step keeps one point.

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
        from hdpo_ds.tracking import spool

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
        from hdpo_ds.tracking import spool

        options = cfg.logging
        applied = spool.bound_http_retries(options.http_max_retries, options.http_timeout_s)
        if applied:
            logger.info("MLflow HTTP client bounded: %s", ", ".join(f"{k}={v}" for k, v in applied.items()))
        uri = resolve_tracking_uri(options.tracking_uri)
        try:
            return cls(
                uri,
                options.experiment,
                options.run_name,
                run_id=run_id,
                spool_dir=spool.spool_dir(cfg.output_dir),
                flush_timeout_s=options.flush_timeout_s,
                retry_max_interval_s=options.retry_max_interval_s,
            )
        except spool.SpoolError as e:  # held by another run, or damaged
            raise ConfigError(f"output_dir: {e}") from e
        except spool.MlflowUnreachableError as e:
            raise ConfigError(
                f"logging.tracking_uri: {e}. A new run needs its tracking server at start-up: start it, or "
                "point logging.tracking_uri (or MLFLOW_TRACKING_URI) elsewhere. A resumed run starts "
                "without it."
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
        from hdpo_ds.tracking import spool

        self._finished = True
        drained = self._spooler.close(self.flush_timeout_s)
        line = spool.summary_line(
            self.run_id,
            self._spooler.counters_for(self.run_id),
            self._spool.pending,
            self._spool.root,
            self.tracking_uri,
        )
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
