"""Rank helpers, barriers, and the one-collective reductions (docs/design.md §5).

Everything that asks "which rank am I", waits for the others, or combines numbers across ranks goes
through here, so that one process without any launcher behaves as a world of one.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import torch
import torch.distributed as tdist

__all__ = [
    "all_agree",
    "barrier",
    "broadcast_object",
    "fill_single_process_env",
    "fill_slurm_env",
    "gather_objects",
    "gather_rows",
    "is_initialized",
    "is_main_process",
    "local_rank",
    "rank",
    "reduce_sums",
    "shutdown",
    "world_size",
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill_single_process_env() -> bool:
    """Give a launcher-less `python script.py` the rendezvous variables of a world of one.

    DeepSpeed's init otherwise looks for MPI (and fails without it). Returns True when it
    filled them, False when a launcher (deepspeed, torchrun, srun wrapper) already set them.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return False
    os.environ.update(
        {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": os.environ.get("MASTER_PORT", str(_free_port())),
        }
    )
    return True


def _tasks_on_node(tasks_per_node: str, node_index: int) -> int | None:
    """Slurm's compressed per-node task counts ("2(x3),1") -> the count of node `node_index`."""
    counts: list[int] = []
    try:
        for part in tasks_per_node.split(","):
            count, _, repeat = part.partition("(x")
            counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    except ValueError:
        return None
    return counts[node_index] if 0 <= node_index < len(counts) else None


def fill_slurm_env() -> bool:
    """Map an srun task's Slurm variables to the torch ones: one srun task per rank (slurm/run_ranks.sh).

    SLURM_PROCID -> RANK, SLURM_LOCALID -> LOCAL_RANK, SLURM_STEP_NUM_TASKS -> WORLD_SIZE, and this
    node's task count -> LOCAL_WORLD_SIZE. Only inside an srun step (the batch shell has no
    SLURM_STEP_NUM_TASKS) and only where no launcher set RANK (torchrun or deepspeed under srun keep
    theirs). MASTER_ADDR / MASTER_PORT come from the batch script, which asks Slurm for the first node's
    address; a world of one fills them itself. Returns True when it mapped the variables.
    """
    env = os.environ
    if "RANK" in env or "SLURM_STEP_NUM_TASKS" not in env or "SLURM_PROCID" not in env:
        return False
    world = int(env["SLURM_STEP_NUM_TASKS"])
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
    if world > 1 and missing:
        raise ValueError(
            f"srun started {world} tasks but {' and '.join(missing)} is not set: launch through "
            "slurm/train.sbatch (or slurm/run_ranks.sh), or export MASTER_ADDR (the first node's address, "
            "`scontrol show node <node>` NodeAddr) and a free MASTER_PORT before srun"
        )
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], str(world)
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    local = _tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""), int(env.get("SLURM_NODEID", 0)))
    if local is not None:
        env["LOCAL_WORLD_SIZE"] = str(local)
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))
    return True


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        tdist.barrier()


def reduce_sums(
    values: Mapping[str, torch.Tensor | float], device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Sum named scalars over all ranks with one all-reduce and one host sync.

    Values may be 0-d tensors still on the device (no sync happens before the stack) or Python
    numbers. Returns plain floats, identical on every rank.
    """
    names = list(values)
    if not names:
        return {}
    stacked = torch.stack(
        [
            v.detach().to(device=device, dtype=torch.float64).reshape(())
            if torch.is_tensor(v)
            else torch.tensor(float(v), dtype=torch.float64, device=device)
            for v in values.values()
        ]
    )
    if is_initialized() and world_size() > 1:
        tdist.all_reduce(stacked, op=tdist.ReduceOp.SUM)
    return dict(zip(names, stacked.tolist(), strict=True))  # host sync: once per call


def all_agree(flag: bool | torch.Tensor, device: torch.device | str = "cpu") -> bool:
    """True on every rank when `flag` is True on any rank: a control-flow decision made together.
    A tensor flag stays on its device until the one host sync of the answer."""
    if torch.is_tensor(flag):
        t = flag.detach().reshape(1).to(device=device, dtype=torch.float32)
    else:
        t = torch.tensor([1.0 if flag else 0.0], device=device)
    if is_initialized() and world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank (small payloads only)."""
    if not (is_initialized() and world_size() > 1):
        return [obj]
    out = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def gather_rows(rows: torch.Tensor, positions: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank's `rows` (n, k), placed at their `positions` (n,) in a (total, k) tensor that every rank
    then holds whole: an all-gather by position, in one collective and without a host sync. The
    positions of all ranks must be disjoint (each row's owner writes it, the others add 0, which is
    exact); unowned rows stay 0. Used by AOT's sort over the whole step (recipes/preference.py)."""
    out = torch.zeros((total, rows.shape[1]), dtype=rows.dtype, device=rows.device)
    out[positions] = rows.detach()
    if is_initialized() and world_size() > 1:
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s picklable `obj` on every rank (e.g. a hash only the main process computed)."""
    if not (is_initialized() and world_size() > 1):
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    """Leave the process group in order (all ranks meet first), so that no communication thread is
    still alive while the interpreter tears down; a crash there would turn a finished run into a failure."""
    if is_initialized():
        if world_size() > 1:
            tdist.barrier()
        tdist.destroy_process_group()
