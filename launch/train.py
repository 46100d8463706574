"""Train with H-DPO (or a sibling loss) on DeepSpeed.

deepspeed launch/train.py --ds ds_configs/zero3.json --config configs/demo.yaml [key.sub=value ...]
torchrun --nproc-per-node 2 launch/train.py --ds ds_configs/zero3.json --config ...
python launch/train.py --ds ds_configs/zero3.json --config ...      # one process, no launcher
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hdpo_ds import dist
from hdpo_ds.config import ConfigError, load_config
from hdpo_ds.data import DataError

# DeepSpeed calls torch's older collective names; the warning repeats on every step otherwise.
warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ds", required=True, help="DeepSpeed JSON config (ds_configs/zero3.json, ...)")
    parser.add_argument("--config", default=None, help="run config (YAML)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.alpha=0.9")
    args = parser.parse_args(argv)

    launched_alone = dist.fill_single_process_env()
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
    )
    log = logging.getLogger("hdpo_ds.launch")
    if launched_alone:
        log.info("no launcher environment: running as a single process")
    try:
        cfg = load_config(args.config, args.overrides)
        from hdpo_ds.trainer import train

        result = train(cfg, args.ds)
    except (ConfigError, DataError, ValueError, FileNotFoundError) as e:
        print(f"error (rank {rank}): {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(f"\nfinished {result.steps} steps; final loss {result.losses[-1]:.4f}")
        print(f"outputs:     {os.path.abspath(result.output_dir)}")
        print(f"MLflow run:  {result.run_id} in {result.tracking_uri}")
        if result.tracking_uri and result.tracking_uri.startswith("sqlite:"):
            print(f"browse with: mlflow ui --backend-store-uri {result.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
