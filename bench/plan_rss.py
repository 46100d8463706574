"""The memory planner against a real 2-rank ZeRO-3 run on CPU: predicted vs measured memory per rank.

A Llama of about 61M parameters (hidden 640, 8 layers, vocab 32,000, tied; the demo tokenizer) trains
for a few H-DPO steps with the online reference on the demo data, through the real trainer
(`hdpo_ds.recipes.preference.train`) under `deepspeed --num_accelerators 2`, in float32 (CPU). Each rank
records its RSS after importing everything, resets the kernel's peak counter (/proc/self/clear_refs),
trains, and reads the peak (VmHWM). The planner predicts the peak live bytes of one rank for the same settings
(fp32, torch AdamW, 2 ranks, the micro-batch token budget). glibc is told to hand freed blocks back
(MALLOC_MMAP_THRESHOLD_=65536), so RSS follows live tensors rather than the allocator's cache.

    .venv/bin/python bench/plan_rss.py [--steps 3] [--hidden 640] [--layers 8] [--vocab 32000] [--json OUT]
        [--glibc-default]

Prints the per-rank prediction, the measured growth of peak RSS, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BUDGET, MAX_LENGTH, MAX_PROMPT = 1024, 256, 192


def model_dir(workdir: str, hidden: int, layers: int, vocab: int) -> str:
    """The demo tokenizer (its ids are < 512) with a wider, deeper Llama config and a 32k vocabulary,
    so that the logits are as large, relative to the model, as a real run's."""
    path = os.path.join(workdir, "model")
    shutil.copytree(os.path.join(ROOT, "configs/models/tiny-demo"), path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    heads = hidden // 64
    config.update(
        hidden_size=hidden,
        intermediate_size=int(2.8 * hidden) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=64,
        vocab_size=vocab,
    )
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def overrides(model: str, out: str, steps: int) -> list[str]:
    return [
        f"model.name_or_path={model}",
        "model.from_scratch=true",
        f"output_dir={out}",
        "data.train_files=[configs/data/demo/train.jsonl]",
        "data.eval_files=[]",
        f"data.max_length={MAX_LENGTH}",
        f"data.max_prompt_length={MAX_PROMPT}",
        f"data.max_tokens_per_micro_batch={BUDGET}",
        "train.pairs_per_step=64",
        f"train.max_steps={steps}",
        "train.export_hf=false",
        "optim.warmup_steps=0",
        "reference.mode=online",
        f"logging.tracking_uri=sqlite:///{os.path.join(out, 'mlflow.db')}",
        "logging.progress_bar=false",
    ]


def _status(field: str) -> int:
    """A /proc/self/status entry in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def worker(argv: list[str]) -> None:
    """One rank: import everything, take the baseline, train, record the peak."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    parser.add_argument("rest", nargs="*")
    args = parser.parse_args(argv)
    import deepspeed  # noqa: F401  (imported before the baseline, as the trainer needs it)
    import mlflow  # noqa: F401
    import transformers  # noqa: F401

    from hdpo_ds.config import load_config
    from hdpo_ds.recipes.preference import train

    cfg = load_config(None, args.rest)
    rank = int(os.environ["RANK"])
    baseline = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    train(cfg, os.path.join(ROOT, "ds_configs/zero3.json"))
    peak = _status("VmHWM")
    from hdpo_ds.runtime import dist

    dist.shutdown()
    with open(os.path.join(args.out, f"rss_rank{rank}.json"), "w") as f:
        json.dump({"baseline": baseline, "peak": peak}, f)


def predict(model: str) -> dict:
    """The planner for this run: fp32 on CPU (no separate master copy), torch AdamW, 2 ranks."""
    from hdpo_ds.config import load_config
    from hdpo_ds.runtime.engine import fill_ds_config, load_ds_config
    from hdpo_ds.tools.plan import Hardware, load_hf_config, model_shape, plan_memory, settings_from_ds_config

    cfg = load_config(None, overrides(model, "unused", 1))
    shape = model_shape(load_hf_config(model))
    ds = fill_ds_config(
        load_ds_config(os.path.join(ROOT, "ds_configs/zero3.json")),
        cfg,
        world_size=2,
        device_type="cpu",
        hidden_size=shape.hidden_size,
    )
    ds["bf16"]["enabled"] = False  # resolve_dtype on CPU: float32
    settings = settings_from_ds_config(
        ds,
        micro_batch_tokens=BUDGET,
        reference="online",
        fused_optimizer=False,
        logits_chunk_size=cfg.train.logits_chunk_size,
        dtype_bytes=4,
    )
    plan = plan_memory(shape, Hardware(1, 2, gpu_mem_gib=1e9), settings)
    return {
        "params": shape.num_params,
        "peak_bytes": plan.peak_bytes,
        "phase": plan.peak_phase,
        "rows": {r.name: r.bytes for r in plan.rows if r.where == "gpu"},
    }


def measure(
    model: str,
    steps: int,
    workdir: str,
    glibc_default: bool = False,
    extra: tuple[str, ...] = (),
    name: str = "run",
) -> list[dict]:
    """Each rank's RSS baseline and peak of one 2-rank run (`extra`: more config overrides), written under
    workdir/name (its MLflow database too)."""
    out = os.path.join(workdir, name)
    os.makedirs(out)
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    if not glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "deepspeed"),
        "--num_accelerators",
        "2",
        "--master_port",
        str(_free_port()),
        os.path.abspath(__file__),
        "--worker",
        "--out",
        out,
        *overrides(model, out, steps),
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"the 2-rank run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    ranks = []
    for rank in range(2):
        with open(os.path.join(out, f"rss_rank{rank}.json")) as f:
            ranks.append(json.load(f))
    return ranks


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(steps: int, hidden: int, layers: int, vocab: int, glibc_default: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="plan_rss_") as workdir:
        model = model_dir(workdir, hidden, layers, vocab)
        prediction = predict(model)
        ranks = measure(model, steps, workdir, glibc_default)
    growth = [r["peak"] - r["baseline"] for r in ranks]
    return {
        "prediction": prediction,
        "ranks": ranks,
        "growth": growth,
        "ratio": [prediction["peak_bytes"] / g for g in growth],
    }


def main() -> None:
    if "--worker" in sys.argv:
        worker([a for a in sys.argv[1:] if a != "--worker"])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=640)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--json", default=None, help="write the result here too")
    parser.add_argument(
        "--glibc-default",
        action="store_true",
        help="leave glibc's malloc settings alone (RSS then includes its cache of freed blocks)",
    )
    args = parser.parse_args()
    result = run(args.steps, args.hidden, args.layers, args.vocab, args.glibc_default)
    mib = 2**20
    p = result["prediction"]
    print(f"model: {p['params']:,} parameters; 2 ranks, ZeRO-3, fp32, CPU")
    for name, value in p["rows"].items():
        print(f"  predicted {name:<58} {value / mib:9.1f} MiB")
    print(f"predicted peak per rank ({p['phase']}): {p['peak_bytes'] / mib:.1f} MiB")
    for rank, (r, g, ratio) in enumerate(
        zip(result["ranks"], result["growth"], result["ratio"], strict=True)
    ):
        print(
            f"rank {rank}: baseline RSS {r['baseline'] / mib:.1f} MiB, peak {r['peak'] / mib:.1f} MiB, "
            f"growth {g / mib:.1f} MiB; predicted / measured = {ratio:.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
