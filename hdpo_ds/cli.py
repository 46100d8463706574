"""What the launch scripts share: arguments, per-rank logging, and turning bad input into exit code 2.

Argument parsing lives only in entry points (docs/design.md §2); this module is their common part.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable

from hdpo_ds.config import Config, ConfigError, load_config
from hdpo_ds.data import DataError
from hdpo_ds.reference.cache import RefCacheError
from hdpo_ds.runtime import dist
from hdpo_ds.runtime.checkpoint import CheckpointError

__all__ = ["run_entry_point"]

# DeepSpeed calls torch's older collective names; the warning repeats on every step otherwise.
warnings.filterwarnings("ignore", message=r".*(reduce_scatter_tensor|all_gather_into_tensor).* is deprecated")


# Errors the code raises on purpose about the user's input; anything else is a bug and surfaces as one.
_BAD_INPUT = (ConfigError, DataError, RefCacheError, CheckpointError)


def run_entry_point(
    doc: str,
    ds_help: str,
    body: Callable[[Config, str, int], None],
    argv: list[str] | None,
    *,
    with_dry_run: bool = False,
) -> int:
    """Parse `--ds`, `--config` and dotted overrides, set up the process, run `body(cfg, ds, rank)`.

    Works under the deepspeed launcher (which passes --local_rank), torchrun, one srun task per rank
    (hdpo_ds.runtime.dist.fill_slurm_env), and plain python (a world of one). Bad configuration or data prints
    `error (rank R): ...` and returns 2; a stop on a signal (hdpo_ds/runtime/stop.py) returns
    stop.EXIT_STOPPED. With `with_dry_run`, `--dry-run [--world-size N ...]` checks the run for N ranks
    instead (hdpo_ds/tools/dryrun.py).
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ds", required=True, help=ds_help)
    parser.add_argument("--config", default=None, help="run config (YAML)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    if with_dry_run:
        group = parser.add_argument_group(
            "dry run (no launcher, no GPU: check the run and print its memory plan)"
        )
        group.add_argument(
            "--dry-run", action="store_true", help="check everything up to the engines, then exit"
        )
        group.add_argument(
            "--world-size",
            type=int,
            default=None,
            help="ranks to plan for (default: WORLD_SIZE from a launcher, else 1)",
        )
        group.add_argument("--gpus-per-node", type=int, default=None, help="default: min(world size, 8)")
        group.add_argument(
            "--gpu-mem-gib",
            type=float,
            default=79.0,
            help="memory of one GPU as torch reports it (default 79: an 80 GB H100/A100)",
        )
        group.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of one GPU")
        group.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="the run's device type")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.alpha=0.9")
    args = parser.parse_args(argv)
    if with_dry_run and args.dry_run:
        return _dry_run(args)

    try:
        under_srun = dist.fill_slurm_env()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    launched_alone = dist.fill_single_process_env()
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
    )
    if launched_alone:
        logging.getLogger("hdpo_ds.launch").info("no launcher environment: running as a single process")
    if under_srun:  # every rank says where it runs (the other ranks log warnings only)
        print(
            f"[rank{rank}] srun task {rank} of {os.environ['WORLD_SIZE']} "
            f"(local rank {os.environ['LOCAL_RANK']}) "
            f"on node {os.environ.get('SLURMD_NODENAME', '?')}, master {os.environ['MASTER_ADDR']}:"
            f"{os.environ['MASTER_PORT']}",
            file=sys.stderr,
            flush=True,
        )
    from hdpo_ds.recipes.session import NonFiniteTrainingError
    from hdpo_ds.runtime.stop import EXIT_STOPPED, TrainingStopped

    try:
        body(load_config(args.config, args.overrides), args.ds, rank)
    except _BAD_INPUT as e:
        print(f"error (rank {rank}): {e}", file=sys.stderr)
        return 2
    except NonFiniteTrainingError as e:
        print(f"stopped (rank {rank}): {e}", file=sys.stderr)
        return 3
    except TrainingStopped as e:
        print(f"stopped (rank {rank}): {e}", file=sys.stderr)
        dist.shutdown()
        return EXIT_STOPPED
    dist.shutdown()
    return 0


def _dry_run(args: argparse.Namespace) -> int:
    """Rank 0 checks the run; under a launcher or srun the other ranks leave at once (nothing is
    collective). The world size defaults to the launcher's (or the srun step's)."""
    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    if rank != 0:
        return 0
    world_size = args.world_size or int(env.get("WORLD_SIZE", env.get("SLURM_STEP_NUM_TASKS", 1)))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from hdpo_ds.tools.dryrun import dry_run, format_report

    try:
        report = dry_run(
            load_config(args.config, args.overrides),
            args.ds,
            world_size=world_size,
            gpus_per_node=args.gpus_per_node,
            gpu_mem_gib=args.gpu_mem_gib,
            peak_tflops=args.peak_tflops,
            device_type=args.device,
        )
    except _BAD_INPUT as e:
        print(f"error (dry run, {world_size} ranks): {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0
