"""MLflow logging that loses nothing and never blocks: a durable local spool and a background sender.

Every logging call appends one record (a JSON line) to a spool file under the run's output folder and
returns; a worker thread sends the records to MLflow in order and marks what the server acknowledged.
While the server is unreachable the worker backs off and retries; records pile up on disk, not in
memory. A later process (a resumed run, or `python -m hdpo_ds.spool replay OUTPUT_DIR`) sends what
an earlier one left. The format and the guarantees are in docs/mlflow.md.

Folder layout (`<output_dir>/mlflow_spool/`):
  records-<first seq, 12 digits>.jsonl   the records, one JSON object per line, seq increasing by 1
  state.json                             acked_seq (all records <= it were acknowledged), tracking_uri,
                                         per-run counters; written atomically
  artifacts/<id>/<name>                  copies of files to upload (deleted once acknowledged)
  rejected.jsonl                         records MLflow refused for good, with the error
  lock                                   flock held by the one process using the spool

This module imports only the standard library at the top, so the replay command starts quickly.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from hdpo_ds.atomic import fsync_dir, fsync_path, write_json

logger = logging.getLogger(__name__)

__all__ = [
    "SPOOL_DIRNAME",
    "MlflowSender",
    "MlflowUnreachableError",
    "Spool",
    "SpoolError",
    "Spooler",
    "bound_http_retries",
    "spool_dir",
]

SPOOL_DIRNAME = "mlflow_spool"
FORMAT_VERSION = 1
SEGMENT_BYTES = 16 * 2**20  # a new records file past this size, so acknowledged files can be deleted
READ_BATCH = 2000  # records the worker holds in memory at most; the backlog stays on disk
MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_CALL = 100
MAX_TAGS_PER_CALL = 100
OPS = ("metrics", "params", "tags", "artifact", "status", "discard", "summary")


class SpoolError(RuntimeError):
    """The spool folder cannot be used (held by another process, unreadable record); names the file."""


class MlflowUnreachableError(RuntimeError):
    """The tracking server did not answer where an answer is needed now (creating a run)."""


class RejectedRecordError(RuntimeError):
    """A record that can never be sent (its artifact copy is gone); it goes to rejected.jsonl."""


def spool_dir(output_dir: str) -> str:
    return os.path.join(output_dir, SPOOL_DIRNAME)


def bound_http_retries(max_retries: int, timeout_s: int) -> dict[str, str]:
    """Bound MLflow's HTTP client (its defaults retry for minutes) unless the user set the variables.

    Returns the variables this call set. MLflow reads them at each request, so this holds for the
    whole process, including the worker thread.
    """
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(max_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # MLflow reads an integer: sleeps of 1, 2, 4... s
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s),
    }
    applied = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(applied)
    return applied


def _now_ms() -> int:
    return int(time.time() * 1000)


def _segment_first_seq(name: str) -> int:
    return int(name[len("records-") : -len(".jsonl")])


class Spool:
    """The on-disk, append-only record log of one output folder.

    `append` (any thread) writes one whole line per record with a single write(2), so a killed
    process leaves every returned record on disk; `fsync` makes them survive a host crash (the
    worker calls it before each send and at least once a second). `read` (one reader thread) returns
    records after the read position; `ack` persists the highest acknowledged seq.
    """

    def __init__(self, root: str, tracking_uri: str | None = None) -> None:
        self.root = os.path.abspath(root)
        os.makedirs(os.path.join(self.root, "artifacts"), exist_ok=True)
        self._lock_fd = self._take_lock()
        self._write_lock = threading.Lock()
        state_path = os.path.join(self.root, "state.json")
        self.state = {"format": FORMAT_VERSION, "acked_seq": 0, "tracking_uri": tracking_uri, "runs": {}}
        if os.path.exists(state_path):
            try:
                with open(state_path) as f:
                    self.state.update(json.load(f))
            except (OSError, ValueError) as e:
                raise SpoolError(f"{state_path}: unreadable spool state ({e})") from e
            if self.state["format"] != FORMAT_VERSION:
                raise SpoolError(
                    f"{state_path}: spool format {self.state['format']}, expected {FORMAT_VERSION}"
                )
        if tracking_uri:
            self.state["tracking_uri"] = tracking_uri
        self.last_seq = self._repair_and_find_last_seq()
        self.acked_seq = min(int(self.state["acked_seq"]), self.last_seq)
        self.state["acked_seq"] = self.acked_seq
        self.backlog_at_open = self.last_seq - self.acked_seq
        self._dirty = False
        self._fd: int | None = None
        self._segment_bytes = 0
        self._new_segment()  # each process writes its own file: a torn tail never sits before new records
        self._reader: tuple[str, int] | None = None  # (segment path, byte offset) of the next unread record
        self._read_seq = self.acked_seq  # the last seq handed out by read()
        self.save_state()

    # ---- opening
    def _take_lock(self) -> int | None:
        path = os.path.join(self.root, "lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(
                f"{self.root} is in use by another process (its lock file {path} is held); two runs must not "
                "share one output_dir"
            ) from None
        except OSError as e:  # some network file systems have no flock: go on, unguarded
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            logger.warning("%s: file locking unsupported (%s); not guarding against a second writer", path, e)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def segments(self) -> list[str]:
        names = [n for n in os.listdir(self.root) if n.startswith("records-") and n.endswith(".jsonl")]
        return [os.path.join(self.root, n) for n in sorted(names, key=_segment_first_seq)]

    def _repair_and_find_last_seq(self) -> int:
        """Cut a torn last line (a process killed in the middle of a write) and return the last seq."""
        for path in reversed(self.segments()):
            with open(path, "rb") as f:
                data = f.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                logger.warning("%s: cut %d bytes of a record torn by a crash (it was never written whole)",
                               path, len(data) - end)  # fmt: skip
                with open(path, "r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
                data = data[:end]
            lines = data.splitlines()
            if lines:
                return int(self._parse(f"{path}:{len(lines)}", lines[-1])["seq"])
        return int(self.state["acked_seq"])

    @staticmethod
    def _parse(where: str, line: bytes) -> dict:
        try:
            record = json.loads(line)
            if (
                not isinstance(record, dict)
                or record.get("op") not in OPS
                or not isinstance(record.get("seq"), int)
            ):
                raise ValueError("not a spool record")
        except ValueError as e:
            raise SpoolError(
                f"{where}: unreadable spool record ({e}); move the file aside to replay the rest"
            ) from e
        return record

    # ---- writing (any thread)
    def _new_segment(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
        path = os.path.join(self.root, f"records-{self.last_seq + 1:012d}.jsonl")
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._segment_path = path
        self._segment_bytes = os.fstat(self._fd).st_size
        fsync_dir(self.root)

    def append(self, op: str, run_id: str, **payload) -> int:
        """Write one record; returns its seq. Payload values must be JSON-serialisable."""
        if op not in OPS:
            raise ValueError(f"unknown spool op {op!r}")
        with self._write_lock:
            seq = self.last_seq + 1
            record = {
                "seq": seq,
                "op": op,
                "run": run_id,
                "time_ms": payload.pop("time_ms", _now_ms()),
                **payload,
            }
            line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
            if self._segment_bytes and self._segment_bytes + len(line) > SEGMENT_BYTES:
                self._new_segment()
            os.write(self._fd, line)  # O_APPEND, one call: the line is whole or absent
            self._segment_bytes += len(line)
            self.last_seq = seq
            self._dirty = True
        return seq

    def store_file(self, source: str | None, name: str, data: bytes | None = None) -> str:
        """Copy a file or folder (or write `data`) into the spool; returns its path relative to the spool."""
        relative = os.path.join("artifacts", uuid.uuid4().hex, os.path.basename(name.rstrip("/")))
        target = os.path.join(self.root, relative)
        os.makedirs(os.path.dirname(target))
        if data is not None:
            with open(target, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        elif os.path.isdir(source):
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
            fsync_path(target)
        return relative

    def fsync(self) -> None:
        with self._write_lock:
            if self._dirty and self._fd is not None:
                os.fsync(self._fd)
                self._dirty = False

    # ---- reading and acknowledging (the worker thread)
    def read(self, limit: int) -> list[dict]:
        """Up to `limit` records after the last one read (oldest first)."""
        out: list[dict] = []
        last_written = self.last_seq
        while len(out) < limit and self._read_seq < last_written:
            if self._reader is None or not os.path.exists(self._reader[0]):
                self._reader = (self._segment_holding(self._read_seq + 1), 0)
            path, _ = self._reader
            self._read_into(out, limit)
            if len(out) >= limit or self._read_seq >= last_written:
                break
            later = [
                s for s in self.segments() if _segment_first_seq(os.path.basename(s)) > self._first_seq(path)
            ]
            if not later:
                break
            # The writer moves to a new file only after its last line here is whole: read that, then move on.
            self._read_into(out, limit)
            if len(out) < limit:
                self._reader = (later[0], 0)
        return out

    def _first_seq(self, path: str) -> int:
        return _segment_first_seq(os.path.basename(path))

    def _segment_holding(self, seq: int) -> str:
        segments = self.segments()
        holding = [s for s in segments if self._first_seq(s) <= seq]
        return holding[-1] if holding else segments[0]

    def _read_into(self, out: list[dict], limit: int) -> None:
        path, offset = self._reader
        with open(path, "rb") as f:
            f.seek(offset)
            while len(out) < limit:
                line = f.readline()
                if not line.endswith(b"\n"):  # end of file, or a line still being written
                    break
                record = self._parse(f"{path} (byte {offset})", line)
                offset += len(line)
                if record["seq"] <= self._read_seq:
                    continue  # acknowledged before this process started
                if record["seq"] != self._read_seq + 1:
                    raise SpoolError(
                        f"{path}: record seq {record['seq']} follows {self._read_seq}: records are missing"
                    )
                self._read_seq = record["seq"]
                out.append(record)
        self._reader = (path, offset)

    def ack(self, seq: int, done_files: list[str] = ()) -> None:
        """Everything up to `seq` reached MLflow: persist it, then delete copies and finished files."""
        self.acked_seq = seq
        self.state["acked_seq"] = seq
        self.save_state()
        for relative in done_files:
            shutil.rmtree(os.path.dirname(os.path.join(self.root, relative)), ignore_errors=True)
        segments = self.segments()
        for path, following in itertools.pairwise(segments):
            if path != self._segment_path and _segment_first_seq(os.path.basename(following)) <= seq + 1:
                os.remove(path)

    def save_state(self) -> None:
        write_json(os.path.join(self.root, "state.json"), self.state)

    def reject(self, record: dict, error: BaseException) -> None:
        path = os.path.join(self.root, "rejected.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps({"record": record, "error": f"{type(error).__name__}: {error}"}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    @property
    def pending(self) -> int:
        return self.last_seq - self.acked_seq

    def close(self) -> None:
        with self._write_lock:
            if self._fd is not None:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
            if self.acked_seq == self.last_seq:  # all sent: state.json alone carries the sequence on
                for path in self.segments():
                    os.remove(path)
            elif self._segment_bytes == 0 and os.path.exists(self._segment_path):
                os.remove(self._segment_path)  # this process wrote nothing
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


@dataclass
class RunCounters:
    """Per MLflow run, kept in state.json across processes."""

    sent: int = 0  # records acknowledged by MLflow
    replayed: int = 0  # of those, records that waited while the server was unreachable (or in an old spool)
    outages: int = 0  # times the server stopped answering
    down_seconds: float = 0.0
    rejected: int = 0  # records MLflow refused for good (in rejected.jsonl)
    superseded: int = 0  # unsent metric points of steps that a resumed run redid (not sent at all)

    def tags(self) -> dict[str, str]:
        return {"hdpo_ds.spool.sent": str(self.sent), "hdpo_ds.spool.replayed": str(self.replayed),
                "hdpo_ds.spool.outages": str(self.outages), "hdpo_ds.spool.down_seconds": f"{self.down_seconds:.1f}",
                "hdpo_ds.spool.rejected": str(self.rejected), "hdpo_ds.spool.superseded": str(self.superseded)}  # fmt: skip


@dataclass
class _Outage:
    since: float | None = None
    delayed_upto: int = 0  # records with seq <= this waited on an outage (or came from an old spool)


class Spooler:
    """The worker thread that drains a Spool through a sender, in order, retrying while it fails.

    sender.send(records, spooler) delivers one group of records (consecutive metrics of one run, or one
    other record) or raises; sender.is_permanent(exc) tells a refusal (the record goes to
    rejected.jsonl) from an outage (back off, retry the same group).
    """

    def __init__(
        self,
        spool: Spool,
        sender,
        *,
        retry_max_interval_s: float = 30.0,
        describe: str = "MLflow",
        start: bool = True,
    ) -> None:
        self.spool = spool
        self.sender = sender
        self.retry_max_interval_s = retry_max_interval_s
        self.describe = describe
        self._cond = threading.Condition()
        self._stop = False
        self._abandon = False
        self._kick = False
        self._outage = _Outage(delayed_upto=spool.last_seq if spool.backlog_at_open else 0)
        self._singles_until = 0  # after a refused group, send its records one by one to isolate the bad one
        self._last_warning = 0.0
        self.counters = {run: RunCounters(**values) for run, values in spool.state["runs"].items()}
        # (seq, resume_step) of each unsent discard, per run: points logged before it at the steps it
        # redoes are not sent at all (a tracking server could not delete them afterwards)
        self._discards: dict[str, list[tuple[int, int]]] = {}
        if spool.backlog_at_open:
            for record in _pending_records(spool):
                if record["op"] == "discard":
                    self._discards.setdefault(record["run"], []).append(
                        (record["seq"], record["resume_step"])
                    )
            logger.info("%s: %d record(s) left unsent by an earlier process; replaying them first",
                        spool.root, spool.backlog_at_open)  # fmt: skip
        self._thread = threading.Thread(target=self._work, name="hdpo-mlflow-spool", daemon=True)
        self._started = False
        if start:
            self.start()

    def start(self) -> None:
        """Start sending (a Spooler made with start=False holds its backlog until then)."""
        with self._cond:
            if not self._started and not (self._stop or self._abandon):
                self._started = True
                self._thread.start()

    # ---- the caller's side
    def put(self, op: str, run_id: str, **payload) -> int:
        seq = self.spool.append(op, run_id, **payload)
        with self._cond:
            if op == "discard":
                self._discards.setdefault(run_id, []).append((seq, payload["resume_step"]))
            if self._outage.since is not None:
                self._outage.delayed_upto = seq
            self._cond.notify_all()
        return seq

    def counters_for(self, run_id: str) -> RunCounters:
        return self.counters.setdefault(run_id, RunCounters())

    @property
    def down(self) -> bool:
        return self._outage.since is not None

    def flush(self, timeout_s: float) -> bool:
        """Wait until every record written so far is acknowledged, at most `timeout_s`; True if so."""
        self.start()
        target = self.spool.last_seq
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._kick = True  # retry now rather than at the end of a back-off
            self._cond.notify_all()
            while self.spool.acked_seq < target and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return self.spool.acked_seq >= target

    def close(self, timeout_s: float) -> bool:
        """Flush (bounded), stop the worker, persist the state and release the spool. True if drained."""
        drained = self.flush(timeout_s)
        with self._cond:
            if drained:
                self._stop = True
            else:
                self._abandon = True  # the worker may sit in a request; it writes nothing more
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0 if drained else 0.2)
        with self._cond:
            self._abandon = True
            self._save_counters()
            self.spool.close()
        return drained

    # ---- the worker
    def _save_counters(self) -> None:
        self.spool.state["runs"] = {run: vars(c).copy() for run, c in self.counters.items()}
        self.spool.save_state()

    def _take_group(self, pending: list[dict]) -> list[dict]:
        first = pending[0]
        if first["op"] != "metrics" or first["seq"] <= self._singles_until:
            return pending[:1]
        group, points = [first], len(first["metrics"])
        for record in pending[1:]:
            if record["op"] != "metrics" or record["run"] != first["run"]:
                break
            if points + len(record["metrics"]) > MAX_METRICS_PER_CALL:
                break
            group.append(record)
            points += len(record["metrics"])
        return group

    def _work(self) -> None:
        try:
            self._loop()
        except Exception:  # the spool itself failed (disk full, a damaged file): say so, keep the records
            logger.exception("the MLflow spool worker stopped; unsent records stay in %s", self.spool.root)

    def _loop(self) -> None:
        pending: list[dict] = []
        backoff = first_backoff = min(1.0, self.retry_max_interval_s)
        while True:
            with self._cond:
                if self._abandon:
                    return
                if not pending and self.spool.last_seq <= self.spool._read_seq:
                    if self._stop:
                        return
                    self._cond.wait(1.0)
            self.spool.fsync()  # at least once a second: records survive a host crash
            if not pending:
                pending = self.spool.read(READ_BATCH)
                if not pending:
                    continue
            group = self._take_group(pending)
            sendable = self._without_redone(group)
            try:
                if group[0]["op"] != "metrics" or any(r["metrics"] for r in sendable):
                    self.sender.send(sendable, self)
            except Exception as e:  # classified below: a refusal is recorded, anything else is an outage
                if self.sender.is_permanent(e):
                    if len(group) > 1:
                        self._singles_until = group[-1]["seq"]
                        continue
                    logger.error("%s refused spool record %d (%s of run %s) for good: %s; kept in %s",
                                 self.describe, group[0]["seq"], group[0]["op"], group[0]["run"], e,
                                 os.path.join(self.spool.root, "rejected.jsonl"))  # fmt: skip
                    self.spool.reject(group[0], e)
                    self.counters_for(group[0]["run"]).rejected += 1
                    self._acknowledge(group, pending, delivered=False)
                    continue
                self._on_failure(e, group)
                if not self._sleep(backoff):
                    return
                backoff = min(backoff * 2, self.retry_max_interval_s)
                continue
            backoff = first_backoff
            if sendable is not group:
                superseded = sum(
                    len(a["metrics"]) - len(b["metrics"]) for a, b in zip(group, sendable, strict=True)
                )
                self.counters_for(group[0]["run"]).superseded += superseded
                logger.info("%d metric point(s) of run %s not sent: the resumed run redoes their steps",
                            superseded, group[0]["run"])  # fmt: skip
            self._acknowledge(group, pending)

    def _without_redone(self, group: list[dict]) -> list[dict]:
        """Metrics records minus the points that a later discard of their run removes: training
        metrics at steps >= its resume_step, evaluations after it (spool.discard_redone_steps)."""
        discards = self._discards.get(group[0]["run"]) if group[0]["op"] == "metrics" else None
        if not discards:
            return group
        out, changed = [], False
        for record in group:
            steps = [step for seq, step in discards if seq > record["seq"]]
            if steps and record["step"] >= min(steps):
                # at the resume step itself the evaluation stays: it ran before the checkpoint was written
                kept = (
                    {}
                    if record["step"] > min(steps)
                    else {k: v for k, v in record["metrics"].items() if k.startswith("eval/")}
                )
                record, changed = {**record, "metrics": kept}, True
            out.append(record)
        return out if changed else group

    def _sleep(self, seconds: float) -> bool:
        """Back off; a flush cuts it short. False when the worker must quit."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while not (self._abandon or self._kick):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
            self._kick = False
            return not self._abandon

    def _on_failure(self, error: BaseException, group: list[dict]) -> None:
        now = time.monotonic()
        with self._cond:
            if self._abandon:
                return
            if self._outage.since is None:
                self._outage.since = now
                self.counters_for(group[0]["run"]).outages += 1
                self._save_counters()  # a process killed during the outage still counts it
                logger.warning("%s unreachable (%s); training goes on and records wait in %s (%d pending); "
                               "retrying every <= %.0f s", self.describe, error, self.spool.root, self.spool.pending,
                               self.retry_max_interval_s)  # fmt: skip
                self._last_warning = now
            elif now - self._last_warning > 300:
                logger.warning("%s still unreachable after %.0f s (%s); %d records pending in %s", self.describe,
                               now - self._outage.since, error, self.spool.pending, self.spool.root)  # fmt: skip
                self._last_warning = now
            self._outage.delayed_upto = max(self._outage.delayed_upto, self.spool.last_seq)

    def _acknowledge(self, group: list[dict], pending: list[dict], delivered: bool = True) -> None:
        with self._cond:
            if self._abandon:
                return
            if self._outage.since is not None:
                down = time.monotonic() - self._outage.since
                self.counters_for(group[0]["run"]).down_seconds += down
                logger.info("%s reachable again after %.1f s; sending %d waiting record(s)",
                            self.describe, down, self.spool.pending)  # fmt: skip
                self._outage.since = None
            for record in group if delivered else ():
                counters = self.counters_for(record["run"])
                counters.sent += 1
                if record["seq"] <= self._outage.delayed_upto:
                    counters.replayed += 1
            del pending[: len(group)]
            self.spool.state["runs"] = {run: vars(c).copy() for run, c in self.counters.items()}
            self.spool.ack(group[-1]["seq"], [r["file"] for r in group if r["op"] == "artifact"])
            self._cond.notify_all()


class MlflowSender:
    """Delivers spool records to one tracking URI through MlflowClient (imported lazily)."""

    # Refusals that a retry cannot fix; anything else (connection, timeout, 5xx, a locked SQLite) is an outage.
    PERMANENT_ERROR_CODES = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST",
                                       "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST"})  # fmt: skip

    def __init__(self, tracking_uri: str) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)

    def create_run(self, experiment: str, run_name: str) -> str:
        """Create the run now (the caller needs its id); raises MlflowUnreachableError when that fails."""
        try:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            return self.client.create_run(experiment_id, run_name=run_name or None).info.run_id
        except Exception as e:  # any failure here means no run: name the URI and stop
            raise MlflowUnreachableError(f"cannot create an MLflow run at {self.tracking_uri}: {e}") from e

    def is_permanent(self, error: BaseException) -> bool:
        from mlflow.exceptions import MlflowException

        if isinstance(error, RejectedRecordError):
            return True
        return isinstance(error, MlflowException) and error.error_code in self.PERMANENT_ERROR_CODES

    def send(self, group: list[dict], spooler: Spooler) -> None:
        from mlflow.entities import Metric, Param, RunTag

        first = group[0]
        run_id, op = first["run"], first["op"]
        if op == "metrics":
            points = [
                Metric(k, float(v), r["time_ms"], r["step"]) for r in group for k, v in r["metrics"].items()
            ]
            for start in range(0, len(points), MAX_METRICS_PER_CALL):
                self.client.log_batch(run_id, metrics=points[start : start + MAX_METRICS_PER_CALL])
        elif op == "params":
            params = [Param(k, v) for k, v in sorted(first["params"].items())]
            for start in range(0, len(params), MAX_PARAMS_PER_CALL):
                self.client.log_batch(run_id, params=params[start : start + MAX_PARAMS_PER_CALL])
        elif op in ("tags", "summary"):
            tags = first["tags"] if op == "tags" else spooler.counters_for(run_id).tags()
            items = [RunTag(k, v) for k, v in tags.items()]
            for start in range(0, len(items), MAX_TAGS_PER_CALL):
                self.client.log_batch(run_id, tags=items[start : start + MAX_TAGS_PER_CALL])
        elif op == "artifact":
            path = os.path.join(spooler.spool.root, first["file"])
            if not os.path.exists(path):
                raise RejectedRecordError(f"the spooled copy {path} is missing")
            if os.path.isdir(path):
                self.client.log_artifacts(run_id, path, first["artifact_path"])
            else:
                self.client.log_artifact(run_id, path, first["artifact_path"])
        elif op == "status":
            if first["status"] == "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            else:
                self.client.set_terminated(run_id, status=first["status"], end_time=first["time_ms"])
        elif op == "discard":
            discard_redone_steps(self.client, run_id, first["resume_step"], self.tracking_uri)
        else:
            raise RejectedRecordError(f"unknown op {op!r}")


def discard_redone_steps(client, run_id: str, resume_step: int, tracking_uri: str) -> int:
    """Remove the points a resumed run logs anew, so they replace the old ones instead of standing
    twice (MLflow has no API for it: issue mlflow#2973).

    Training metrics at steps >= resume_step and evaluation metrics at steps > resume_step (the
    evaluation at resume_step ran before the checkpoint was written). Works on database tracking
    stores (sqlite, postgresql, mysql); a tracking server cannot delete points, so there the old points
    stay and a warning says so. Returns the number of points removed.
    """
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = client._tracking_client.store
    if not isinstance(store, SqlAlchemyStore):
        logger.warning(
            "MLflow at %s cannot delete metric points: steps from %d on, logged before the restart, "
            "appear twice in run %s", tracking_uri, resume_step, run_id,
        )  # fmt: skip
        return 0
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric
    from sqlalchemy import and_, or_

    redone = or_(
        and_(~SqlMetric.key.like("eval/%"), SqlMetric.step >= resume_step), SqlMetric.step > resume_step
    )
    with store.ManagedSessionMaker(read_only=False) as session:
        removed = (
            session.query(SqlMetric)
            .filter(SqlMetric.run_uuid == run_id, redone)
            .delete(synchronize_session=False)
        )
        # latest_metrics holds one row per key; rebuild it from the points that remain
        session.query(SqlLatestMetric).filter(SqlLatestMetric.run_uuid == run_id).delete(
            synchronize_session=False
        )
        latest: dict[str, SqlMetric] = {}
        for m in session.query(SqlMetric).filter(SqlMetric.run_uuid == run_id):
            best = latest.get(m.key)
            if best is None or (m.step, m.timestamp, m.value) > (best.step, best.timestamp, best.value):
                latest[m.key] = m
        for m in latest.values():
            session.add(SqlLatestMetric(key=m.key, value=m.value, timestamp=m.timestamp, step=m.step,
                                        is_nan=m.is_nan, run_uuid=m.run_uuid))  # fmt: skip
    logger.info("MLflow run %s: removed %d metric point(s) from step %d on, to be logged again",
                run_id, removed, resume_step)  # fmt: skip
    return removed


def summary_line(
    run_id: str, counters: RunCounters, pending: int, root: str, tracking_uri: str | None
) -> str:
    line = (f"MLflow run {run_id}: {counters.sent} record(s) sent to {tracking_uri}; {counters.replayed} of them "
            f"waited while the server was unreachable and were replayed ({counters.outages} outage(s), "
            f"{counters.down_seconds:.1f} s down)")  # fmt: skip
    if counters.rejected:
        line += f"; {counters.rejected} refused for good (in {os.path.join(root, 'rejected.jsonl')})"
    if pending:
        line += (f"; {pending} record(s) still unsent in {root}: they go out when the run resumes, or with "
                 f"`python -m hdpo_ds.spool replay {_output_dir_of(root)}`")  # fmt: skip
    return line


def _output_dir_of(root: str) -> str:
    return os.path.dirname(root) if os.path.basename(root) == SPOOL_DIRNAME else root


def _resolve_root(path: str) -> str:
    if os.path.basename(os.path.normpath(path)) == SPOOL_DIRNAME or os.path.exists(
        os.path.join(path, "state.json")
    ):
        return path
    return spool_dir(path)


def replay(
    path: str,
    *,
    tracking_uri: str | None = None,
    timeout_s: float = 600.0,
    retry_max_interval_s: float = 10.0,
    sender_factory: Callable[[str], object] | None = None,
) -> int:
    """Send what a spool holds; returns the records still pending (0: all sent)."""  # fmt: skip
    root = _resolve_root(path)
    if not os.path.exists(os.path.join(root, "state.json")):
        raise SpoolError(f"{root}: no MLflow spool here (expected state.json)")
    spool = Spool(root, tracking_uri)
    uri = spool.state["tracking_uri"]
    if not uri:
        spool.close()
        raise SpoolError(f"{root}: the spool names no tracking URI; pass --tracking-uri")
    spool.save_state()
    backlog = spool.pending
    if not backlog:
        print(f"{root}: nothing to replay (all {spool.last_seq} records were sent)")
        spool.close()
        return 0
    runs = {r["run"] for r in _pending_records(spool)}
    spooler = Spooler(spool, (sender_factory or MlflowSender)(uri), retry_max_interval_s=retry_max_interval_s,
                      describe=f"MLflow at {uri}")  # fmt: skip
    for run_id in sorted(runs):
        spooler.put("summary", run_id)  # refresh the run's hdpo_ds.spool.* tags after the replay
    drained = spooler.close(timeout_s)
    for run_id in sorted(runs):
        print(summary_line(run_id, spooler.counters_for(run_id), spool.pending, root, uri))
    if not drained:
        print(
            f"{root}: {spool.pending} record(s) could not be sent within {timeout_s:.0f} s", file=sys.stderr
        )
    return spool.pending


def _pending_records(spool: Spool):
    for path in spool.segments():
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                record = Spool._parse(f"{path}:{number}", line)
                if record["seq"] > spool.acked_seq:
                    yield record


def status(path: str) -> dict:
    """What a spool holds, read without taking its lock."""
    root = _resolve_root(path)
    with open(os.path.join(root, "state.json")) as f:
        state = json.load(f)
    last = state["acked_seq"]
    for segment in [os.path.join(root, n) for n in os.listdir(root) if n.startswith("records-")]:
        with open(segment, "rb") as f:
            lines = [line for line in f.read().split(b"\n") if line.strip()]
        if lines:
            with contextlib.suppress(ValueError):  # a torn tail: the next writer cuts it
                last = max(last, json.loads(lines[-1])["seq"])
    return {"root": root, "tracking_uri": state["tracking_uri"], "acked_seq": state["acked_seq"],
            "last_seq": last, "pending": last - state["acked_seq"], "runs": state["runs"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hdpo_ds.spool",
        description="Send MLflow records that a run spooled while its tracking server was unreachable.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("replay", help="send every unsent record, in order, then exit")
    rep.add_argument("output_dir", help="the run's output_dir (or its mlflow_spool folder)")
    rep.add_argument("--tracking-uri", default=None, help="default: the URI the run logged to")
    rep.add_argument("--timeout-s", type=float, default=600.0, help="give up after this long (default 600)")
    rep.add_argument("--retry-max-interval-s", type=float, default=10.0)
    st = sub.add_parser("status", help="print what the spool holds")
    st.add_argument("output_dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "status":
            print(json.dumps(status(args.output_dir), indent=2, sort_keys=True))
            return 0
        from hdpo_ds.config import LoggingConfig

        defaults = LoggingConfig()
        bound_http_retries(defaults.http_max_retries, defaults.http_timeout_s)
        pending = replay(args.output_dir, tracking_uri=args.tracking_uri, timeout_s=args.timeout_s,
                         retry_max_interval_s=args.retry_max_interval_s)  # fmt: skip
    except (SpoolError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if pending == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
