"""Stop on a signal with a checkpoint, so that a requeued job resumes where this one stopped.

SIGUSR1 (the batch script relays Slurm's time-limit warning, `--signal=B:USR1@...`) and SIGTERM (what
Slurm sends at `scancel` and `scontrol requeue`, KillWait seconds before SIGKILL) only set a flag here.
The trainer adds the flag to the step's one metric all-reduce, so every rank learns of a signal any rank
got at the same step; after that step they write a checkpoint and leave with EXIT_STOPPED. A second
signal sets the flag again and interrupts nothing, so it cannot break the checkpoint write.

No heavy imports: launch/train.py installs the handlers before torch is loaded, so a signal during
start-up is kept too (the default action of SIGUSR1 would kill the process).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import NoReturn

from hdpo_ds.common.atomic import write_json

__all__ = [
    "EXIT_STOPPED",
    "MARKER_ENV",
    "STOP_SIGNALS",
    "TrainingStopped",
    "exit_process",
    "install",
    "received",
    "write_marker",
]

# EX_TEMPFAIL (sysexits.h): "temporary failure, the user is invited to retry" -- a checkpoint was written
# on request and starting the same command again continues from it.
EXIT_STOPPED = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# Where rank 0 writes a JSON note of the stop (step, checkpoint, signals); set by slurm/run_ranks.sh.
MARKER_ENV = "HDPO_STOP_MARKER"

_received: list[str] = []


def _handler(signum, frame) -> None:
    _received.append(signal.Signals(signum).name)  # only a flag: the loop decides when to act


def install() -> None:
    """Catch STOP_SIGNALS in this process (main thread only, as Python requires)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)
        # Restart interrupted system calls: native code (gloo, the TCP store) must not see EINTR for it.
        signal.siginterrupt(sig, False)


def received() -> list[str]:
    """The names of the stop signals this process got so far, in order."""
    return list(_received)


class TrainingStopped(Exception):
    """Raised on every rank after the stop checkpoint was written; the entry point exits EXIT_STOPPED."""

    def __init__(self, step: int, checkpoint: str, signals: list[str]) -> None:
        super().__init__(
            f"stopped on request ({', '.join(signals) or 'a signal on another rank'}) after step {step}; "
            f"checkpoint {checkpoint}; start the same command again to resume"
        )
        self.step, self.checkpoint, self.signals = step, checkpoint, signals


def write_marker(info: dict) -> str | None:
    """Write `info` as JSON (atomically) where $HDPO_STOP_MARKER says; returns the path, or None if unset."""
    path = os.environ.get(MARKER_ENV)
    if not path:
        return None
    write_json(path, info)
    return path


def exit_process(code: int) -> NoReturn:
    """Leave the process with the entry point's `code`; a finished run (0) skips the interpreter's teardown.

    By then every output is closed (checkpoint, export, the MLflow run, the process group), and teardown
    can only add a crash: a daemon thread still inside C++ when Python finalizes is ended by pthread_exit,
    whose unwinding through a noexcept frame calls std::terminate ("terminate called without an active
    exception", exit -6): a finished run reported as failed (seen once in CI). Other codes exit normally,
    so that atexit handlers still close what an interrupted run left open.
    """
    if code != 0:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)
