"""What the launch scripts share: arguments, per-rank logging, and turning bad input into exit code 2.

Argument parsing lives only in entry points (DESIGN.md §2); this module is their common part.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable

from hdpo_ds import dist
from hdpo_ds.checkpoint import CheckpointError
from hdpo_ds.config import Config, ConfigError, load_config
from hdpo_ds.data import DataError
from hdpo_ds.data.refcache import RefCacheError

__all__ = ["run_entry_point"]

# DeepSpeed calls torch's older collective names; the warning repeats on every step otherwise.
warnings.filterwarnings("ignore", message=r".*(reduce_scatter_tensor|all_gather_into_tensor).* is deprecated")


def run_entry_point(
    doc: str, ds_help: str, body: Callable[[Config, str, int], None], argv: list[str] | None
) -> int:
    """Parse `--ds`, `--config` and dotted overrides, set up the process, run `body(cfg, ds, rank)`.

    Works under the deepspeed launcher (which passes --local_rank), torchrun, one srun task per rank
    (hdpo_ds.dist.fill_slurm_env), and plain python (a world of one). Bad configuration or data prints
    `error (rank R): ...` and returns 2; a stop on a signal (hdpo_ds/stop.py) returns stop.EXIT_STOPPED.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ds", required=True, help=ds_help)
    parser.add_argument("--config", default=None, help="run config (YAML)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.alpha=0.9")
    args = parser.parse_args(argv)

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
        print(f"[rank{rank}] srun task {rank} of {os.environ['WORLD_SIZE']} (local rank {os.environ['LOCAL_RANK']}) "
              f"on node {os.environ.get('SLURMD_NODENAME', '?')}, master {os.environ['MASTER_ADDR']}:"
              f"{os.environ['MASTER_PORT']}", file=sys.stderr, flush=True)  # fmt: skip
    from hdpo_ds.stop import EXIT_STOPPED, TrainingStopped
    from hdpo_ds.trainer import NonFiniteTrainingError

    try:
        body(load_config(args.config, args.overrides), args.ds, rank)
    except (ConfigError, DataError, RefCacheError, CheckpointError, ValueError, FileNotFoundError) as e:
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
