"""Compute the reference model's log-probs once, offline, into the Arrow cache.

    deepspeed launch/precompute_ref.py --ds ds_configs/zero3_infer.json --config run.yaml \
        reference.cache_path=/path/to/cache
    python launch/precompute_ref.py --ds ds_configs/zero3_infer.json --config run.yaml ...

Then train with reference.mode=cached (or auto) and the same reference.cache_path. A killed run picks
up at the first unfinished shard when started again.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hdpo_ds.cli import run_entry_point
from hdpo_ds.runtime import stop


def precompute(cfg, ds_path: str, rank: int) -> None:
    from hdpo_ds.recipes.precompute import cache_root, run_precompute

    actions = run_precompute(cfg, ds_path)
    if rank == 0:
        for split, action in actions.items():
            print(f"{split}: {action} -> {os.path.join(cache_root(cfg), split)}")


def main(argv: list[str] | None = None) -> int:
    return run_entry_point(
        __doc__, "DeepSpeed inference config (ds_configs/zero3_infer.json)", precompute, argv
    )


if __name__ == "__main__":
    stop.exit_process(main())
