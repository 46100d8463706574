"""Training throughput and peak memory with the reference online vs cached, same data, same run shape.

Three `deepspeed --num_accelerators 2 launch/train.py` runs on the demo config (2 ranks, ZeRO-3, CPU), with
the demo model widened to --hidden (random init; the demo width is 128):
online (a reference engine forwards every micro-batch), then `reference.mode=auto` once to build the
cache (its precompute time is reported apart), then cached. Tokens/s comes from the runs' MLflow
metrics (median after step 1); peak memory is the largest peak RSS over the ranks.

    .venv/bin/python bench/ref_modes.py [--steps 12] [--hidden 256] [--layers 4] [--attn auto|sdpa|...]

--attn sets model.attn_implementation of all three runs (default auto: sdpa_packed on CPU, packed rows);
`--hidden 128 --layers 4` is the demo model's shape.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_dir(workdir: str, hidden: int, layers: int) -> str:
    """The demo tokenizer with a wider Llama config (random init): the reference pass's share of the
    step then reflects compute rather than the tiny demo model's per-call overheads."""
    path = os.path.join(workdir, f"llama-h{hidden}-l{layers}")
    shutil.copytree(os.path.join(ROOT, "configs/models/tiny-demo"), path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(
        hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers, head_dim=hidden // 4
    )
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def run(name: str, overrides: list[str], args, workdir: str) -> dict:
    out = os.path.join(workdir, name)
    uri = f"sqlite:///{os.path.join(workdir, 'mlflow.db')}"
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "deepspeed"),
        "--num_accelerators",
        "2",
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
        f"reference.cache_path={os.path.join(workdir, 'refcache')}",
        *overrides,
    ]
    started = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    with open(os.path.join(out, "run_info.json")) as f:
        info = json.load(f)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    speed = {m.step: m.value for m in client.get_metric_history(info["run_id"], "tokens_per_second")}
    memory = client.get_metric_history(info["run_id"], "memory/peak_host_rss_mib_max_over_ranks")
    return {
        "name": name,
        "attention": info["attn_implementation"],
        "tokens_per_second": statistics.median(v for s, v in speed.items() if s >= 2),
        "peak_rss_mib": memory[-1].value,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=256, help="model width (the demo model has 128)")
    parser.add_argument("--layers", type=int, default=4)
    attn = ["auto", "sdpa", "sdpa_packed", "eager"]
    parser.add_argument("--attn", default="auto", choices=attn, help="model.attn_implementation of every run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        model = [f"model.name_or_path={model_dir(workdir, args.hidden, args.layers)}"]
        model.append(f"model.attn_implementation={args.attn}")
        online = run("online", ["reference.mode=online", *model], args, workdir)
        build = run("auto-build", ["reference.mode=auto", *model], args, workdir)
        cached = run("cached", ["reference.mode=cached", *model], args, workdir)
    print(
        f"\n2 ranks, ZeRO-3, CPU, demo data, Llama hidden {args.hidden} x {args.layers} layers, "
        f"{args.steps} steps, attention {args.attn}, median tokens/s after step 1\n"
    )
    print(
        "| reference | attention | real tokens/s | vs online | peak RSS per rank (max, MiB) "
        "| wall s (incl. start-up) |"
    )
    print("|---|---|---|---|---|---|")
    for r in (online, build, cached):
        print(
            f"| {r['name']} | {r['attention']} | {r['tokens_per_second']:.0f} | "
            f"{r['tokens_per_second'] / online['tokens_per_second']:.2f}x "
            f"| {r['peak_rss_mib']:.0f} | {r['wall_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
