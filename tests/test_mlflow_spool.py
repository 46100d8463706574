"""MLflow logging through the spool (hdpo_ds/spool.py, docs/mlflow.md).

Unit tests drive the spooler with a fake sender that fails on demand; a crash is a real SIGKILL of a
child process. Then MlflowLogger on a SQLite store (resume order), a dead tracking server (fail fast,
bounded finish), and a real `mlflow server` stopped in the middle of a 2-rank training run and
restarted, and again under the replay command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from hdpo_ds import spool as spool_mod
from hdpo_ds.config import ConfigError, load_config
from hdpo_ds.metrics import MlflowLogger
from hdpo_ds.spool import Spool, Spooler
from tests.run_helpers import ROOT, free_port

HTTP_VARS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
             "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "MLFLOW_HTTP_REQUEST_TIMEOUT")  # fmt: skip


class Outage(ConnectionError):
    pass


class Refusal(ValueError):
    pass


class FakeSender:
    """Delivers groups into `delivered` (a list, or a JSON-lines file); fails while `down` is set;
    refuses records whose seq is in `refuse`; `hang` blocks inside send until released."""

    def __init__(self, refuse=(), path=None):
        self.delivered, self.calls, self.failures = [], [], 0
        self.down, self.hang = threading.Event(), threading.Event()
        self.inside = threading.Event()
        self.refuse, self.path = set(refuse), path

    def send(self, group, spooler):
        self.calls.append([r["seq"] for r in group])
        self.inside.set()
        while self.hang.is_set():
            time.sleep(0.01)
        if self.down.is_set():
            self.failures += 1
            raise Outage("connection refused")
        if any(r["seq"] in self.refuse for r in group):
            raise Refusal("bad value")
        self.delivered.extend(group)
        if self.path:
            with open(self.path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in group)

    def is_permanent(self, error):
        return isinstance(error, Refusal)


def _metrics(spooler, run, steps):
    return [spooler.put("metrics", run, step=s, metrics={"loss": 1.0 / (s + 1), "lr": 0.1}) for s in steps]


def _wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_outage_keeps_order_and_replays_every_record_once(tmp_path):
    sender = FakeSender()
    sender.down.set()
    spooler = Spooler(Spool(str(tmp_path / "sp"), "fake://"), sender, retry_max_interval_s=0.05)
    _metrics(spooler, "r1", range(20))
    _wait_for(lambda: sender.failures >= 3)  # the worker retried the same first group
    assert spooler.down
    spooler.put("params", "r1", params={"a": "1"})
    _metrics(spooler, "r1", range(20, 40))
    sender.down.clear()
    assert spooler.flush(30)
    assert [r["seq"] for r in sender.delivered] == list(range(1, 42))  # in order, each once
    assert [r["step"] for r in sender.delivered if r["op"] == "metrics"] == list(range(40))
    # Every failed call was the same first group, retried; consecutive metrics go as one group.
    failed = sender.calls[: sender.failures]
    assert all(call == failed[0] and call[0] == 1 for call in failed)
    assert len(sender.calls) - sender.failures < 41
    counters = spooler.counters_for("r1")
    assert (counters.sent, counters.replayed, counters.outages, counters.rejected) == (41, 41, 1, 0)
    assert counters.down_seconds > 0
    assert spooler.close(5)
    state = json.loads((tmp_path / "sp" / "state.json").read_text())
    assert state["acked_seq"] == 41 and state["runs"]["r1"]["replayed"] == 41


def test_records_sent_while_up_are_not_counted_as_replayed(tmp_path):
    sender = FakeSender()
    spooler = Spooler(Spool(str(tmp_path / "sp"), "fake://"), sender, retry_max_interval_s=0.05)
    _metrics(spooler, "r1", range(5))
    assert spooler.flush(10)
    sender.down.set()
    _metrics(spooler, "r1", range(5, 8))
    _wait_for(lambda: sender.failures >= 1)
    sender.down.clear()
    assert spooler.close(10)
    counters = spooler.counters_for("r1")
    assert (counters.sent, counters.replayed, counters.outages) == (8, 3, 1)


def test_logging_never_waits_for_a_hanging_sender(tmp_path):
    sender = FakeSender()
    sender.hang.set()  # a server that accepts the connection and never answers
    spooler = Spooler(Spool(str(tmp_path / "sp"), "fake://"), sender, retry_max_interval_s=0.05)
    _metrics(spooler, "r1", range(1))
    sender.inside.wait(10)
    _metrics(spooler, "r1", range(1, 500))  # returns although the worker sits inside send
    assert sender.hang.is_set() and sender.delivered == []
    assert spooler.spool.last_seq == 500
    sender.hang.clear()
    assert spooler.close(30)
    assert [r["seq"] for r in sender.delivered] == list(range(1, 501))


def test_refused_record_is_isolated_kept_and_counted(tmp_path):
    sender = FakeSender(refuse={3})
    spooler = Spooler(Spool(str(tmp_path / "sp"), "fake://"), sender, retry_max_interval_s=0.05)
    sender.hang.set()  # let all five queue up, so they travel as one group
    _metrics(spooler, "r1", range(5))
    sender.hang.clear()
    assert spooler.close(10)
    assert [r["seq"] for r in sender.delivered] == [1, 2, 4, 5]
    rejected = [json.loads(line) for line in (tmp_path / "sp" / "rejected.jsonl").read_text().splitlines()]
    assert [r["record"]["seq"] for r in rejected] == [3] and "bad value" in rejected[0]["error"]
    assert spooler.counters_for("r1").rejected == 1 and spooler.counters_for("r1").sent == 4


# A process that logs 10 steps: the server takes the first 5, then goes away; the process is killed.
_CHILD = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from hdpo_ds.spool import Spool, Spooler
from tests.test_mlflow_spool import FakeSender

sender = FakeSender(path={server!r})
spooler = Spooler(Spool({root_sp!r}, "fake://"), sender, retry_max_interval_s=0.05)
for s in range(5):
    spooler.put("metrics", "r1", step=s, metrics={{"loss": float(s)}})
while spooler.spool.acked_seq < 5:
    time.sleep(0.01)
sender.down.set()
for s in range(5, 10):
    spooler.put("metrics", "r1", step=s, metrics={{"loss": float(s)}})
while sender.failures < 1:
    time.sleep(0.01)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_process_backlog_is_replayed_once_with_its_timestamps(tmp_path):
    server, root_sp = tmp_path / "server.jsonl", str(tmp_path / "sp")
    child = _CHILD.format(root=ROOT, server=str(server), root_sp=root_sp)
    proc = subprocess.run(
        [sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    first = [json.loads(line) for line in server.read_text().splitlines()]
    assert [r["seq"] for r in first] == [1, 2, 3, 4, 5]
    segments = sorted((tmp_path / "sp").glob("records-*.jsonl"))
    written = [json.loads(line) for s in segments for line in s.read_text().splitlines()]
    assert [r["seq"] for r in written][-5:] == [6, 7, 8, 9, 10]
    with open(segments[-1], "ab") as f:  # a record torn by the kill: cut, the rest kept
        f.write(b'{"seq":11,"op":"metr')

    sender = FakeSender(path=str(server))
    spooler = Spooler(Spool(root_sp, "fake://"), sender, retry_max_interval_s=0.05)
    assert spooler.spool.backlog_at_open == 5
    _metrics(spooler, "r1", [10])
    assert spooler.close(10)
    delivered = [json.loads(line) for line in server.read_text().splitlines()]
    assert [r["seq"] for r in delivered] == list(range(1, 12))  # nothing twice, nothing lost
    assert [r["step"] for r in delivered] == list(range(11))
    by_seq = {r["seq"]: r for r in written}
    for r in delivered[5:10]:
        assert r == by_seq[r["seq"]]  # replayed as written: same timestamp, so the same MLflow point
    counters = spooler.counters_for("r1")
    assert counters.replayed == 5  # the old backlog; seq 11 was sent while the server was up
    assert counters.sent == 11 and counters.outages == 1  # the child's outage is kept in state.json


def test_acknowledged_segments_and_artifact_copies_are_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_mod, "SEGMENT_BYTES", 400)  # a few records per file
    sender = FakeSender()
    root = tmp_path / "sp"
    spool = Spool(str(root), "fake://")
    spooler = Spooler(spool, sender, retry_max_interval_s=0.05)
    source = tmp_path / "plot.png"
    source.write_bytes(b"\x89PNG fake")
    relative = spool.store_file(str(source), str(source))
    source.unlink()  # the caller may delete its file at once
    spooler.put("artifact", "r1", file=relative, artifact_path="plots")
    _metrics(spooler, "r1", range(30))
    assert spooler.flush(10)
    assert [r["seq"] for r in sender.delivered] == list(range(1, 32))
    assert not (root / relative).exists()
    assert len(list(root.glob("records-*.jsonl"))) == 1  # only the file being written
    assert spooler.close(5)


def test_second_process_on_the_same_spool_is_refused(tmp_path):
    first = Spool(str(tmp_path / "sp"), "fake://")
    with pytest.raises(spool_mod.SpoolError, match="in use by another process"):
        Spool(str(tmp_path / "sp"), "fake://")
    first.close()
    Spool(str(tmp_path / "sp"), "fake://").close()


# ---- MlflowLogger against real MLflow stores


@pytest.fixture
def http_env():
    """bound_http_retries writes os.environ; put it back after the test."""
    saved = {k: os.environ.get(k) for k in HTTP_VARS}
    for key in HTTP_VARS:
        os.environ.pop(key, None)
    yield
    for key, value in saved.items():
        os.environ.pop(key, None)
        if value is not None:
            os.environ[key] = value


def _history(uri, run_id):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    return run, {
        key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in run.data.metrics
    }


def test_resumed_logger_replays_old_backlog_before_discarding_redone_steps(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("spool", artifact_location=str(tmp_path / "artifacts"))
    first = MlflowLogger(uri, "spool", "a", spool_dir=str(tmp_path / "sp"), retry_max_interval_s=0.1)
    run_id = first.run_id
    assert client.get_run(run_id).info.experiment_id == experiment
    first.log_params({"x": 1})
    first.log_metrics({"loss": 0.0}, step=0)
    assert first.flush(30)
    first._spooler.close(0)  # the process dies: logging stops here, and steps 1-3 never reach MLflow
    first._finished = True
    spool = Spool(str(tmp_path / "sp"))
    for step in (1, 2, 3):
        spool.append("metrics", run_id, step=step, metrics={"loss": float(step)})
    spool.close()

    # Resumed from the step-2 checkpoint: steps 2-3 are redone with other values.
    resumed = MlflowLogger(
        uri, "spool", "a", run_id=run_id, spool_dir=str(tmp_path / "sp"), retry_max_interval_s=0.1
    )
    resumed.reopen()
    resumed.discard_redone_steps(2)
    for step in (2, 3, 4):
        resumed.log_metrics({"loss": 10.0 + step}, step=step)
    note = tmp_path / "alerts.jsonl"
    note.write_text('{"step": 3}\n')
    resumed.log_artifact(str(note))
    note.unlink()
    resumed.log_json_artifact("summary.json", {"ok": True})
    resumed.finish()
    run, history = _history(uri, run_id)
    assert history["loss"] == [(0, 0.0), (1, 1.0), (2, 12.0), (3, 13.0), (4, 14.0)]
    assert run.info.status == "FINISHED" and run.data.params == {"x": "1"}
    assert run.data.tags["hdpo_ds.spool.replayed"] == "3"  # the dead process's backlog
    assert any(k.startswith("hdpo_ds.resumed_at_step.") for k in run.data.tags)
    names = {a.path for a in client.list_artifacts(run_id)}
    assert names == {"alerts.jsonl", "summary.json"}
    assert spool_mod.status(str(tmp_path / "sp"))["pending"] == 0


def test_new_run_with_unreachable_server_fails_fast_naming_the_key(tmp_path, http_env):
    port = free_port()  # nothing listens there
    cfg = load_config(None, [f"model.name_or_path={tmp_path}", f"data.train_files=[{tmp_path}]",
                             f"output_dir={tmp_path / 'out'}", f"logging.tracking_uri=http://127.0.0.1:{port}"])  # fmt: skip
    started = time.monotonic()
    with pytest.raises(
        ConfigError, match=r"logging.tracking_uri: cannot create an MLflow run at http://127\.0\.0\.1"
    ):
        MlflowLogger.for_run(cfg)
    print(f"\nfailed after {time.monotonic() - started:.1f} s")  # bounded by logging.http_max_retries
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    Spool(str(tmp_path / "out" / "mlflow_spool")).close()  # the lock was let go

    # A resumed run starts without the server, logs, and finishes within its bounded wait.
    cfg.logging.flush_timeout_s = 1.0
    resumed = MlflowLogger.for_run(cfg, run_id="0123456789abcdef")
    for step in range(3):
        resumed.log_metrics({"loss": 1.0}, step=step)
    resumed.finish()
    state = spool_mod.status(str(tmp_path / "out"))
    assert state["pending"] == 5 and state["acked_seq"] == 0  # status, 3 steps, summary... all kept
