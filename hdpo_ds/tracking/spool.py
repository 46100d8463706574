"""MLflow logging that loses nothing and never blocks: a durable local spool and a background sender.

Every logging call appends one record (a JSON line) to `<output_dir>/mlflow_spool/records-<seq>.jsonl`
and returns; a worker thread sends the records in order through MlflowClient's public API and writes what
the server acknowledged to `state.json` (the last acknowledged seq; per run, the highest acknowledged step
of each metric key). While the server is unreachable the worker backs off and retries; records pile up on
disk, not in memory. A later process (a resumed run, or `python -m hdpo_ds.tracking.spool replay OUTPUT_DIR`)
sends what an earlier one left. A resumed run redoes the steps after its checkpoint exactly, so a point at
a step its key already reached on the server is skipped, not sent twice. Format and guarantees:
docs/mlflow.md. Only the standard library is imported at the top, so the replay command starts quickly.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from hdpo_ds.common.atomic import fsync_dir, fsync_path, write_json

logger = logging.getLogger(__name__)

__all__ = ["SPOOL_DIRNAME", "MlflowSender", "MlflowUnreachableError", "Spool", "SpoolError", "Spooler"]
__all__ += ["bound_http_retries", "replay", "spool_dir", "status"]

SPOOL_DIRNAME = "mlflow_spool"
FORMAT_VERSION = 2  # 1 had "discard" records, which deleted points through MLflow's private store
SEGMENT_BYTES = 16 * 2**20  # a new records file past this size, so acknowledged files can be deleted
READ_BATCH = 2000  # records the worker holds in memory at most; the backlog stays on disk
MAX_METRICS_PER_CALL, MAX_PARAMS_PER_CALL, MAX_TAGS_PER_CALL = 1000, 100, 100  # MLflow's log_batch limits
OPS = ("metrics", "params", "tags", "artifact", "status", "summary")


class SpoolError(RuntimeError):
    """The spool folder cannot be used (held by another process, unreadable record); names the file."""


class MlflowUnreachableError(RuntimeError):
    """The tracking server did not answer where an answer is needed now (creating a run)."""


def spool_dir(output_dir: str) -> str:
    return os.path.join(output_dir, SPOOL_DIRNAME)


def bound_http_retries(max_retries: int, timeout_s: int) -> dict[str, str]:
    """Bound MLflow's HTTP client (its defaults retry for minutes) unless the user set the variables;
    returns those this call set. MLflow reads them at each request: they hold for the whole process."""
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(max_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # MLflow reads an integer: sleeps of 1, 2, 4... s
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s),
    }
    applied = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(applied)
    return applied


def _parse(where: str, line: bytes) -> dict:
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict) or record.get("op") not in OPS or not isinstance(record.get("seq"), int):
        raise SpoolError(f"{where}: unreadable spool record; move the file aside to replay the rest")
    return record


class Spool:
    """The on-disk, append-only record log of one output folder.

    `append` (any thread) writes one whole line per record with a single write(2), so a killed process
    leaves every returned record on disk; `fsync` makes them survive a host crash. `read` (the worker)
    returns the records after the last one read; `ack` persists the state with a higher acked_seq.
    """

    def __init__(self, root: str, tracking_uri: str | None = None) -> None:
        self.root = os.path.abspath(root)
        os.makedirs(os.path.join(self.root, "artifacts"), exist_ok=True)
        self._lock_fd = self._take_lock()
        self._write_lock = threading.Lock()
        self.state = {"format": FORMAT_VERSION, "acked_seq": 0, "tracking_uri": tracking_uri, "runs": {}}
        try:
            self._load_state()
            self.last_seq = max(self.acked_seq, self._repair())
        except BaseException:
            self._unlock()
            raise
        self.state["tracking_uri"] = tracking_uri or self.state["tracking_uri"]
        self.backlog_at_open = self.last_seq - self.acked_seq
        self._reader: tuple[str, int] | None = None  # (file, byte offset) of the next unread line
        self._fd: int | None = None
        self._dirty = False
        self._new_segment()  # each process writes its own file: a torn tail never sits before new records
        self.save_state()

    def _load_state(self) -> None:
        path = os.path.join(self.root, "state.json")
        try:
            with open(path) as f:
                self.state.update(json.load(f))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            raise SpoolError(f"{path}: unreadable spool state ({e})") from e
        if self.state["format"] != FORMAT_VERSION:
            raise SpoolError(
                f"{path}: spool format {self.state['format']}, expected {FORMAT_VERSION}; send it with the "
                "replay command of the hdpo_ds that wrote it, or move the folder aside"
            )
        self.acked_seq = self.read_seq = int(self.state["acked_seq"])

    def _take_lock(self) -> int:
        path = os.path.join(self.root, "lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(
                f"{self.root} is in use by another process (its lock file {path} is held); two "
                "runs must not share one output_dir"
            ) from None
        except OSError as e:  # some network file systems have no flock: go on, unguarded
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            logger.warning("%s: file locking unsupported (%s); not guarding against a second writer", path, e)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _segment(self, first_seq: int) -> str:
        return os.path.join(self.root, f"records-{first_seq:012d}.jsonl")

    def segments(self) -> list[str]:
        """The records files, oldest first (the zero-padded names sort by their first seq)."""
        names = sorted(n for n in os.listdir(self.root) if n.startswith("records-") and n.endswith(".jsonl"))
        return [os.path.join(self.root, n) for n in names]

    def _repair(self) -> int:
        """Cut a torn last line (a process killed inside a write) and return the last record's seq (0:
        none)."""
        for path in reversed(self.segments()):
            with open(path, "rb") as f:
                data = f.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                logger.warning(f"{path}: cut {len(data) - end} bytes of a record torn by a crash")
                with open(path, "r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
            if end:
                return int(_parse(f"{path} (last line)", data[: end - 1].rsplit(b"\n", 1)[-1])["seq"])
        return 0

    def _new_segment(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
        self._path = self._segment(self.last_seq + 1)
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._bytes = os.fstat(self._fd).st_size
        fsync_dir(self.root)

    def append(self, op: str, run_id: str, **payload) -> int:
        """Write one record; returns its seq. Payload values must be JSON-serialisable."""
        if op not in OPS:
            raise ValueError(f"unknown spool op {op!r}")
        with self._write_lock:
            seq = self.last_seq + 1
            time_ms = payload.pop("time_ms", None) or int(time.time() * 1000)
            record = {"seq": seq, "op": op, "run": run_id, "time_ms": time_ms, **payload}
            line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
            if self._bytes and self._bytes + len(line) > SEGMENT_BYTES:
                self._new_segment()
            os.write(self._fd, line)  # O_APPEND, one call: the line is whole or absent
            self._bytes += len(line)
            self.last_seq, self._dirty = seq, True
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

    def read(self, limit: int) -> list[dict]:
        """Up to `limit` records after the last one read, oldest first."""
        out: list[dict] = []
        while len(out) < limit and self.read_seq < self.last_seq:
            start = self._segment(self.read_seq + 1)
            if os.path.exists(start):  # a file begins with the next record
                self._reader = (start, 0)
            elif self._reader is None:  # reopened: the next record is inside an older file
                older = [s for s in self.segments() if s < start]
                if not older:
                    raise SpoolError(f"{self.root}: the records after seq {self.read_seq} are missing")
                self._reader = (older[-1], 0)
            path, offset = self._reader
            with open(path, "rb") as f:
                f.seek(offset)
                while len(out) < limit and (line := f.readline()).endswith(b"\n"):  # else: being written
                    record = _parse(f"{path} (byte {offset})", line)
                    offset += len(line)
                    if record["seq"] <= self.read_seq:
                        continue  # acknowledged before this process started
                    if record["seq"] != self.read_seq + 1:
                        raise SpoolError(
                            f"{path}: record seq {record['seq']} follows {self.read_seq}: records are missing"
                        )
                    self.read_seq = record["seq"]
                    out.append(record)
            if (path, offset) == self._reader:
                break  # nothing new yet
            self._reader = (path, offset)
        return out

    def ack(self, seq: int, runs: dict, done_files: list[str] = ()) -> None:
        """Everything up to `seq` reached MLflow: persist it with the run state, then delete copies and
        the files whose records were all acknowledged."""
        self.acked_seq = self.state["acked_seq"] = seq
        self.state["runs"] = runs
        self.save_state()
        for relative in done_files:
            shutil.rmtree(os.path.dirname(os.path.join(self.root, relative)), ignore_errors=True)
        segments = self.segments()
        for path, following in itertools.pairwise(segments):
            if path != self._path and int(os.path.basename(following)[8:20]) <= seq + 1:
                os.remove(path)

    def save_state(self) -> None:
        write_json(os.path.join(self.root, "state.json"), self.state)

    def reject(self, record: dict, error: BaseException) -> None:
        with open(os.path.join(self.root, "rejected.jsonl"), "a") as f:
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
                elif self._bytes == 0:
                    os.remove(self._path)  # this process wrote nothing here
        self._unlock()


@dataclasses.dataclass
class RunCounters:
    """Per MLflow run, kept in state.json across processes."""

    sent: int = 0  # records acknowledged by MLflow
    replayed: int = 0  # of those, records that waited on an outage, or that an earlier process left
    outages: int = 0  # times the server stopped answering
    down_seconds: float = 0.0
    rejected: int = 0  # records MLflow refused for good (in rejected.jsonl)
    skipped: int = 0  # metric points not sent: MLflow had their key at that step already (a redone step)
    steps: dict[str, int] = dataclasses.field(default_factory=dict)  # per key: highest acknowledged step

    def tags(self) -> dict[str, str]:
        counts = {k: v for k, v in vars(self).items() if k != "steps"}
        return {
            f"hdpo_ds.spool.{k}": f"{v:.1f}" if k == "down_seconds" else str(v) for k, v in counts.items()
        }


class Spooler:
    """The worker thread that drains a Spool through a sender, in order, retrying while it fails.

    sender.send(records, spooler) delivers one group (consecutive metrics records of one run, or one other
    record) or raises; sender.is_permanent(exc) tells a refusal (the record goes to rejected.jsonl) from an
    outage (back off, retry the same group); sender.last_steps(run_id, keys) returns the highest step that
    MLflow holds per key, asked only before sending a group that may have arrived unacknowledged.
    """

    def __init__(self, spool: Spool, sender, *, retry_max_interval_s: float = 30.0, describe: str = "MLflow"):
        self.spool, self.sender, self.describe = spool, sender, describe
        self.retry_max_interval_s = retry_max_interval_s
        self.counters = {run: RunCounters(**values) for run, values in spool.state["runs"].items()}
        self._cond = threading.Condition()
        self._stop = self._abandon = self._kick = False
        self._down_since: float | None = None
        self._last_warning = 0.0
        self._delayed_upto = spool.last_seq if spool.backlog_at_open else 0  # these count as replayed
        # An earlier process may have died after MLflow took its last group but before the ack was written.
        self._unsure = spool.backlog_at_open > 0
        self._singles_until = 0  # after a refused group, send its records one by one to isolate the bad one
        self._learn: dict[str, set[str]] = {}  # runs this spool has no history of: the keys asked about
        if spool.backlog_at_open:
            logger.info(
                f"{spool.root}: {spool.backlog_at_open} record(s) left by an earlier process go first"
            )
        self._thread = threading.Thread(target=self._work, name="hdpo-mlflow-spool", daemon=True)
        self._thread.start()

    def put(self, op: str, run_id: str, **payload) -> int:
        seq = self.spool.append(op, run_id, **payload)
        with self._cond:
            if self._down_since is not None:
                self._delayed_upto = seq
            self._cond.notify_all()
        return seq

    def learn(self, run_id: str) -> None:
        """A run resumed here; if this spool holds no history of it (train.resume from another output_dir),
        ask MLflow for each key's highest step on first sight."""
        with self._cond:
            if not self.counters_for(run_id).steps:
                self._learn[run_id] = set()

    def counters_for(self, run_id: str) -> RunCounters:
        return self.counters.setdefault(run_id, RunCounters())

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def flush(self, timeout_s: float) -> bool:
        """Wait until every record written so far is acknowledged, at most `timeout_s`; True if so."""
        target, deadline = self.spool.last_seq, time.monotonic() + timeout_s
        with self._cond:
            self._kick = True  # retry now rather than at the end of a back-off
            self._cond.notify_all()
            while self.spool.acked_seq < target and self._thread.is_alive():
                if (left := deadline - time.monotonic()) <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return self.spool.acked_seq >= target

    def close(self, timeout_s: float) -> bool:
        """Flush (bounded), stop the worker, persist the state and release the spool. True if drained."""
        drained = self.flush(timeout_s)
        with self._cond:
            self._stop = True
            self._abandon = not drained  # the worker may sit in a request; it writes nothing more
            self._cond.notify_all()
        self._thread.join(timeout=5.0 if drained else 0.2)
        with self._cond:
            self._abandon = True
            self._save_state()
            self.spool.close()
        return drained

    def _save_state(self) -> None:
        self.spool.state["runs"] = {run: dataclasses.asdict(c) for run, c in self.counters.items()}
        self.spool.save_state()

    def _work(self) -> None:
        try:
            self._loop([])
        except Exception:  # the spool itself failed (disk full, a damaged file): say so, keep the records
            logger.exception(f"the MLflow spool worker stopped; unsent records stay in {self.spool.root}")

    def _loop(self, pending: list[dict]) -> None:
        backoff = first_backoff = min(1.0, self.retry_max_interval_s)
        while True:
            with self._cond:
                if self._abandon:
                    return
                if not pending and self.spool.last_seq <= self.spool.read_seq:
                    if self._stop:
                        return
                    self._cond.wait(1.0)
            self.spool.fsync()  # at least once a second: records survive a host crash
            pending = pending or self.spool.read(READ_BATCH)
            if not pending:
                continue
            group = self._take_group(pending)
            try:
                sent, skipped, steps = self._send(group)
            except Exception as e:  # classified here: a refusal is recorded, anything else is an outage
                if not self.sender.is_permanent(e):
                    self._unsure |= group[0]["op"] == "metrics"  # the server may have stored it anyway
                    self._on_failure(e, group[0]["run"])
                    if not self._sleep(backoff):
                        return
                    backoff = min(backoff * 2, self.retry_max_interval_s)
                elif len(group) > 1:
                    self._singles_until = group[-1]["seq"]
                else:
                    record = group[0]
                    logger.error(
                        f"{self.describe} refused spool record {record['seq']} ({record['op']} of run "
                        f"{record['run']}) for good: {e}; kept in {self.spool.root}/rejected.jsonl"
                    )
                    self.spool.reject(record, e)
                    self.counters_for(group[0]["run"]).rejected += 1
                    self._acknowledge(group, pending, [])
                continue
            backoff, self._unsure = first_backoff, False
            self._acknowledge(group, pending, sent, skipped, steps)

    def _take_group(self, pending: list[dict]) -> list[dict]:
        first = pending[0]
        if first["op"] != "metrics" or first["seq"] <= self._singles_until:
            return pending[:1]
        group, points = [first], len(first["metrics"])
        for record in pending[1:]:
            points += len(record.get("metrics", ()))
            if record["op"] != "metrics" or record["run"] != first["run"] or points > MAX_METRICS_PER_CALL:
                break
            group.append(record)
        return group

    def _send(self, group: list[dict]) -> tuple[list[dict], int, dict | None]:
        """Send a group; returns the records sent, the metric points skipped, and the run's acknowledged
        steps after it. A point is skipped when its key reached its step on MLflow before: a resumed run
        redoes the steps after its checkpoint exactly, and MLflow offers no way to delete the first copy."""
        if group[0]["op"] != "metrics":
            self.sender.send(group, self)
            return group, 0, None
        run = group[0]["run"]
        steps = dict(self.counters_for(run).steps)
        keys, learned = {k for record in group for k in record["metrics"]}, self._learn.get(run)
        # What MLflow holds decides when the ack of what it took may not have been written, and for keys
        # of a run this spool knows nothing of.
        ask = keys if self._unsure else set() if learned is None else keys - learned
        for key, step in self.sender.last_steps(run, sorted(ask)).items() if ask else ():
            steps[key] = max(step, steps.get(key, step))
        sent, skipped = [], 0
        for record in group:
            kept = {k: v for k, v in record["metrics"].items() if k not in steps or record["step"] > steps[k]}
            steps.update(dict.fromkeys(kept, record["step"]))
            skipped += len(record["metrics"]) - len(kept)
            if kept:
                sent.append({**record, "metrics": kept})
        if sent:
            self.sender.send(sent, self)
        if learned is not None:
            learned |= ask
        if skipped:
            logger.info(f"{skipped} point(s) of run {run} not sent: MLflow has their (redone) steps")
        return sent, skipped, steps

    def _sleep(self, seconds: float) -> bool:
        """Back off; a flush cuts it short. False when the worker must quit."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while not (self._abandon or self._kick) and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(min(left, 1.0))
            self._kick = False
            return not self._abandon

    def _on_failure(self, error: BaseException, run_id: str) -> None:
        now = time.monotonic()
        with self._cond:
            if self._abandon:
                return
            if self._down_since is None:
                self._down_since = self._last_warning = now
                self.counters_for(run_id).outages += 1
                self._save_state()  # a process killed during the outage still counts it
                logger.warning(
                    f"{self.describe} unreachable ({error}); training goes on and records wait in "
                    f"{self.spool.root} ({self.spool.pending} pending); retrying every <= "
                    f"{self.retry_max_interval_s:.0f} s"
                )
            elif now - self._last_warning > 300:
                logger.warning(
                    f"{self.describe} still unreachable after {now - self._down_since:.0f} s ({error}); "
                    f"{self.spool.pending} records pending in {self.spool.root}"
                )
                self._last_warning = now
            self._delayed_upto = self.spool.last_seq

    def _acknowledge(self, group, pending, sent, skipped=0, steps=None) -> None:
        with self._cond:
            if self._abandon:
                return
            counters = self.counters_for(group[0]["run"])  # a group holds one run's records
            if self._down_since is not None:
                down = time.monotonic() - self._down_since
                counters.down_seconds += down
                logger.info(
                    f"{self.describe} reachable again after {down:.1f} s; "
                    f"sending {self.spool.pending} waiting record(s)"
                )
                self._down_since = None
            counters.sent += len(sent)
            counters.replayed += sum(r["seq"] <= self._delayed_upto for r in sent)
            counters.skipped += skipped
            counters.steps = counters.steps if steps is None else steps
            del pending[: len(group)]
            runs = {run: dataclasses.asdict(c) for run, c in self.counters.items()}
            self.spool.ack(group[-1]["seq"], runs, [r["file"] for r in group if r["op"] == "artifact"])
            self._cond.notify_all()


class MlflowSender:
    """Delivers spool records to one tracking URI through MlflowClient (imported lazily)."""

    # Refusals that a retry cannot fix; anything else (connection, timeout, 5xx, a locked SQLite) is an
    # outage.
    PERMANENT_ERROR_CODES = frozenset(
        {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST"}
    )

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
        codes = self.PERMANENT_ERROR_CODES  # a spooled artifact copy that is gone cannot come back either
        return isinstance(error, FileNotFoundError) or getattr(error, "error_code", None) in codes

    def last_steps(self, run_id: str, keys: list[str]) -> dict[str, int]:
        """The highest step MLflow holds per key (keys it has no point of are left out)."""
        histories = {key: self.client.get_metric_history(run_id, key) for key in keys}
        return {key: max(m.step for m in points) for key, points in histories.items() if points}

    def send(self, group: list[dict], spooler: Spooler) -> None:
        from mlflow.entities import Metric, Param, RunTag

        first = group[0]
        run_id, op = first["run"], first["op"]
        if op == "metrics":
            items = [
                Metric(k, float(v), r["time_ms"], r["step"]) for r in group for k, v in r["metrics"].items()
            ]
            self._batches(run_id, "metrics", items, MAX_METRICS_PER_CALL)
        elif op == "params":
            params = [Param(k, v) for k, v in sorted(first["params"].items())]
            self._batches(run_id, "params", params, MAX_PARAMS_PER_CALL)
        elif op in ("tags", "summary"):
            tags = first["tags"] if op == "tags" else spooler.counters_for(run_id).tags()
            self._batches(run_id, "tags", [RunTag(k, v) for k, v in tags.items()], MAX_TAGS_PER_CALL)
        elif op == "artifact":
            path = os.path.join(spooler.spool.root, first["file"])
            if not os.path.exists(path):
                raise FileNotFoundError(f"the spooled copy {path} is missing")
            log = self.client.log_artifacts if os.path.isdir(path) else self.client.log_artifact
            log(run_id, path, first["artifact_path"])
        elif first["status"] == "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.client.set_terminated(run_id, status=first["status"], end_time=first["time_ms"])

    def _batches(self, run_id: str, kind: str, items: list, size: int) -> None:
        for start in range(0, len(items), size):
            self.client.log_batch(run_id, **{kind: items[start : start + size]})


def summary_line(
    run_id: str, counters: RunCounters, pending: int, root: str, tracking_uri: str | None
) -> str:
    line = (
        f"MLflow run {run_id}: {counters.sent} record(s) sent to {tracking_uri}; {counters.replayed} of them "
        f"waited while the server was unreachable and were replayed ({counters.outages} outage(s), "
        f"{counters.down_seconds:.1f} s down)"
    )
    if counters.skipped:
        line += f"; {counters.skipped} metric point(s) of redone steps not sent again (MLflow had them)"
    if counters.rejected:
        line += f"; {counters.rejected} refused for good (in {os.path.join(root, 'rejected.jsonl')})"
    if pending:
        line += (
            f"; {pending} record(s) still unsent in {root}: they go out when the run resumes, or with "
            f"`python -m hdpo_ds.tracking.spool replay {_output_dir_of(root)}`"
        )
    return line


def _output_dir_of(root: str) -> str:
    return os.path.dirname(root) if os.path.basename(root) == SPOOL_DIRNAME else root


def _resolve_root(path: str) -> str:
    """The spool folder of an output_dir, or the spool folder itself."""
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
) -> int:
    """Send what a spool holds; returns the records still pending (0: all sent)."""
    root = _resolve_root(path)
    if not os.path.exists(os.path.join(root, "state.json")):
        raise SpoolError(f"{root}: no MLflow spool here (expected state.json)")
    spool = Spool(root, tracking_uri)
    uri = spool.state["tracking_uri"]
    if not uri or not spool.pending:
        spool.close()
        if not uri:
            raise SpoolError(f"{root}: the spool names no tracking URI; pass --tracking-uri")
        print(f"{root}: nothing to replay (all {spool.last_seq} records were sent)")
        return 0
    runs = sorted({r["run"] for r in _pending_records(spool)})
    sender = MlflowSender(uri)
    spooler = Spooler(spool, sender, retry_max_interval_s=retry_max_interval_s, describe=f"MLflow at {uri}")
    for run_id in runs:
        spooler.put("summary", run_id)  # refresh the run's hdpo_ds.spool.* tags after the replay
    drained = spooler.close(timeout_s)
    for run_id in runs:
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
                if (record := _parse(f"{path}:{number}", line))["seq"] > spool.acked_seq:
                    yield record


def status(path: str) -> dict:
    """What a spool holds, read without taking its lock."""
    root = _resolve_root(path)
    with open(os.path.join(root, "state.json")) as f:
        state = json.load(f)
    last = state["acked_seq"]
    for segment in (os.path.join(root, n) for n in os.listdir(root) if n.startswith("records-")):
        with open(segment, "rb") as f:
            whole = f.read().rsplit(b"\n", 2)  # a torn tail after the last newline: the next writer cuts it
        if len(whole) > 1:
            last = max(last, json.loads(whole[-2])["seq"])
    keys = ("tracking_uri", "acked_seq", "runs")
    return {
        "root": root,
        "last_seq": last,
        "pending": last - state["acked_seq"],
        **{k: state[k] for k in keys},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hdpo_ds.tracking.spool",
        description="Send MLflow records that a run spooled while its tracking server was unreachable.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("replay", help="send every unsent record, in order, then exit")
    rep.add_argument("output_dir", help="the run's output_dir (or its mlflow_spool folder)")
    rep.add_argument("--tracking-uri", default=None, help="default: the URI the run logged to")
    rep.add_argument("--timeout-s", type=float, default=600.0, help="give up after this long (default 600)")
    rep.add_argument("--retry-max-interval-s", type=float, default=10.0)
    sub.add_parser("status", help="print what the spool holds").add_argument("output_dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "status":
            print(json.dumps(status(args.output_dir), indent=2, sort_keys=True))
            return 0
        from hdpo_ds.config import LoggingConfig

        defaults = LoggingConfig()
        bound_http_retries(defaults.http_max_retries, defaults.http_timeout_s)
        pending = replay(
            args.output_dir,
            tracking_uri=args.tracking_uri,
            timeout_s=args.timeout_s,
            retry_max_interval_s=args.retry_max_interval_s,
        )
    except (SpoolError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if pending == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
