"""A mixture of experts under ZeRO-3 with and without its sparse blocks marked as leaf modules.

Two `deepspeed --num_accelerators 2 launch/train.py` runs on the demo config (2 ranks, ZeRO-3, CPU,
reference online) with the tiny Mixtral of configs/models/tiny-moe widened to --hidden x --layers with
--experts experts (top-2, random init, the demo tokenizer): `model.moe_leaf_modules=false` (DeepSpeed
fetches the router and the stacked experts of every block as two modules, with their own hooks) and
`true` (each MixtralSparseMoeBlock is one ZeRO-3 leaf: one fetch, one hook pair). Tokens/s is the runs'
MLflow metric (median after step 1); peak memory is the largest peak RSS over the ranks.

    .venv/bin/python bench/moe_leaf.py [--steps 8] [--hidden 256] [--layers 4] [--experts 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.ref_modes import run  # noqa: E402  (the same launcher and metric reading)


def moe_dir(workdir: str, hidden: int, layers: int, experts: int) -> str:
    path = os.path.join(workdir, f"mixtral-h{hidden}-l{layers}-e{experts}")
    os.makedirs(path)
    with open(os.path.join(ROOT, "configs/models/tiny-moe/config.json")) as f:
        config = json.load(f)
    config.update(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_local_experts=experts,
        head_dim=hidden // 4,
    )
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        model = [
            f"model.name_or_path={moe_dir(workdir, args.hidden, args.layers, args.experts)}",
            "model.from_scratch=true",
            f"model.tokenizer={ROOT}/configs/models/tiny-demo",
            "reference.mode=online",
            "train.export_hf=false",
        ]
        rows = [
            run("moe_leaf_modules=false", [*model, "model.moe_leaf_modules=false"], args, workdir),
            run("moe_leaf_modules=true (leaves)", [*model, "model.moe_leaf_modules=true"], args, workdir),
        ]
    print(
        f"\n2 ranks, ZeRO-3, CPU, demo data, Mixtral hidden {args.hidden} x {args.layers} layers, "
        f"{args.experts} experts (top-2), {args.steps} steps, reference online, median tokens/s after "
        "step 1\n"
    )
    print("| run | real tokens/s | vs no leaves | peak RSS per rank (max, MiB) | vs no leaves |")
    print("|---|---|---|---|---|")
    base = rows[0]
    for r in rows:
        print(
            f"| {r['name']} | {r['tokens_per_second']:.0f} | "
            f"{r['tokens_per_second'] / base['tokens_per_second']:.2f}x "
            f"| {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x |"
        )


if __name__ == "__main__":
    main()
