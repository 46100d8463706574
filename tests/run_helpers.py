"""Shared pieces of the tests that launch real runs: a tiny saved model, data, ZeRO-3 configs, launchers.

The runs use stage3_param_persistence_threshold 0 (so the tiny model is really partitioned), one
thread per process, and a data seed chosen so that step 0 gives two ranks unequal pair counts and
one rank a zero-weight filler micro-batch.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import torch

from hdpo_ds.data import PairSampler, load_records, tokenize_pairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)
MAX_LENGTH, BUDGET, PAIRS_PER_STEP, STEPS = 96, 192, 4, 5
# What a launcher sets (and hdpo_ds.runtime.dist.fill_single_process_env fills for a world of one).
RENDEZVOUS_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def restored_environ():
    """On exit, os.environ is again what it was on entry: added variables removed, changed and removed
    ones put back."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(count: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    words = (
        "apple banana cherry date fig grape kiwi lemon mango olive peach pear plum sage thyme mint".split()
    )
    out = []
    for i in range(count):
        n = max(2, min(30, round(rng.lognormvariate(1.5, 0.8))))
        items = [rng.choice(words) for _ in range(n)]
        good = ", ".join(sorted(items)) + "."
        bad = ", ".join(reversed(sorted(items))) + ". " + rng.choice(words)
        out.append({"id": f"p{i}", "prompt": f"Sort: {' '.join(items)}\n", "chosen": good, "rejected": bad})
    return out


def make_assets(root):
    """A tiny saved Llama (untied, hidden 32), the demo tokenizer, data, and ZeRO-3 configs with
    persistence threshold 0; plus a training seed whose step 0 has unequal pairs and a filler."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir = root / "model"
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, "configs/models/tiny-demo"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(1)  # a reference that differs from the policy's start (for TDPO's KL)
    LlamaForCausalLM(config).save_pretrained(root / "ref_model")

    train_file, eval_file = root / "train.jsonl", root / "eval.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in records(40, seed=1)))
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in records(6, seed=2)))

    for name in ("zero3.json", "zero3_infer.json"):
        with open(os.path.join(ROOT, "ds_configs", name)) as f:
            ds = json.load(f)
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (root / name).write_text(json.dumps(ds))

    pairs = tokenize_pairs(
        load_records([str(train_file)]), tokenizer, max_length=MAX_LENGTH, max_prompt_length=64
    ).pairs
    for seed in range(200):
        packed = (
            PairSampler(
                pairs.lengths,
                pairs_per_step=PAIRS_PER_STEP,
                world_size=2,
                rank=0,
                seed=seed,
                max_tokens_per_micro_batch=BUDGET,
            )
            .assignment(0, 0)
            .packed
        )
        counts = [sum(len(mb.pairs) for mb in rank if not mb.filler) for rank in packed.ranks]
        if counts[0] != counts[1] and any(mb.filler for rank in packed.ranks for mb in rank):
            break
    else:
        raise AssertionError("no seed gives step 0 a filler and unequal pair counts")
    return {
        "root": root,
        "model": str(model_dir),
        "train": str(train_file),
        "eval": str(eval_file),
        "seed": seed,
        "pairs": pairs,
        "tokenizer": tokenizer,
        "ref_model": str(root / "ref_model"),
    }


def assert_grads_close(got: dict, expected: dict):
    """rtol 1e-5 per element, with an absolute floor of 1e-5 x the tensor's largest entry: float32 sums
    in another order leave ~1e-8 noise on entries near zero, where a relative test means nothing."""
    assert set(got) == set(expected), set(got) ^ set(expected)
    for name, g in expected.items():
        scale = g.abs().max().item()
        assert scale > 0, f"{name}: an all-zero gradient would match anything"
        torch.testing.assert_close(
            got[name], g, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


def overrides(assets, name: str, steps: int) -> list[str]:
    root = assets["root"]
    return [
        f"model.name_or_path={assets['model']}",
        f"data.train_files=[{assets['train']}]",
        f"data.eval_files=[{assets['eval']}]",
        f"data.max_length={MAX_LENGTH}",
        "data.max_prompt_length=64",
        f"data.max_tokens_per_micro_batch={BUDGET}",
        f"train.pairs_per_step={PAIRS_PER_STEP}",
        f"train.max_steps={steps}",
        f"train.seed={assets['seed']}",
        "train.eval_every=2",
        "train.dump_gradients_at=[0]",
        "loss.type=hdpo",
        "loss.alpha=0.9",
        "loss.beta=0.5",
        "optim.lr=1e-3",
        "optim.warmup_steps=0",
        "optim.schedule=constant",
        f"reference.ds_config={root / 'zero3_infer.json'}",
        f"output_dir={root / name}",
        f"logging.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        "logging.progress_bar=false",
    ]


def launch(
    assets,
    name: str,
    launcher: str,
    steps: int,
    extra: list[str] | None = None,
    env_extra: dict | None = None,
    expect_success: bool = True,
    script: str = "launch/train.py",
    ranks: int = 2,
):
    """Run a launcher (`ranks` processes) in its own session (process group); returns the
    CompletedProcess-like result and, when the run finished, its MLflow metrics and params."""
    port = free_port()
    cmd = {
        "deepspeed": [
            os.path.join(VENV_BIN, "deepspeed"),
            "--num_accelerators",
            str(ranks),
            "--master_port",
            str(port),
        ],
        "torchrun": [
            os.path.join(VENV_BIN, "torchrun"),
            "--nproc-per-node",
            str(ranks),
            "--master-port",
            str(port),
        ],
        "python": [sys.executable],
    }[launcher]
    ds = "zero3_infer.json" if script.endswith("precompute_ref.py") else "zero3.json"
    cmd += [script, "--ds", str(assets["root"] / ds), *overrides(assets, name, steps), *(extra or [])]
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"  # compared runs use the same thread count
    env.update(env_extra or {})
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    wall_s = time.monotonic() - started
    # Keep every launch's output beside its run, for reading after a failure.
    log_index = len(glob.glob(str(assets["root"] / f"{name}.*.log")))
    (assets["root"] / f"{name}.{log_index}.log").write_text(stdout + "\n--- stderr ---\n" + stderr)
    result = {
        "returncode": proc.returncode,
        "stdout": stdout,
        "stderr": stderr,
        "pgid": proc.pid,
        "dir": assets["root"] / name,
        "wall_s": wall_s,
    }
    if expect_success:
        assert proc.returncode == 0, f"{launcher} run failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
        # DeepSpeed's CPU allreduce segments (64 MiB per rank) must not outlive the run (engine.py)
        assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"), "leaked /dev/shm segments"
    if script == "launch/train.py" and (assets["root"] / name / "run_info.json").exists():
        result.update(mlflow_run(assets["root"] / name))
    return result


def mlflow_run(run_dir) -> dict:
    with open(run_dir / "run_info.json") as f:
        info = json.load(f)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(info["tracking_uri"])
    run = client.get_run(info["run_id"])
    history = {}
    for key in run.data.metrics:
        points = client.get_metric_history(info["run_id"], key)
        history[key] = {m.step: m.value for m in points}
        history.setdefault("_counts", {})[key] = len(points)
    return {"info": info, "params": run.data.params, "metrics": history}


def live_processes_in_group(pgid: int) -> list[int]:
    """Pids (not zombies) whose process group is `pgid`."""
    pids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.split("/")[2]))
    return pids


def survivors_of_kill(pgid: int, grace_s: float = 15.0) -> list[int]:
    """The group's processes still alive `grace_s` after a SIGKILL of the group: a SIGKILLed process
    can take a moment to die on a loaded machine; one that outlives the grace escaped the group."""
    import time

    deadline = time.monotonic() + grace_s
    while (alive := live_processes_in_group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive
