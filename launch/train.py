"""Train with H-DPO (or a sibling loss) on DeepSpeed.

deepspeed launch/train.py --ds ds_configs/zero3.json --config configs/demo.yaml [key.sub=value ...]
torchrun --nproc-per-node 2 launch/train.py --ds ds_configs/zero3.json --config ...
python launch/train.py --ds ds_configs/zero3.json --config ...      # one process, no launcher
sbatch slurm/train.sbatch --ds ds_configs/zero3.json --config ...  # one srun task per rank (docs/slurm.md)
python launch/train.py --dry-run --world-size 16 --ds ... --config ...   # check only, print the memory plan

SIGUSR1 or SIGTERM: every rank finishes the current step, writes a checkpoint, and the process exits
with 75 (hdpo_ds.runtime.stop.EXIT_STOPPED); the same command resumes from it.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hdpo_ds.runtime import stop


def train(cfg, ds_path: str, rank: int) -> None:
    from hdpo_ds.recipes.preference import train as run_training

    result = run_training(cfg, ds_path)
    if rank == 0:
        last = (
            f"; final loss {result.losses[-1]:.4f}"
            if result.losses
            else " (resumed at the end: nothing left to train)"
        )
        print(f"\nfinished {result.steps} steps{last}")
        print(f"outputs:     {os.path.abspath(result.output_dir)}")
        print(f"MLflow run:  {result.run_id} in {result.tracking_uri}")
        if result.tracking_uri and result.tracking_uri.startswith("sqlite:"):
            print(f"browse with: mlflow ui --backend-store-uri {result.tracking_uri}")


def main(argv: list[str] | None = None) -> int:
    from hdpo_ds.cli import run_entry_point  # heavy (torch, deepspeed): after the handlers are in place

    return run_entry_point(
        __doc__, "DeepSpeed JSON config (ds_configs/zero3.json, ...)", train, argv, with_dry_run=True
    )


if __name__ == "__main__":
    # Only as a program (a test may import main): SIGUSR1 / SIGTERM during start-up then stop the run
    # after its first step instead of killing it.
    stop.install()
    stop.exit_process(main())
