"""LoRA with the adapters-off reference against full fine-tuning with a reference engine: memory and speed.

Two `deepspeed --num_accelerators 2 launch/train.py` runs on the demo config (2 ranks, ZeRO-3, CPU, the
reference online), with the demo model widened to --hidden x --layers (random init): full fine-tuning
(`reference.source=engine`: a second ZeRO-3 engine holds the reference), then `model.lora.r=--r` on every
linear layer (`reference.source=auto`: the policy's engine with its adapters disabled, no second
model). Tokens/s is the runs' MLflow metric (median after step 1); peak memory is the largest peak RSS
over the ranks (`memory/peak_host_rss_mib_max_over_ranks`).

    .venv/bin/python bench/lora.py [--steps 8] [--hidden 512] [--layers 8] [--r 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.ref_modes import model_dir, run  # noqa: E402  (the same launcher and metric reading)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        model = [
            f"model.name_or_path={model_dir(workdir, args.hidden, args.layers)}",
            "reference.mode=online",
        ]
        full = run("full + reference engine", [*model, "reference.source=engine"], args, workdir)
        lora = run(
            f"LoRA r={args.r} + adapters off",
            [*model, f"model.lora.r={args.r}", f"model.lora.alpha={2 * args.r}"],
            args,
            workdir,
        )
    print(
        f"\n2 ranks, ZeRO-3, CPU, demo data, Llama hidden {args.hidden} x {args.layers} layers, "
        f"{args.steps} steps, reference online, median tokens/s after step 1\n"
    )
    print(
        "| run | real tokens/s | vs full | peak RSS per rank (max, MiB) | vs full | wall s (incl. start-up) |"
    )
    print("|---|---|---|---|---|---|")
    for r in (full, lora):
        print(
            f"| {r['name']} | {r['tokens_per_second']:.0f} | "
            f"{r['tokens_per_second'] / full['tokens_per_second']:.2f}x | {r['peak_rss_mib']:.0f} | "
            f"{r['peak_rss_mib'] / full['peak_rss_mib']:.2f}x | {r['wall_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
