"""What one training step's `log_metrics` costs the training loop: through the spool vs a direct call.

The step's metrics (every STEP_METRICS key) are logged N times, as the trainer does once per
step. "direct" is one synchronous `MlflowClient.log_batch` per step (what the logger did before the
spool); "spooled" is `MlflowLogger` (a local append, the network in a background thread). Targets: a
SQLite file, a real `mlflow server` on loopback (SQLite behind it), and a dead server (nothing listens on
the port; MLflow's HTTP retries bounded as the trainer bounds them). Reported: the caller's time per
call (median, max) and, for the spool, how long `finish` waited for the backlog.

    .venv/bin/python bench/mlflow_logging.py [--steps 200]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    proc = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{workdir}/server.db",
            "--artifacts-destination",
            f"{workdir}/artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return proc, uri
        except OSError:
            time.sleep(0.25)
    raise RuntimeError("mlflow server did not start")


def step_metrics(step: int) -> dict[str, float]:
    from hdpo_ds.tracking.metrics import STEP_METRICS

    return {key: 1.0 / (step + 1 + i) for i, key in enumerate(STEP_METRICS)}


def direct(uri: str, steps: int) -> dict:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name("bench")
    experiment = found.experiment_id if found else client.create_experiment("bench")
    run_id = client.create_run(experiment).info.run_id
    times = []
    for step in range(steps):
        started = time.perf_counter()
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in step_metrics(step).items()])
        times.append(time.perf_counter() - started)
    client.set_terminated(run_id)
    return {"times": times, "finish": 0.0}


def direct_dead(uri: str, steps: int) -> dict:
    """One call per step to a server that is not there: each raises after MLflow's bounded retries."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    times = []
    for step in range(steps):
        started = time.perf_counter()
        with contextlib.suppress(Exception):  # the call fails: the loop would catch it and lose the step
            client.log_batch("0" * 32, metrics=[Metric(k, v, 0, step) for k, v in step_metrics(step).items()])
        times.append(time.perf_counter() - started)
    return {"times": times, "finish": 0.0}


def spooled(
    uri: str, steps: int, workdir: str, run_id: str | None = None, flush_timeout_s: float = 120.0
) -> dict:
    from hdpo_ds.tracking.mlflow_logger import MlflowLogger

    spool = os.path.join(workdir, f"spool-{time.monotonic_ns()}")
    logger = MlflowLogger(uri, "bench", "", run_id=run_id, spool_dir=spool, flush_timeout_s=flush_timeout_s)
    if run_id:
        logger.reopen()
    times = []
    for step in range(steps):
        started = time.perf_counter()
        logger.log_metrics(step_metrics(step), step=step)
        times.append(time.perf_counter() - started)
    started = time.perf_counter()
    logger.finish()
    return {"times": times, "finish": time.perf_counter() - started}


def row(target: str, mode: str, result: dict) -> str:
    ms = [t * 1000 for t in result["times"]]
    return (
        f"| {target} | {mode} | {len(ms)} | {statistics.median(ms):.3f} | {max(ms):.3f} | "
        f"{sum(ms) / 1000:.2f} | {result['finish']:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--dead-steps", type=int, default=3, help="direct calls to the dead server (each takes s)"
    )
    args = parser.parse_args()
    from hdpo_ds.config import LoggingConfig
    from hdpo_ds.tracking.spool import bound_http_retries

    defaults = LoggingConfig()
    bound_http_retries(defaults.http_max_retries, defaults.http_timeout_s)
    workdir = tempfile.mkdtemp(prefix="bench_mlflow_")
    proc = None
    try:
        sqlite = f"sqlite:///{workdir}/bench.db"
        rows = [
            row("SQLite file", "direct", direct(sqlite, args.steps)),
            row("SQLite file", "spooled", spooled(sqlite, args.steps, workdir)),
        ]
        proc, server = start_server(workdir)
        direct(server, 3)  # the server's first calls are slow: warm it up
        rows += [
            row("mlflow server", "direct", direct(server, args.steps)),
            row("mlflow server", "spooled", spooled(server, args.steps, workdir)),
        ]
        dead = f"http://127.0.0.1:{free_port()}"
        rows += [
            row("dead server", "direct", direct_dead(dead, args.dead_steps)),
            row(
                "dead server",
                "spooled",
                spooled(dead, args.steps, workdir, run_id="0" * 32, flush_timeout_s=5),
            ),
        ]
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\nlog_metrics with {len(step_metrics(0))} metrics per step; MLFLOW_HTTP_REQUEST_MAX_RETRIES="
        f"{os.environ['MLFLOW_HTTP_REQUEST_MAX_RETRIES']}, "
        f"TIMEOUT={os.environ['MLFLOW_HTTP_REQUEST_TIMEOUT']}\n"
    )
    print("| target | mode | steps | median ms per call | max ms per call | total s in the loop | finish s |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
