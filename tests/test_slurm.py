"""SLURM launch on a real Slurm cluster: 2 emulated nodes on this machine (slurm/local_cluster.sh up 2).

Jobs (`sbatch slurm/train.sbatch`, CPU mode, one rank on each node, tests/run_helpers.py assets):
`slurm_full` trains STEPS steps uninterrupted, the baseline; `slurm_requeue` is `scontrol requeue`d after
its first checkpoint (SIGTERM reaches the ranks: they checkpoint at an agreed step, the job comes back
and resumes from `latest`); `slurm_usr1` gets `scancel --signal=USR1 --batch` while its ranks start up
(the time-limit warning path: the batch shell relays it, the ranks stop after the first step with a
checkpoint, the job requeues itself). Both must end like the baseline: same steps, same losses (1e-5).
Slurm holds a requeued job back (BeginTime, about 2 minutes); the tests release it at once with
`scontrol update StartTime=now`, as an impatient user would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from hdpo_ds.runtime import dist, stop
from tests.run_helpers import ROOT, mlflow_run, overrides

STEPS = 40
SLURM_ARGS = [
    "train.save_every=10",
    "train.eval_every=10",
    "train.dump_gradients_at=[]",
    "train.keep_checkpoints=10",
]
LOCAL_CLUSTER = os.path.join(ROOT, "slurm", "local_cluster.sh")
JOB_TIMEOUT = 600


def _missing_packages() -> list[str]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(b, path=path) is None]


# CI sets it (.ci/run): there a cluster that cannot be set up fails the Slurm tests instead of skipping them.
REQUIRE_SLURM = "HDPO_REQUIRE_SLURM"


def _skip(reason: str) -> None:
    """No cluster here: skip with the reason printed, or fail where HDPO_REQUIRE_SLURM=1 (CI)."""
    if os.environ.get(REQUIRE_SLURM) == "1":
        pytest.fail(f"{REQUIRE_SLURM}=1 and the Slurm tests cannot run: {reason}", pytrace=False)
    print(f"\nSKIP test_slurm: {reason}", file=sys.stderr)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, request):
    """A 2-node Slurm cluster under a temporary folder; its environment for the Slurm commands.
    Torn down (jobs cancelled, daemons stopped by pid) when the session ends, also after a failure."""
    if os.geteuid() != 0:
        _skip(
            "not root: slurm/local_cluster.sh runs munged, slurmctld and slurmd as root "
            "(tested that way only)"
        )
    missing = _missing_packages()
    if missing and shutil.which("apt-get") is None:
        _skip(f"Slurm packages missing ({', '.join(missing)}) and no apt-get to install them")
    if missing:
        out = subprocess.run(["bash", LOCAL_CLUSTER, "install"], capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            _skip(
                f"Slurm packages missing ({', '.join(missing)}) and apt-get could not install them: "
                f"{(out.stderr or out.stdout).strip()[-500:]}"
            )
    folder = tmp_path_factory.mktemp("slurm_cluster")
    request.addfinalizer(lambda: subprocess.run(["bash", LOCAL_CLUSTER, "down", str(folder)], timeout=120))
    up = subprocess.run(
        ["bash", LOCAL_CLUSTER, "up", "2", str(folder)], capture_output=True, text=True, timeout=600
    )
    assert up.returncode == 0, f"local_cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HDPO_"))}
    env.update(SLURM_CONF=str(folder / "slurm.conf"), PATH=env.get("PATH", "") + ":/usr/sbin:/sbin")
    return env


def _slurm(env, *args: str) -> str:
    out = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{' '.join(args)} failed: {out.stderr}"
    return out.stdout


def _job(env, job: str) -> dict[str, str]:
    line = _slurm(env, "scontrol", "show", "job", "-o", job)
    return dict(re.findall(r"(JobState|Restarts|ExitCode|Reason)=(\S+)", line))


def _wait(predicate, what: str, timeout: float = JOB_TIMEOUT, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def _submit(cluster, assets, name: str) -> tuple[str, object]:
    """sbatch slurm/train.sbatch from the repository root, CPU mode, 2 nodes x 1 rank; returns the job id
    and its log (one per job id, appended to by a requeued job)."""
    log = assets["root"] / f"{name}.slurm.log"
    cmd = [
        "sbatch",
        "--parsable",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=00:20:00",
        f"--job-name={name}",
        f"--output={assets['root']}/{name}.slurm.log",
        "slurm/train.sbatch",
        "--ds",
        str(assets["root"] / "zero3.json"),
        *overrides(assets, name, STEPS),
        *SLURM_ARGS,
    ]
    env = {**cluster, "HDPO_DEVICE": "cpu", "HDPO_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0], log


def _finished(cluster, job: str, log) -> dict[str, str]:
    done = _wait(
        lambda: (s := _job(cluster, job))["JobState"] not in ("PENDING", "RUNNING", "COMPLETING") and s,
        f"job {job} to end",
        log=log,
    )
    assert done["JobState"] == "COMPLETED" and done["ExitCode"] == "0:0", (done, log.read_text()[-6000:])
    return done


def _release_requeued(cluster, job: str, log) -> None:
    """Wait until the job is back in the queue after its requeue and its nodes are idle, then let it start.

    Slurm's hold (BeginTime) is there for a reason: the nodes revoke the old run's credential at its end,
    with a one-second resolution, and a start within that second is refused ("Job credential revoked")
    and fails the job. Two seconds after the nodes are idle again is safe.
    """
    _wait(
        lambda: (s := _job(cluster, job))["JobState"] == "PENDING" and s["Restarts"] == "1",
        f"job {job} to be requeued",
        log=log,
    )
    _wait(
        lambda: set(_slurm(cluster, "sinfo", "-h", "-N", "-o", "%t").split()) == {"idle"},
        "idle nodes",
        log=log,
    )
    time.sleep(2)
    _slurm(cluster, "scontrol", "update", f"jobid={job}", "StartTime=now")


def _losses(run: dict) -> list[float]:
    return [run["metrics"]["loss"][s] for s in range(STEPS)]


def _assert_same_as_full(run: dict, full: dict) -> None:
    assert run["info"]["steps"] == full["info"]["steps"] == STEPS
    assert run["info"]["final_loss"] == pytest.approx(full["info"]["final_loss"], abs=1e-5)
    assert _losses(run) == pytest.approx(_losses(full), abs=1e-5)
    assert run["metrics"]["_counts"]["loss"] == STEPS  # every step logged once, in one MLflow run


def _stop_lines(text: str) -> dict[int, str]:
    """{rank: 'step tag'} from each rank's 'stop requested' line."""
    found = re.findall(
        r"\[rank(\d)\] WARNING hdpo_ds.recipes.session: stop requested on 2 of 2 ranks .*?(step\d{8})",
        text,
    )
    return {int(rank): tag for rank, tag in found}


@pytest.fixture(scope="module")
def slurm_full(cluster, assets):
    job, log = _submit(cluster, assets, "slurm_full")
    state = _finished(cluster, job, log)
    return {"job": job, "log": log, "state": state, **mlflow_run(assets["root"] / "slurm_full")}


@pytest.mark.slurm
def test_sbatch_trains_on_two_nodes_and_exports(slurm_full, assets):
    from transformers import AutoModelForCausalLM

    text = slurm_full["log"].read_text()
    assert f"job {slurm_full['job']} (restart 0) on node[1-2]: 2 ranks" in text
    assert re.search(
        r"\[rank0\] srun task 0 of 2 \(local rank 0\) on node node1, master 127\.0\.0\.1:\d+", text
    )
    assert re.search(
        r"\[rank1\] srun task 1 of 2 \(local rank 0\) on node node2, master 127\.0\.0\.1:\d+", text
    )
    assert slurm_full["params"]["run.world_size"] == "2"
    assert slurm_full["info"]["steps"] == STEPS and slurm_full["metrics"]["_counts"]["loss"] == STEPS
    assert "srun ended with 0" in text
    trained = AutoModelForCausalLM.from_pretrained(str(assets["root"] / "slurm_full" / "hf"))
    start = AutoModelForCausalLM.from_pretrained(assets["model"])
    trained_params, start_params = dict(trained.named_parameters()), dict(start.named_parameters())
    assert trained_params.keys() == start_params.keys()
    assert all(torch.isfinite(p).all() for p in trained_params.values())
    assert any(not torch.equal(p, start_params[n]) for n, p in trained_params.items())  # it trained


@pytest.mark.slurm
def test_scontrol_requeue_resumes_from_latest(cluster, assets, slurm_full):
    job, log = _submit(cluster, assets, "slurm_requeue")
    latest = assets["root"] / "slurm_requeue" / "checkpoints" / "latest"
    _wait(latest.exists, "the first checkpoint", log=log)
    _slurm(cluster, "scontrol", "requeue", job)
    _release_requeued(cluster, job, log)
    state = _finished(cluster, job, log)
    assert state["Restarts"] == "1"

    text = log.read_text()  # --open-mode=append: both runs of the job in one log
    assert f"job {job} (restart 0)" in text and f"job {job} (restart 1)" in text
    # SIGTERM at the requeue: both ranks stopped after the same step, with a checkpoint
    stops = _stop_lines(text)
    assert stops.keys() == {0, 1} and stops[0] == stops[1], text[-6000:]
    stop_step = int(stops[0].removeprefix("step"))
    assert 10 <= stop_step < STEPS
    assert (
        f"resumed from {assets['root'] / 'slurm_requeue' / 'checkpoints' / stops[0]} at step {stop_step}"
        in text
    )
    run = mlflow_run(assets["root"] / "slurm_requeue")
    client_state = assets["root"] / "slurm_requeue" / "checkpoints" / stops[0] / "client_state.json"
    assert json.loads(client_state.read_text())["mlflow_run_id"] == run["info"]["run_id"]
    _assert_same_as_full(run, slurm_full)


@pytest.mark.slurm
def test_usr1_to_batch_shell_checkpoints_requeues_and_resumes(cluster, assets, slurm_full):
    job, log = _submit(cluster, assets, "slurm_usr1")
    # Both ranks have their handlers (launch/train.py installs them before its heavy imports) and are
    # still starting up: the stop comes after the first step.
    _wait(
        lambda: log.exists() and "[rank0] srun task" in (t := log.read_text()) and "[rank1] srun task" in t,
        "both ranks to start",
        log=log,
    )
    _slurm(cluster, "scancel", "--signal=USR1", "--batch", job)
    _wait(lambda: _job(cluster, job)["Restarts"] == "1", f"job {job} to requeue itself", log=log)

    text = log.read_text()
    assert "SIGUSR1: relaying it to the ranks" in text
    stops = _stop_lines(text)
    assert stops == {0: "step00000001", 1: "step00000001"}, text[-6000:]
    marker = json.loads(re.search(r"the ranks stopped: (\{.*\})", text).group(1))
    assert marker["step"] == 1 and marker["ranks_signalled"] == 2 and marker["exit_code"] == stop.EXIT_STOPPED
    assert f"srun ended with {stop.EXIT_STOPPED} after SIGUSR1: requeueing job {job}" in text
    # The stop checkpoint holds every rank's shards and RNG state, committed
    folder = assets["root"] / "slurm_usr1" / "checkpoints" / "step00000001"
    complete = json.loads((folder / "COMPLETE.json").read_text())
    assert complete["world_size"] == 2 and complete["step"] == 1
    for rank in (0, 1):
        assert f"rng_rank{rank}.pt" in complete["files"]
        assert any(f"zero_pp_rank_{rank}_" in name and "optim_states" in name for name in complete["files"])
        assert any(f"zero_pp_rank_{rank}_" in name and "model_states" in name for name in complete["files"])
    assert (folder.parent / "latest").read_text() == "step00000001"

    _release_requeued(cluster, job, log)
    state = _finished(cluster, job, log)
    assert state["Restarts"] == "1"
    text = log.read_text()
    assert f"resumed from {folder} at step 1" in text
    _assert_same_as_full(mlflow_run(assets["root"] / "slurm_usr1"), slurm_full)


def _rank_pid(job: str, rank: int) -> int:
    """The pid of a job's rank, found by its environment (SLURM_JOB_ID, SLURM_PROCID)."""
    want = {f"SLURM_JOB_ID={job}".encode(), f"SLURM_PROCID={rank}".encode()}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"launch/train.py" not in f.read():
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                if want <= set(f.read().split(b"\0")):
                    return int(pid)
        except OSError:
            continue
    raise AssertionError(f"no process for rank {rank} of job {job}")


@pytest.mark.slow
@pytest.mark.slurm
def test_node_failure_requeues_and_resumes_from_last_checkpoint(cluster, assets, slurm_full):
    """A node dies hard: its rank is SIGKILLed (no stop checkpoint is possible) and Slurm marks it down,
    which requeues the job (--requeue). It resumes from the last periodic checkpoint."""
    job, log = _submit(cluster, assets, "slurm_nodefail")
    latest = assets["root"] / "slurm_nodefail" / "checkpoints" / "latest"
    _wait(latest.exists, "the first checkpoint", log=log)
    os.kill(_rank_pid(job, 1), signal.SIGKILL)
    _slurm(cluster, "scontrol", "update", "nodename=node2", "state=down", "reason=emulated_node_failure")
    _release_requeued(cluster, job, log)  # ReturnToService=2: node2 comes back once its slurmd answers
    state = _finished(cluster, job, log)
    assert state["Restarts"] == "1"
    text = log.read_text()
    assert "DUE TO NODE FAILURE" in text
    resumed = re.search(r"resumed from \S+/(step\d{8}) at step (\d+)", text)
    assert resumed and int(resumed.group(2)) % 10 == 0  # a periodic checkpoint (save_every=10)
    assert _stop_lines(text) == {}  # rank 1 was gone: no stop checkpoint
    _assert_same_as_full(mlflow_run(assets["root"] / "slurm_nodefail"), slurm_full)


# ---- pieces that need no cluster


def test_fill_slurm_env_maps_an_srun_task(monkeypatch):
    slurm = {
        "SLURM_STEP_NUM_TASKS": "12",
        "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "2",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2),3,1",
        "MASTER_ADDR": "10.0.0.7",
        "MASTER_PORT": "29512",
    }
    monkeypatch.setattr(os, "environ", dict(slurm))  # this process's own environment stays untouched
    assert dist.fill_slurm_env()
    got = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")}
    assert got == {
        "RANK": "9",
        "WORLD_SIZE": "12",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "3",
        "MASTER_ADDR": "10.0.0.7",
    }
    monkeypatch.setattr(os, "environ", {**slurm, "RANK": "3", "WORLD_SIZE": "16"})
    assert not dist.fill_slurm_env()  # a launcher under srun (torchrun) set them: its values stay
    assert os.environ["RANK"] == "3"


def test_fill_slurm_env_leaves_the_batch_shell_alone_and_needs_a_master(monkeypatch):
    monkeypatch.setattr(os, "environ", {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert not dist.fill_slurm_env()  # the batch shell: no srun step
    assert "RANK" not in os.environ
    os.environ["SLURM_STEP_NUM_TASKS"] = "2"
    with pytest.raises(ValueError, match="MASTER_ADDR and MASTER_PORT is not set"):
        dist.fill_slurm_env()
    monkeypatch.setattr(os, "environ", {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"})
    assert dist.fill_slurm_env()  # a world of one needs no master: it fills its own
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["MASTER_PORT"]) > 0


def _outcome(reason: str) -> tuple[str, str]:
    try:
        _skip(reason)
    except pytest.skip.Exception as e:
        return "skipped", str(e)
    except pytest.fail.Exception as e:
        return "failed", str(e)
    return "ran", ""


def test_a_missing_cluster_fails_where_ci_requires_slurm(monkeypatch):
    monkeypatch.delenv(REQUIRE_SLURM, raising=False)
    assert _outcome("not root") == ("skipped", "not root")  # a developer's machine
    monkeypatch.setenv(REQUIRE_SLURM, "0")
    assert _outcome("not root") == ("skipped", "not root")
    monkeypatch.setenv(REQUIRE_SLURM, "1")  # what .ci/run exports
    assert _outcome("not root") == ("failed", "HDPO_REQUIRE_SLURM=1 and the Slurm tests cannot run: not root")


def test_ci_requires_slurm():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        lines = [line.strip() for line in f]
    assert f"export {REQUIRE_SLURM}=1" in lines
    assert lines.index(f"export {REQUIRE_SLURM}=1") < lines.index("make test")


def test_stop_signals_only_set_a_flag():
    """In a child process (pytest keeps its own handlers): two signals, the process lives on."""
    code = (
        "import os, signal\nfrom hdpo_ds.runtime import stop\nstop.install()\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\nos.kill(os.getpid(), signal.SIGTERM)\n"
        "print(','.join(stop.received()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SIGUSR1,SIGTERM"


@pytest.mark.parametrize("exit_call", ["sys.exit", "stop.exit_process"])
def test_a_finished_run_exits_0_with_a_daemon_thread_inside_torch(exit_call):
    """What aborted a finished 2-rank run once in CI: a daemon thread inside C++ (here torch.mm) when the
    interpreter finalizes is ended by pthread_exit, and std::terminate turns exit 0 into SIGABRT.
    stop.exit_process (what launch/*.py call) leaves without that teardown; its output still arrives."""
    code = (
        "import sys, threading, time, torch\nfrom hdpo_ds.runtime import stop\n"
        "a = torch.randn(256, 256)\n"
        "def spin():\n    while True:\n        torch.mm(a, a)\n"
        "threading.Thread(target=spin, daemon=True).start()\ntime.sleep(0.2)\n"
        f"print('finished', flush=False)\n{exit_call}(0)\n"
    )
    outs = [
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
        for _ in range(3)
    ]
    assert [out.stdout for out in outs] == ["finished\n"] * 3, [out.stderr for out in outs]
    if exit_call == "sys.exit":  # the crash is real here, so the other case shows the fix
        aborted = [out for out in outs if out.returncode == -signal.SIGABRT]
        assert aborted and "terminate called without an active exception" in aborted[0].stderr
    else:
        assert [out.returncode for out in outs] == [0, 0, 0], [out.stderr for out in outs]
