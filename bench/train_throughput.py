"""Training-step throughput of the real trainer on the tiny demo model: packed vs padded.

Each variant is one `deepspeed --num_accelerators 2 launch/train.py` run (2 ranks, ZeRO-3, CPU, online
reference) on the demo data; tokens/s is read back from the run's MLflow metrics (real tokens, fillers
and padding excluded, both ranks together), as the median over the steps after the first two.

    .venv/bin/python bench/train_throughput.py [--steps 12] [--ranks 2] [--attn auto|sdpa|sdpa_packed|eager]

--attn sets model.attn_implementation of the packed run (default auto: sdpa_packed on CPU); the padded run
always uses auto (plain sdpa for padded rows).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(variant: str, overrides: list[str], args, workdir: str) -> dict:
    out = os.path.join(workdir, variant)
    uri = f"sqlite:///{os.path.join(workdir, 'mlflow.db')}"
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "deepspeed"),
        "--num_accelerators",
        str(args.ranks),
        "launch/train.py",
        "--ds",
        "ds_configs/zero3.json",
        "--config",
        "configs/demo.yaml",
        f"train.max_steps={args.steps}",
        "train.eval_every=0",
        "data.eval_files=[]",
        "optim.warmup_steps=0",
        f"output_dir={out}",
        f"logging.tracking_uri={uri}",
        "logging.progress_bar=false",
        *overrides,
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    with open(os.path.join(out, "run_info.json")) as f:
        info = json.load(f)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)

    def steady(key: str) -> float:
        history = {m.step: m.value for m in client.get_metric_history(info["run_id"], key)}
        return statistics.median(history[s] for s in sorted(history) if s >= 2)

    padding = [m.value for m in client.get_metric_history(info["run_id"], "padding_fraction")]
    step = steady("step_time_s")
    return {
        "variant": variant,
        "attention": info["attn_implementation"],
        "tokens_per_second": steady("tokens_per_second"),
        "padding_fraction": statistics.mean(padding),
        "mfu": steady("perf/mfu"),
        "split": {
            k: steady(f"perf/time/{k}_s") / step for k in ("forward", "backward", "optimizer", "reference")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--ranks", type=int, default=2)
    attn = ["auto", "sdpa", "sdpa_packed", "eager"]
    parser.add_argument(
        "--attn", default="auto", choices=attn, help="attention of the packed run (model.attn_implementation)"
    )
    args = parser.parse_args()
    variants = {
        "packed": ["data.packing=true", f"model.attn_implementation={args.attn}"],
        "padded": ["data.packing=false"],
    }
    with tempfile.TemporaryDirectory() as workdir:
        rows = [run(name, overrides, args, workdir) for name, overrides in variants.items()]
    base = rows[1]["tokens_per_second"]
    print(
        f"\n{args.ranks} ranks, ZeRO-3, CPU, online reference, {args.steps} steps, median after step 1, "
        f"packed attention {args.attn}\n"
    )
    columns = "real tokens/s | unused budget / padding | vs padded | perf/mfu"
    print(f"| variant | attention | {columns} | step time: forward / backward / optimizer / reference |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        split = " / ".join(f"{r['split'][k]:.0%}" for k in ("forward", "backward", "optimizer", "reference"))
        print(
            f"| {r['variant']} | {r['attention']} | {r['tokens_per_second']:.0f} | "
            f"{r['padding_fraction']:.3f} | {r['tokens_per_second'] / base:.2f}x | {r['mfu']:.1%} | {split} |"
        )


if __name__ == "__main__":
    main()
