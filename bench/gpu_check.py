"""One command that says whether the GPU path is right and how fast it is (docs/benchmarks.md "GPU check").

    python3 bench/gpu_check.py --wheels .whl --out gpu_check.json   # a GPU machine: < 6 min on an H100/H200
    python3 bench/gpu_check.py --smoke --out /tmp/gpu_check.json    # the same code on CPU, tiny shapes

The GPU machines we can use have no network and no DeepSpeed: `make gpu-wheels` builds the wheels it
lacks (bench/gpu_wheels.sh, into .whl/), and this script installs them into a private folder and
restarts itself when `import deepspeed` fails. It needs no datasets and no MLflow: it composes the
library's own pieces (models, attention, packing, objectives, engines, perf) the way the trainer does.

Checks (each with its tolerance in the report; the exit status is 1 when one fails):
1. packed == unpacked: per-token log-probs of a packed row against the same sequences padded (plain
   sdpa with a mask), bf16, for every attention implementation this machine runs; float32 routing.
2. bf16 against float32: one DPO loss and its gradient, the same weights.
3. A ~1B Llama-shaped DPO step (Llama-3.2-1B's shape, random weights) at 8,192 tokens per micro-batch
   under DeepSpeed ZeRO-3: peak memory against hdpo_ds.tools.plan's prediction, tokens/s and MFU with
   the online reference, the cached reference, and the fused head (with the cached reference).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = "/tmp/hdpo_gpu_site"


def _bootstrap(wheels: str | None) -> None:
    """Install the carried wheels into SITE and restart with it first on the path (once)."""
    if importlib.util.find_spec("deepspeed") is not None or os.environ.get("HDPO_GPU_CHECK_BOOTSTRAPPED"):
        return
    if not wheels or not os.path.isdir(wheels):
        sys.exit("deepspeed is not installed and no --wheels folder was given (make gpu-wheels builds one)")
    files = sorted(os.path.join(wheels, f) for f in os.listdir(wheels) if f.endswith(".whl"))
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"),
            *("--no-cache-dir", "--upgrade", "--target", SITE, *files),
        ],
        check=True,
    )
    env = dict(os.environ, HDPO_GPU_CHECK_BOOTSTRAPPED="1", DS_BUILD_OPS="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SITE, ROOT, env.get("PYTHONPATH", "")) if p)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The models and batches of a run: the GPU sizes, or tiny ones for --smoke on CPU."""

    small: dict  # LlamaConfig keywords of the correctness model
    big: dict  # LlamaConfig keywords of the throughput model
    big_tokens: int  # tokens per micro-batch of the DPO step
    pair_tokens: tuple[int, int]  # (prompt, response) lengths of the DPO step's pairs
    steps: int  # timed steps per configuration (after warmup)
    warmup: int


GPU_SHAPES = Shapes(
    small=dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
    ),
    # Llama-3.2-1B: 1.24B parameters (tied embeddings)
    big=dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    big_tokens=8192,
    pair_tokens=(256, 256),
    steps=5,
    warmup=2,
)
SMOKE_SHAPES = Shapes(
    small=dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
    big=dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
    ),
    big_tokens=256,
    pair_tokens=(16, 16),
    steps=2,
    warmup=1,
)
# Stated tolerances (bf16 against a padded bf16 run of the same weights; bf16 against float32)
TOLERANCE = {
    "packed_bf16_mean_abs": 0.02,
    "packed_bf16_max_abs": 0.25,
    "packed_fp32_max_abs": 1e-4,
    "loss_rel": 0.02,
    "grad_cosine": 0.99,
}


def _save_config(keywords: dict, folder: str) -> str:
    from transformers import LlamaConfig

    LlamaConfig(max_position_embeddings=8192, **keywords).save_pretrained(folder)
    return folder


def _random_pairs(count: int, vocab: int, seed: int, prompt: tuple[int, int], response: tuple[int, int]):
    import numpy as np

    from hdpo_ds.data.tokenize import TokenizedPair

    rng = np.random.default_rng(seed)

    def ids(low, high):
        return rng.integers(3, vocab, int(rng.integers(low, high + 1))).tolist()

    return [
        TokenizedPair(f"p{i}", ids(*prompt), ids(*response), ids(*response), False, False)
        for i in range(count)
    ]


def _micro_batch(pairs):
    from hdpo_ds.data.packing import MicroBatchPacking

    total = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    return MicroBatchPacking(tuple(range(len(pairs))), False, total, total)


def _load(folder: str, attn: str, dtype, device, packing: bool = True):
    import torch

    from hdpo_ds.config import ModelConfig
    from hdpo_ds.runtime.models import load_model

    cfg = ModelConfig(name_or_path=folder, from_scratch=True, attn_implementation=attn)
    loaded = load_model(
        cfg, dtype=dtype, device_type=device.type, seed=0, packing=packing, for_training=False
    )
    model = loaded.model.to(device).eval()
    torch.manual_seed(0)
    return model, loaded


def _labelled_logps(model, batch, device):
    """Log-probs of the labelled tokens in sequence order, float32 (N,)."""
    import torch

    from hdpo_ds.objectives.logprobs import token_logps

    batch = batch.to(device)
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
    tokens = token_logps(logits, batch.labels)
    return tokens[batch.labels != -100].float()


def _forward_ms(model, batch, device, derive: bool = False, reps: int = 5) -> float:
    """Mean time of a no-grad forward of `batch` (after one warm-up); `derive`: without the collator's
    boundaries, so the per-sequence paths read position_ids back every layer (the old path)."""
    import torch

    inputs = batch.to(device).model_inputs()
    if derive:
        inputs = {k: v for k, v in inputs.items() if not k.startswith(("cu_seq_lens", "max_length"))}
    times = []
    with torch.no_grad():
        for _ in range(reps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            model(**inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    return 1000 * sum(times[1:]) / reps


def check_packed(shapes: Shapes, device, folder: str) -> dict:
    """Per-token log-probs of packed rows == the same sequences padded, per attention implementation."""
    import torch

    from hdpo_ds.data.packing import collate
    from hdpo_ds.runtime import attention

    pairs = _random_pairs(12, shapes.small["vocab_size"], 1, (5, 120), (5, 200))
    mb = _micro_batch(pairs)
    packed = collate(pairs, mb, pad_token_id=0, packing=True)
    padded = collate(pairs, mb, pad_token_id=0, packing=False)
    half = torch.bfloat16
    results = {}
    for dtype in (half, torch.float32):
        model, _ = _load(folder, "sdpa", dtype, device, packing=False)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        expected = _labelled_logps(model, padded, device)
        del model
        names = [attention.TORCH_VARLEN, "flash_attention_2", attention.SDPA_PACKED, attention.EAGER_PACKED]
        for name in names:
            key = f"{name}/{str(dtype).removeprefix('torch.')}"
            try:
                model, loaded = _load(folder, name, dtype, device)
            except Exception as e:  # not on this machine (CUDA, flash-attn): said in the report
                results[key] = {"ran": False, "why": str(e).splitlines()[0]}
                continue
            model.load_state_dict(state)
            got = _labelled_logps(model, packed, device)
            diff = (got - expected).abs()
            row = {
                "ran": True,
                "implementation": loaded.attn_implementation,
                "reason": loaded.attn_reason,
                "tokens": int(diff.numel()),
                "max_abs": float(diff.max()),
                "mean_abs": float(diff.mean()),
                "forward_ms": _forward_ms(model, packed, device),
            }
            if loaded.attn_implementation in (attention.SDPA_PACKED, attention.EAGER_PACKED):
                row["forward_ms_boundaries_from_position_ids"] = _forward_ms(
                    model, packed, device, derive=True
                )
            if dtype == half:
                row["ok"] = (
                    row["mean_abs"] <= TOLERANCE["packed_bf16_mean_abs"]
                    and row["max_abs"] <= TOLERANCE["packed_bf16_max_abs"]
                )
            else:
                row["ok"] = row["max_abs"] <= TOLERANCE["packed_fp32_max_abs"]
            results[key] = row
            del model
    return results


def _dpo_loss(model, batch, reference_logps, fused: bool):
    """Mean DPO loss of a packed micro-batch with fixed reference values."""
    from hdpo_ds.objectives.logprobs import segment_sums, token_stats
    from hdpo_ds.objectives.losses import preference_loss
    from hdpo_ds.reference.sources import pair_sequence_indices
    from hdpo_ds.runtime.fused_head import policy_token_stats

    inputs = batch.model_inputs()
    if fused:
        module = getattr(model, "module", model)
        stats = policy_token_stats(model, module, inputs, batch.labels, top_k=10, chunk_size=1024)
    else:
        stats = token_stats(model(**inputs).logits, batch.labels, top_k=10, chunk_size=1024)
    sums = segment_sums(stats.logps, batch.seq_index, batch.num_seqs, mask=batch.labels != -100).sums
    chosen, rejected = pair_sequence_indices(batch)
    out = preference_loss(
        sums[chosen],
        sums[rejected],
        reference_logps[chosen],
        reference_logps[rejected],
        loss_type="hdpo",
        beta=0.1,
        alpha=1.0,
    )
    return out.losses.mean()


def check_bf16_gradient(shapes: Shapes, device, folder: str) -> dict:
    """One DPO loss and its gradient in bf16 (auto attention) against float32 (sdpa_packed)."""
    import torch

    from hdpo_ds.data.packing import collate

    pairs = _random_pairs(8, shapes.small["vocab_size"], 2, (5, 100), (5, 150))
    batch = collate(pairs, _micro_batch(pairs), pad_token_id=0, packing=True).to(device)
    reference = torch.randn(batch.num_seqs, device=device) * 2 - 300  # fixed reference sums
    out = {}
    state = None
    for dtype, attn in ((torch.float32, "sdpa_packed"), (torch.bfloat16, "auto")):
        model, loaded = _load(folder, attn, dtype, device)
        if state is None:
            state = {k: v.float().clone() for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
        model.train()
        loss = _dpo_loss(model, batch, reference, fused=False)
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        out[str(dtype).removeprefix("torch.")] = {
            "loss": float(loss),
            "grads": grads,
            "attention": loaded.attn_implementation,
        }
        del model
    full, half = out["float32"], out["bfloat16"]
    cosine = torch.nn.functional.cosine_similarity(full["grads"], half["grads"], dim=0)
    rel = abs(half["loss"] - full["loss"]) / abs(full["loss"])
    return {
        "loss_float32": full["loss"],
        "loss_bfloat16": half["loss"],
        "loss_rel_diff": rel,
        "grad_cosine": float(cosine),
        "grad_norm_ratio": float(half["grads"].norm() / full["grads"].norm()),
        "attention_bfloat16": half["attention"],
        "ok": rel <= TOLERANCE["loss_rel"] and float(cosine) >= TOLERANCE["grad_cosine"],
    }


def _run_config(cfg_folder: str, device):
    """The run config and filled ds_configs of the DPO step (ds_configs/zero3*.json as the trainer uses)."""
    import torch

    from hdpo_ds.config import Config
    from hdpo_ds.runtime import engine

    cfg = Config()
    cfg.model.name_or_path = cfg_folder
    cfg.model.from_scratch = True
    cfg.train.pairs_per_step = 1
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with open(os.path.join(cfg_folder, "config.json")) as f:
        hidden = json.load(f)["hidden_size"]
    common = dict(world_size=1, device_type=device.type, hidden_size=hidden, dtype=dtype)
    policy_ds = engine.fill_ds_config(
        engine.load_ds_config(os.path.join(ROOT, "ds_configs/zero3.json")), cfg, **common
    )
    ref_ds = engine.fill_ds_config(
        engine.load_ds_config(os.path.join(ROOT, "ds_configs/zero3_infer.json")),
        cfg,
        training=False,
        **common,
    )
    return cfg, dtype, policy_ds, ref_ds


def _predicted_peak(
    cfg_folder: str, policy_ds: dict, tokens: int, reference: str, fused: bool, gib: float, seq: int
):
    from hdpo_ds.tools import plan

    shape = plan.model_shape(plan.load_hf_config(cfg_folder))
    settings = plan.settings_from_ds_config(
        policy_ds, micro_batch_tokens=tokens, reference=reference, fused_head=fused, seq_tokens=seq
    )
    memory = plan.plan_memory(shape, plan.Hardware(1, 1, gib), settings)
    return memory, shape


def check_dpo_step(shapes: Shapes, device, folder: str) -> dict:
    """The ~1B DPO step under ZeRO-3: online reference, cached reference, fused head + cached reference."""
    import torch

    from hdpo_ds.data.packing import collate
    from hdpo_ds.reference.sources import OnlineReference
    from hdpo_ds.runtime import engine, perf
    from hdpo_ds.runtime.models import load_model

    cfg, dtype, policy_ds, ref_ds = _run_config(folder, device)
    prompt, response = shapes.pair_tokens
    per_pair = 2 * (prompt + response)
    pairs = _random_pairs(
        shapes.big_tokens // per_pair * (shapes.steps + shapes.warmup),
        shapes.big["vocab_size"],
        3,
        (prompt, prompt),
        (response, response),
    )
    size = shapes.big_tokens // per_pair
    hosts = [
        collate(pairs[i : i + size], _micro_batch(pairs[i : i + size]), pad_token_id=0, packing=True)
        for i in range(0, len(pairs), size)
    ]

    def build(ds, training: bool):
        handle = engine.zero3_loading(ds)
        model = load_model(
            cfg.model, dtype=dtype, device_type=device.type, seed=0, for_training=training
        ).model
        built = (
            engine.build_policy_engine(model, ds, lambda step: 1.0)
            if training
            else engine.build_reference_engine(model, ds)
        )
        del handle
        return built

    policy = build(policy_ds, True)
    reference = build(ref_ds, False)
    live = {"online": OnlineReference(reference, 1024)}  # dropped before the cached runs
    counts = perf.model_counts(policy.module)
    ref_counts = perf.model_counts(reference.module)
    peak, source = perf.device_peak_tflops(device, dtype)
    gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 64.0
    cached_values = {}
    results = {"peak_tflops": peak, "peak_source": source, "flop_params": counts.params}

    def run(name: str, reference_mode: str, fused: bool):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        timer = perf.StepTimer(device)
        rows = []
        for i, host in enumerate(hosts):
            started = time.perf_counter()
            timer.begin()
            with timer.phase("data"):
                batch = host.to(device, non_blocking=True)
            with timer.phase("forward"):
                with timer.phase("reference"):
                    if reference_mode == "online":
                        ref = live["online"].sequence_logps(batch)
                        cached_values[i] = ref.detach().cpu()
                    else:
                        ref = cached_values[i].to(device, non_blocking=True)
                loss = _dpo_loss(policy, batch, ref, fused)
            with timer.phase("backward"):
                policy.backward(loss)
            with timer.phase("optimizer"):
                policy.step()
            loss_value = float(loss)  # the step's one host sync
            elapsed = time.perf_counter() - started
            phases = timer.read()
            squares = host.sum_squared_lengths()
            flops = perf.micro_batch_flops(
                counts,
                host.num_real_tokens,
                squares,
                reference=ref_counts if reference_mode == "online" else None,
            )
            if i >= shapes.warmup:
                rows.append((elapsed, flops, host.num_real_tokens, phases, loss_value))
        seconds = sum(r[0] for r in rows)
        measured = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        memory, _ = _predicted_peak(
            folder,
            policy_ds,
            shapes.big_tokens,
            "online" if reference_mode == "online" else "cached",
            fused,
            gib,
            prompt + response,
        )
        results[name] = {
            "tokens_per_s": sum(r[2] for r in rows) / seconds,
            "mfu": sum(r[1] for r in rows) / (seconds * peak * 1e12),
            "step_s": seconds / len(rows),
            "time_split_s": {k: sum(r[3][k] for r in rows) / len(rows) for k in perf.StepTimer.PHASES},
            "loss_last": rows[-1][4],
            "peak_allocated_gib": measured / 2**30 if measured is not None else None,
            "predicted_peak_gib": memory.peak_bytes / 2**30,
            "predicted_phase": memory.peak_phase,
            "predicted_required_gib": memory.required_bytes / 2**30,
        }
        if measured is not None:
            results[name]["measured_over_predicted"] = measured / memory.peak_bytes

    run("online_reference", "online", fused=False)
    del live["online"], reference
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    run("cached_reference", "cached", fused=False)
    run("fused_head_cached_reference", "cached", fused=True)
    results["plan_command"] = (
        f"python -m hdpo_ds.tools.plan --model {folder} --nodes 1 --gpus-per-node 1 --gpu-mem-gib {gib:.0f} "
        f"--ds ds_configs/zero3.json --micro-batch-tokens {shapes.big_tokens}"
    )
    return results


def environment(device) -> dict:
    import torch
    import transformers

    from hdpo_ds.runtime import attention, perf

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deepspeed": __import__("deepspeed").__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "varlen_api": attention._varlen_signature() is not None,
        "flash_attn": importlib.util.find_spec("flash_attn") is not None,
    }
    if device.type == "cuda":
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["matmul_bf16_tflops_measured"] = perf.measure_matmul_tflops(device, torch.bfloat16, size=8192)
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--wheels", default=os.path.join(ROOT, ".whl"), help="carried wheels (make gpu-wheels)"
    )
    parser.add_argument("--out", default="gpu_check.json", help="the JSON report")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on CPU (what tests/test_gpu_check.py runs)"
    )
    args = parser.parse_args(argv)
    _bootstrap(args.wheels)
    sys.path.insert(0, ROOT)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import torch

    from hdpo_ds.runtime import engine

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU version", file=sys.stderr)
        return 2
    shapes = SMOKE_SHAPES if args.smoke else GPU_SHAPES
    engine.init_distributed()
    device = engine.current_device()
    report = {"environment": environment(device), "tolerance": TOLERANCE}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        small = _save_config(shapes.small, os.path.join(tmp, "small"))
        big = _save_config(shapes.big, os.path.join(tmp, "big"))
        for name, check, folder in (
            ("packed_equals_unpacked", check_packed, small),
            ("bf16_against_fp32", check_bf16_gradient, small),
            ("dpo_step_1b", check_dpo_step, big),
        ):
            t0 = time.perf_counter()
            report[name] = check(shapes, device, folder)
            report[name + "_seconds"] = time.perf_counter() - t0
            print(f"{name}: {json.dumps(report[name], default=str)}", flush=True)
    report["seconds"] = time.perf_counter() - started
    failed = [k for k, v in report["packed_equals_unpacked"].items() if v.get("ran") and not v["ok"]]
    if not report["bf16_against_fp32"]["ok"]:
        failed.append("bf16_against_fp32")
    report["failed"] = failed
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(_summary(report))
    return 1 if failed else 0


def _summary(report: dict) -> str:
    lines = [
        f"GPU check on {report['environment']['device']} ({report['seconds']:.0f} s): "
        f"{'all checks passed' if not report['failed'] else 'FAILED: ' + ', '.join(report['failed'])}"
    ]
    for key, row in report["packed_equals_unpacked"].items():
        lines.append(
            f"  packed == unpacked {key}: "
            + (
                f"max {row['max_abs']:.2e}, mean {row['mean_abs']:.2e} ({row['implementation']}), "
                f"forward {row['forward_ms']:.1f} ms"
                if row["ran"]
                else f"not run: {row['why']}"
            )
        )
    g = report["bf16_against_fp32"]
    lines.append(f"  bf16 vs fp32: loss rel {g['loss_rel_diff']:.2e}, gradient cosine {g['grad_cosine']:.5f}")
    step = report["dpo_step_1b"]
    for name in ("online_reference", "cached_reference", "fused_head_cached_reference"):
        r = step[name]
        memory = (
            f"{r['peak_allocated_gib']:.1f} GiB peak vs {r['predicted_peak_gib']:.1f} predicted"
            if r["peak_allocated_gib"] is not None
            else f"{r['predicted_peak_gib']:.2f} GiB predicted"
        )
        lines.append(f"  1B DPO step, {name}: {r['tokens_per_s']:,.0f} tok/s, MFU {r['mfu']:.1%}, {memory}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
