"""Supervised fine-tuning (hdpo_ds/recipes/sft.py) on the same DeepSpeed engine, packing and checkpoints as
H-DPO.

deepspeed launch/sft.py --ds ds_configs/zero3.json --config configs/toy/sft.yaml [key.sub=value ...]
python launch/sft.py --ds ds_configs/zero3.json --config ...      # one process, no launcher

Records: `prompt` (text or role/content messages) and `completion`; `train.pairs_per_step` is the number
of sequences per optimizer step. The final model goes to <output_dir>/hf.

SIGUSR1 or SIGTERM: every rank finishes the current step, writes a checkpoint, and the process exits
with 75 (hdpo_ds.runtime.stop.EXIT_STOPPED); the same command resumes from it.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hdpo_ds.runtime import stop


def sft(cfg, ds_path: str, rank: int) -> None:
    from hdpo_ds.recipes.sft import train_sft

    result = train_sft(cfg, ds_path)
    if rank == 0:
        last = f"; final loss {result.losses[-1]:.4f}" if result.losses else " (nothing left to train)"
        print(f"\nSFT finished {result.steps} steps{last}")
        print(f"outputs:     {os.path.abspath(result.output_dir)} (model: hf/)")
        print(f"MLflow run:  {result.run_id} in {result.tracking_uri}")


def main(argv: list[str] | None = None) -> int:
    from hdpo_ds.cli import run_entry_point

    return run_entry_point(__doc__, "DeepSpeed JSON config (ds_configs/zero3.json, ...)", sft, argv)


if __name__ == "__main__":
    # As in launch/train.py: the handlers go in before the heavy imports, so a stop signal during start-up
    # stops the run after its first step instead of killing it.
    stop.install()
    stop.exit_process(main())
