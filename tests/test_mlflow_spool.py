"""MLflow logging through the spool (hdpo_ds/tracking/spool.py, docs/mlflow.md).

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
import urllib.request

import pytest

from hdpo_ds.config import ConfigError, load_config
from hdpo_ds.tracking import spool as spool_mod
from hdpo_ds.tracking.metrics import STEP_METRICS
from hdpo_ds.tracking.mlflow_logger import MlflowLogger
from hdpo_ds.tracking.spool import Spool, Spooler
from tests.run_helpers import ROOT, VENV_BIN, free_port, launch, live_processes_in_group

HTTP_VARS = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
)


class Outage(ConnectionError):
    pass


class Refusal(ValueError):
    pass


class FakeSender:
    """Delivers groups into `delivered` (a list, or a JSON-lines file: the server); fails while `down` is
    set; refuses records whose seq is in `refuse`; `hang` blocks inside send until released; the process
    SIGKILLs itself once the server has a group with step `kill_at_step`, before send returns."""

    def __init__(self, refuse=(), path=None):
        self.delivered, self.calls, self.failures, self.failed_sends, self.asked = [], [], 0, 0, []
        self.down, self.hang = threading.Event(), threading.Event()
        self.inside = threading.Event()
        self.refuse, self.path, self.kill_at_step = set(refuse), path, None

    def send(self, group, spooler):
        self.calls.append([r["seq"] for r in group])
        self.inside.set()
        while self.hang.is_set():
            time.sleep(0.01)
        if self.down.is_set():
            self.failures += 1
            self.failed_sends += 1
            raise Outage("connection refused")
        if any(r["seq"] in self.refuse for r in group):
            raise Refusal("bad value")
        self.delivered.extend(group)
        if self.path:
            with open(self.path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in group)
        if self.kill_at_step is not None and any(r.get("step") == self.kill_at_step for r in group):
            os.kill(os.getpid(), signal.SIGKILL)

    def last_steps(self, run_id, keys):
        self.asked.append(sorted(keys))
        if self.down.is_set():
            self.failures += 1
            raise Outage("connection refused")
        steps = {}
        for r in _server_records(self.path) if self.path else self.delivered:
            if r["run"] == run_id and r["op"] == "metrics":
                for key in set(r["metrics"]) & set(keys):
                    steps[key] = max(steps.get(key, r["step"]), r["step"])
        return steps

    def is_permanent(self, error):
        return isinstance(error, Refusal)


def _server_records(path):
    return [json.loads(line) for line in open(path).read().splitlines()] if os.path.exists(path) else []


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
    failed = sender.calls[: sender.failed_sends]
    assert all(call == failed[0] and call[0] == 1 for call in failed)
    assert len(sender.calls) - sender.failed_sends < 41
    # The server may have stored a group whose answer got lost: before the retry, it was asked.
    assert sender.asked and sender.asked[0] == ["loss", "lr"]
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
from hdpo_ds.tracking.spool import Spool, Spooler
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


def _points(records):
    return [
        (r["run"], k, r["step"], v) for r in records if r["op"] == "metrics" for k, v in r["metrics"].items()
    ]


def test_points_of_redone_steps_reach_the_server_once(tmp_path):
    """Run r1 logged steps 0-5 (evaluations at 2 and 4); the server acknowledged steps 0-3, then the process
    died. Resumed from the step-2 checkpoint, it logs the same values again (resume is exact) from step 2,
    and the evaluations after 2. Every point reaches the server once: the dead process's unsent backlog
    (steps 4-5) first, then only the points at steps the server has not got."""

    def point(step):
        return {"loss": 1.0 / (step + 1), "lr": 0.1 * step}

    def log(target, steps, evals):
        for step in steps:
            target("metrics", "r1", step=step, metrics=point(step))
            if step in evals:
                target("metrics", "r1", step=step, metrics={"eval/loss": float(step)})

    server = str(tmp_path / "server.jsonl")
    first = Spooler(
        Spool(str(tmp_path / "sp"), "fake://"), FakeSender(path=server), retry_max_interval_s=0.05
    )
    log(first.put, range(4), {2})
    assert first.close(10)
    spool = Spool(str(tmp_path / "sp"), "fake://")  # logged, then killed before the server got them
    log(spool.append, range(4, 6), {4})
    spool.close()
    sender = FakeSender(path=server)
    resumed = Spooler(Spool(str(tmp_path / "sp"), "fake://"), sender, retry_max_interval_s=0.05)
    log(resumed.put, range(2, 8), {4, 6})
    resumed.put("metrics", "r2", step=3, metrics={"loss": 3.0})  # another run: its own steps
    assert resumed.close(10)

    expected = [("r1", k, s, v) for s in range(8) for k, v in point(s).items()]
    expected += [("r1", "eval/loss", s, float(s)) for s in (2, 4, 6)] + [("r2", "loss", 3, 3.0)]
    delivered = _points(_server_records(server))
    assert sorted(delivered) == sorted(expected)  # each once, with the values of the uninterrupted run
    # 2 keys at steps 2-5 and the evaluation at 4 were sent before
    assert resumed.counters_for("r1").skipped == 9
    assert resumed.counters_for("r1").replayed == 3  # the dead process's backlog
    state = json.loads((tmp_path / "sp" / "state.json").read_text())
    assert state["runs"]["r1"]["steps"] == {"loss": 7, "lr": 7, "eval/loss": 6}
    assert state["runs"]["r2"]["steps"] == {"loss": 3}


# A process that logs steps 0-4 and dies once the server has taken the group with step 4, before it
# could record the acknowledgement.
_DIES_AFTER_DELIVERY = """
import sys, time
sys.path.insert(0, {root!r})
from hdpo_ds.tracking.spool import Spool, Spooler
from tests.test_mlflow_spool import FakeSender

sender = FakeSender(path={server!r})
sender.kill_at_step = 4
spooler = Spooler(Spool({root_sp!r}, "fake://"), sender, retry_max_interval_s=0.05)
for s in range(5):
    spooler.put("metrics", "r1", step=s, metrics={{"loss": float(s)}})
time.sleep(60)
"""


def test_group_the_server_took_before_a_kill_is_not_sent_again(tmp_path):
    server, root_sp = tmp_path / "server.jsonl", str(tmp_path / "sp")
    child = _DIES_AFTER_DELIVERY.format(root=ROOT, server=str(server), root_sp=root_sp)
    proc = subprocess.run(
        [sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [r["step"] for r in _server_records(str(server))] == [0, 1, 2, 3, 4]
    unacked = 5 - json.loads((tmp_path / "sp" / "state.json").read_text())["acked_seq"]
    assert unacked >= 1  # at least the record of step 4 was taken by the server but not acknowledged

    sender = FakeSender(path=str(server))
    spooler = Spooler(Spool(root_sp, "fake://"), sender, retry_max_interval_s=0.05)
    assert spooler.spool.backlog_at_open == unacked
    spooler.put("metrics", "r1", step=5, metrics={"loss": 5.0})
    assert spooler.close(10)
    assert [r["step"] for r in _server_records(str(server))] == [0, 1, 2, 3, 4, 5]  # each once
    assert sender.asked == [["loss"]]  # the server was asked once, about the first group after the kill
    assert spooler.counters_for("r1").skipped == unacked


def test_run_resumed_into_an_empty_spool_asks_the_server_once_per_key(tmp_path):
    """train.resume=PATH with a checkpoint of another output_dir: this spool holds no steps of the run, so
    it asks the server (once per key) instead of sending the redone steps a second time."""
    server = str(tmp_path / "server.jsonl")
    other = Spooler(
        Spool(str(tmp_path / "other"), "fake://"), FakeSender(path=server), retry_max_interval_s=0.05
    )

    def log(spooler, steps):
        for step in steps:
            spooler.put("metrics", "r1", step=step, metrics={"loss": float(step)})
            if step in (2, 4, 6):
                spooler.put("metrics", "r1", step=step, metrics={"eval/loss": -float(step)})

    log(other, range(6))
    assert other.close(10)
    sender = FakeSender(path=server)
    resumed = Spooler(Spool(str(tmp_path / "sp"), "fake://"), sender, retry_max_interval_s=0.05)
    resumed.learn("r1")
    log(resumed, range(3, 8))  # from the step-3 checkpoint of the other folder
    assert resumed.close(10)
    expected = [("r1", "loss", s, float(s)) for s in range(8)] + [
        ("r1", "eval/loss", s, -s) for s in (2, 4, 6)
    ]
    assert sorted(_points(_server_records(server))) == sorted(expected)
    assert sorted(key for asked in sender.asked for key in asked) == ["eval/loss", "loss"]
    assert resumed.counters_for("r1").skipped == 4  # loss at 3-5, the evaluation at 4


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


def _exact(step):
    """What a run logs at `step`, in every attempt: resume is exact."""
    return {"loss": 1.0 / (step + 1), "alpha": 0.9}


def test_killed_and_resumed_logger_keeps_one_point_per_step_on_sqlite(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("spool", artifact_location=str(tmp_path / "artifacts"))
    first = MlflowLogger(uri, "spool", "a", spool_dir=str(tmp_path / "sp"), retry_max_interval_s=0.1)
    run_id = first.run_id
    assert client.get_run(run_id).info.experiment_id == experiment
    first.log_params({"x": 1})
    for step in range(3):
        first.log_metrics(_exact(step), step=step)
    assert first.flush(30)
    first._spooler.close(0)  # the process dies: logging stops here, and steps 3-4 never reach MLflow
    first._finished = True
    spool = Spool(str(tmp_path / "sp"))
    for step in (3, 4):
        spool.append("metrics", run_id, step=step, metrics=_exact(step))
    spool.close()

    # Resumed from the step-1 checkpoint: steps 1-4 are redone, with the same values.
    resumed = MlflowLogger(
        uri, "spool", "a", run_id=run_id, spool_dir=str(tmp_path / "sp"), retry_max_interval_s=0.1
    )
    resumed.reopen(1)
    for step in range(1, 6):
        resumed.log_metrics(_exact(step), step=step)
    with pytest.raises(ValueError, match="'loss' at step 5 after step 5"):  # one point per step, always
        resumed.log_metrics({"loss": 0.0}, step=5)
    note = tmp_path / "alerts.jsonl"
    note.write_text('{"step": 3}\n')
    resumed.log_artifact(str(note))
    note.unlink()
    resumed.log_json_artifact("summary.json", {"ok": True})
    resumed.finish()
    run, history = _history(uri, run_id)
    assert history == {key: [(s, _exact(s)[key]) for s in range(6)] for key in ("loss", "alpha")}
    assert run.info.status == "FINISHED" and run.data.params == {"x": "1"}
    assert run.data.tags["hdpo_ds.spool.replayed"] == "2"  # the dead process's backlog
    assert run.data.tags["hdpo_ds.spool.skipped"] == "8"  # 2 keys at the redone steps 1-4
    assert any(k.startswith("hdpo_ds.resumed_at_step.") for k in run.data.tags)
    names = {a.path for a in client.list_artifacts(run_id)}
    assert names == {"alerts.jsonl", "summary.json"}
    assert spool_mod.status(str(tmp_path / "sp"))["pending"] == 0


def test_new_run_with_unreachable_server_fails_fast_naming_the_key(tmp_path, http_env):
    port = free_port()  # nothing listens there
    cfg = load_config(
        None,
        [
            f"model.name_or_path={tmp_path}",
            f"data.train_files=[{tmp_path}]",
            f"output_dir={tmp_path / 'out'}",
            f"logging.tracking_uri=http://127.0.0.1:{port}",
        ],
    )
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


# ---- a real tracking server


class MlflowServer:
    """`mlflow server` on loopback over one SQLite file, in its own process group (killed as a group:
    killing only its main pid leaves the uvicorn worker behind)."""

    def __init__(self, root, port: int) -> None:
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"
        self.starts = 0

    def start(self, timeout: float = 300.0) -> float:
        """Start and wait until /health answers; returns the seconds it took."""
        started = time.monotonic()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job-runner processes: tracking only
        log = open(self.root / f"server.{self.starts}.log", "w")  # noqa: SIM115 (the server holds it)
        self.starts += 1
        self.proc = subprocess.Popen(
            [
                os.path.join(VENV_BIN, "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            cwd=self.root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            assert self.proc.poll() is None, f"mlflow server exited: {self.proc.returncode}"
            assert time.monotonic() - started < timeout, "mlflow server did not answer /health"
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc is not None:
            for pid in live_processes_in_group(self.proc.pid):
                os.kill(pid, signal.SIGKILL)
        self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server"), free_port())
    try:
        took = srv.start()
        print(f"\nmlflow server up after {took:.1f} s")
        yield srv
    finally:
        srv.stop()


def _spooled_steps_after(spool_root, key: str, since_ms: int) -> list[int]:
    steps = []
    for path in sorted(spool_root.glob("records-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line being written
            if record["op"] == "metrics" and key in record["metrics"] and record["time_ms"] > since_ms:
                steps.append(record["step"])
    return steps


OUTAGE_STEPS = 24  # steps take 0.1-0.5 s here: enough of them run while the server restarts


@pytest.mark.distributed
def test_training_goes_on_through_a_server_outage_and_every_step_arrives(assets, server, tmp_path):
    from mlflow.tracking import MlflowClient

    extra = [
        f"logging.tracking_uri={server.uri}",
        "logging.experiment=outage",
        "logging.flush_timeout_s=300",
        "logging.retry_max_interval_s=1",
        "train.dump_gradients_at=[]",
        "train.eval_every=6",
    ]
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = launch(assets, "outage", "deepspeed", OUTAGE_STEPS, extra=extra)
        except BaseException as e:  # reported by the main thread
            outcome["error"] = e

    trainer = threading.Thread(target=run)
    trainer.start()
    client = MlflowClient(server.uri)

    def logged_steps() -> int:
        experiment = client.get_experiment_by_name("outage")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        return len(client.get_metric_history(runs[0].info.run_id, "loss")) if runs else 0

    deadline = time.monotonic() + 400
    while logged_steps() < 1:  # some steps are on the server...
        assert trainer.is_alive(), outcome
        assert time.monotonic() < deadline, "the run logged no steps"
        time.sleep(0.2)
    killed_ms = int(time.time() * 1000)
    server.stop()  # ...then it dies, mid-run
    spool_root = assets["root"] / "outage" / "mlflow_spool"
    while len(_spooled_steps_after(spool_root, "loss", killed_ms)) < 4:  # training goes on without it
        assert trainer.is_alive(), f"the run ended before logging 4 steps without the server: {outcome}"
        assert time.monotonic() < deadline, "no steps logged while the server was down"
        time.sleep(0.2)
    down_for = server.start()  # the same port and SQLite file
    back_ms = int(time.time() * 1000)
    trainer.join(600)
    assert not trainer.is_alive() and "error" not in outcome, outcome.get("error")
    result = outcome["result"]

    metrics, counts = result["metrics"], result["metrics"]["_counts"]
    for key in STEP_METRICS:
        assert sorted(metrics[key]) == list(range(OUTAGE_STEPS)), key
        assert counts[key] == OUTAGE_STEPS, f"{key}: {counts[key]} points for {OUTAGE_STEPS} steps"
    for key in (k for k in metrics if k.startswith("eval/")):
        assert sorted(metrics[key]) == [6, 12, 18, 24] and counts[key] == 4, key
    params = result["params"]
    assert params["run.world_size"] == "2" and params["config.loss.alpha"] == "0.9"
    run_id = result["info"]["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.json", "ds_config.json"}

    # The loop did not wait: steps were logged (timestamps are taken when the trainer logs) while the
    # server was dead, and they reached MLflow afterwards.
    stamps = {m.step: m.timestamp for m in client.get_metric_history(run_id, "loss")}
    during = sorted(s for s, t in stamps.items() if killed_ms < t < back_ms)
    print(
        f"\nserver down {(back_ms - killed_ms) / 1000:.1f} s (restart took {down_for:.1f} s); "
        f"loss step times relative to the kill (s): "
        f"{[(s, round((stamps[s] - killed_ms) / 1000, 1)) for s in sorted(stamps)]}; "
        f"steps logged while down: {during}"
    )
    assert len(during) >= 4
    replayed = int(run.data.tags["hdpo_ds.spool.replayed"])
    assert replayed >= len(during) and int(run.data.tags["hdpo_ds.spool.outages"]) >= 1
    summary = [
        line for line in result["stderr"].splitlines() if "waited while the server was unreachable" in line
    ]
    assert summary, result["stderr"][-3000:]
    logged = int(summary[-1].split(" of them waited")[0].rsplit(";", 1)[1])
    assert logged >= replayed and "still unsent" not in summary[-1]
    assert "unreachable" in result["stderr"] and "reachable again" in result["stderr"]
    assert spool_mod.status(str(result["dir"]))["pending"] == 0


def test_replay_command_sends_what_a_run_left_while_the_server_was_down(server, tmp_path, http_env):
    """A resumed run whose server is unreachable starts, logs and ends; `python -m hdpo_ds.tracking.spool
    replay` delivers everything later, to the URI given on the command line."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment("replay")).info.run_id
    out = tmp_path / "out"
    dead = f"http://127.0.0.1:{free_port()}"
    spool_mod.bound_http_retries(1, 5)
    logger_ = MlflowLogger(
        dead,
        "replay",
        "",
        run_id=run_id,
        spool_dir=str(out / "mlflow_spool"),
        flush_timeout_s=1.0,
        retry_max_interval_s=0.5,
    )
    logger_.reopen()
    logger_.log_params({"lr": 0.001, "alpha": 0.9})
    for step in range(6):
        logger_.log_metrics({"loss": 1.0 - 0.1 * step, "alpha": 0.9}, step=step)
    plot = tmp_path / "entropy.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    logger_.log_artifact(str(plot), artifact_path="plots")
    plot.unlink()
    logger_.set_tags({"hdpo_ds.alert.entropy_turn": "step 4"})
    logger_.finish()
    assert (
        spool_mod.status(str(out))["pending"] == 12
    )  # status, params, 6 steps, artifact, tags, summary, status

    command = [
        sys.executable,
        "-m",
        "hdpo_ds.tracking.spool",
        "replay",
        str(out),
        "--tracking-uri",
        server.uri,
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "13 record(s) sent" in proc.stdout and "12 of them waited" in proc.stdout, proc.stdout
    run, history = _history(server.uri, run_id)
    assert history["loss"] == [(s, pytest.approx(1.0 - 0.1 * s)) for s in range(6)]
    assert [s for s, _ in history["alpha"]] == list(range(6))
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.001", "alpha": "0.9"}
    assert run.data.tags["hdpo_ds.alert.entropy_turn"] == "step 4"
    assert run.data.tags["hdpo_ds.spool.replayed"] == "12"
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/entropy.png"]
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to replay" in again.stdout


# A run that logs steps 0-3 to the server, then 4-5 while the server no longer answers, and is killed.
_LOGS_THEN_DIES = """
import os, signal, sys, threading
sys.path.insert(0, {root!r})
from hdpo_ds.tracking.mlflow_logger import MlflowLogger
from tests.test_mlflow_spool import _exact

run = MlflowLogger({uri!r}, "resume", "", spool_dir={spool!r}, retry_max_interval_s=0.2)
print(run.run_id, flush=True)
for step in range(4):
    run.log_metrics(_exact(step), step=step)
assert run.flush(60)
run._spooler.sender.client.log_batch = lambda *args, **kwargs: threading.Event().wait()
for step in range(4, 6):
    run.log_metrics(_exact(step), step=step)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_and_resumed_run_keeps_one_point_per_step_on_a_tracking_server(server, tmp_path):
    """A tracking server cannot delete points: the redone steps' points are not sent a second time."""
    from mlflow.tracking import MlflowClient

    spool = str(tmp_path / "out" / "mlflow_spool")
    child = _LOGS_THEN_DIES.format(root=ROOT, uri=server.uri, spool=spool)
    proc = subprocess.run(
        [sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    run_id = proc.stdout.split()[0]
    client = MlflowClient(server.uri)
    first_copies = {m.step: m.timestamp for m in client.get_metric_history(run_id, "loss")}
    assert sorted(first_copies) == [0, 1, 2, 3]  # steps 4-5 wait in the spool

    resumed = MlflowLogger(server.uri, "resume", "", run_id=run_id, spool_dir=spool, retry_max_interval_s=0.2)
    resumed.reopen(2)  # from the step-2 checkpoint: steps 2-5 are redone, exactly
    for step in range(2, 8):
        resumed.log_metrics(_exact(step), step=step)
    resumed.finish()
    run, history = _history(server.uri, run_id)
    assert history == {key: [(s, _exact(s)[key]) for s in range(8)] for key in ("loss", "alpha")}
    stamps = {m.step: m.timestamp for m in client.get_metric_history(run_id, "loss")}
    assert {s: stamps[s] for s in first_copies} == first_copies  # the first copies stay
    assert run.info.status == "FINISHED"
    assert run.data.tags["hdpo_ds.spool.replayed"] == "2" and run.data.tags["hdpo_ds.spool.skipped"] == "8"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("logging.flush_timeout_s=-1", "logging.flush_timeout_s: must be >= 0"),
        ("logging.retry_max_interval_s=0", "logging.retry_max_interval_s: must be > 0"),
        ("logging.http_max_retries=11", r"logging.http_max_retries: must lie in \[0, 10\]"),
        ("logging.http_timeout_s=0", "logging.http_timeout_s: must be >= 1"),
    ],
)
def test_logging_limits_are_validated(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"model.name_or_path={tmp_path}", f"data.train_files=[{tmp_path}]", override])
