"""The fused head (objectives/fused_head.py) against the logits path: memory and time.

`head` mode: the head + statistics stage alone, forward and backward, each measurement in its own
process. The logits path is what a model without the fused head runs: `z = h @ W^T` (the lm_head, in the
inputs' dtype), `token_stats(z)` (chunked), the backward through both. The fused path is
`fused_token_stats(h, W)`. A child allocates h (T, H) and W (V, H) (both requiring grad) and the labels,
resets the kernel's peak-RSS counter (/proc/self/clear_refs), and reports the peak above that point
during the forward and during the backward, less dh and dW (both paths must produce them).
`MALLOC_MMAP_THRESHOLD_=65536` makes glibc return freed blocks, so RSS follows the live tensors.

`step` mode: the whole training step of a Llama with a 128,256 vocabulary (hidden 256, 4 layers,
untied) on 2 ZeRO-3 ranks through the real trainer (bench/plan_rss.py's run), train.fused_head off and
on: peak RSS growth per rank and tokens/s (MLflow's `tokens_per_second`, median after the first step).

    .venv/bin/python bench/fused_head.py head      # the head-stage tables in docs/benchmarks.md
    .venv/bin/python bench/fused_head.py step      # the training-step table
    .venv/bin/python bench/fused_head.py head --vocabs 32000 --tokens 1024 --hidden 256 --dtypes float32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    return _rss_bytes("VmRSS")


def child(args) -> None:
    import torch

    from hdpo_ds.objectives.fused_head import fused_token_stats
    from hdpo_ds.objectives.logprobs import token_stats

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(args.tokens, args.hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g)

    def forward(hh, ww, ll):
        if args.variant == "fused":
            return fused_token_stats(hh, ww, ll, chunk_size=args.chunk_size).logps
        return token_stats(hh @ ww.t(), ll, chunk_size=args.chunk_size).logps

    small = slice(0, 8)  # warms the thread pool and the kernels on a few tokens
    forward(h[small].detach().requires_grad_(), w, labels[small]).sum().backward()
    h.grad = w.grad = None
    times, fwd_extra, bwd_extra = [], [], []
    for _ in range(args.reps):
        h.grad = w.grad = None
        start = _reset_peak()
        t0 = time.perf_counter()
        logps = forward(h, w, labels)
        t1 = time.perf_counter()
        fwd_extra.append(_rss_bytes("VmHWM") - start)
        _reset_peak()
        t2 = time.perf_counter()
        logps.sum().backward()
        t3 = time.perf_counter()
        grads = h.grad.numel() * h.grad.element_size() + w.grad.numel() * w.grad.element_size()
        bwd_extra.append(_rss_bytes("VmHWM") - start - grads)
        del logps
        times.append((t1 - t0) + (t3 - t2))
    print(
        json.dumps(
            {
                "variant": args.variant,
                "dtype": args.dtype,
                "vocab": args.vocab,
                "tokens": args.tokens,
                "forward_extra": max(fwd_extra),
                "backward_extra": max(bwd_extra),
                "seconds": statistics.median(times),
            }
        )
    )


def head(args) -> None:
    gib = 2**30
    rows = []
    for dtype in args.dtypes.split(","):
        for vocab in (int(v) for v in args.vocabs.split(",")):
            for tokens in (int(t) for t in args.tokens.split(",")):
                for variant in ("logits", "fused"):
                    cmd = [sys.executable, __file__, "child", "--variant", variant, "--dtype", dtype]
                    cmd += ["--vocab", str(vocab), "--tokens", str(tokens), "--hidden", str(args.hidden)]
                    cmd += ["--chunk-size", str(args.chunk_size), "--reps", str(args.reps)]
                    cmd += ["--threads", str(args.threads)]
                    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                    rows.append(json.loads(out.strip().splitlines()[-1]))
                    print(rows[-1], file=sys.stderr, flush=True)
    print(
        f"\nhead + statistics stage: H={args.hidden}, chunk={args.chunk_size}, threads={args.threads}, "
        f"median of {args.reps}\n"
    )
    print(
        "| dtype | V | T | logits-path extra peak GiB | fused extra peak GiB | fused / logits "
        "| fused extra / (chunk×V fp32) | logits s | fused s | time fused / logits |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for logits_row, fused_row in zip(rows[::2], rows[1::2], strict=True):
        lx = max(logits_row["forward_extra"], logits_row["backward_extra"])
        fx = max(fused_row["forward_extra"], fused_row["backward_extra"])
        buffer = args.chunk_size * fused_row["vocab"] * 4
        print(
            f"| {fused_row['dtype']} | {fused_row['vocab']:,} | {fused_row['tokens']:,} | {lx / gib:.2f} "
            f"| {fx / gib:.2f} | {fx / lx:.3f} | {fx / buffer:.2f} | {logits_row['seconds']:.1f} "
            f"| {fused_row['seconds']:.1f} | {fused_row['seconds'] / logits_row['seconds']:.2f}x |"
        )


def step(args) -> None:
    """The training step of a 128k-vocabulary model on 2 ranks, fused head off and on."""
    import plan_rss
    from mlflow.tracking import MlflowClient

    results = {}
    with tempfile.TemporaryDirectory(prefix="fused_step_") as workdir:
        model = plan_rss.model_dir(workdir, args.step_hidden, args.step_layers, args.step_vocab)
        with open(os.path.join(model, "config.json")) as f:
            config = json.load(f)
        config["tie_word_embeddings"] = False  # the head's own (V, H) weight, as Llama-3's
        with open(os.path.join(model, "config.json"), "w") as f:
            json.dump(config, f)
        for fused in (False, True):
            name = f"fused_{str(fused).lower()}"
            ranks = plan_rss.measure(
                model, args.steps, workdir, extra=(f"train.fused_head={str(fused).lower()}",), name=name
            )
            out = os.path.join(workdir, name)
            with open(os.path.join(out, "run_info.json")) as f:
                info = json.load(f)
            client = MlflowClient(f"sqlite:///{os.path.join(out, 'mlflow.db')}")
            history = {
                m.step: m.value for m in client.get_metric_history(info["run_id"], "tokens_per_second")
            }
            params = client.get_run(info["run_id"]).data.params
            results[fused] = {
                "growth_gib": [(r["peak"] - r["baseline"]) / 2**30 for r in ranks],
                "tokens_per_second": statistics.median(history[s] for s in sorted(history) if s >= 1),
                "run.fused_head": params["run.fused_head"],
            }
            print(name, results[fused], file=sys.stderr, flush=True)
    off, on = results[False], results[True]
    print(
        f"\ntraining step: Llama hidden {args.step_hidden}, {args.step_layers} layers, vocab "
        f"{args.step_vocab:,} (untied), 2 ranks ZeRO-3, {args.steps} steps, micro-batch budget "
        f"{plan_rss.BUDGET} tokens\n"
    )
    print("| train.fused_head | peak RSS growth rank 0 / 1 GiB | tokens/s | vs off |")
    print("|---|---|---|---|")
    for label, r in (("false", off), ("true", on)):
        growth = " / ".join(f"{g:.2f}" for g in r["growth_gib"])
        ratio = r["tokens_per_second"] / off["tokens_per_second"]
        print(f"| {label} | {growth} | {r['tokens_per_second']:.0f} | {ratio:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["head", "step", "child"])
    parser.add_argument("--vocabs", default="128256,256000")
    parser.add_argument("--tokens", default="4096,8192")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--step-hidden", type=int, default=256)
    parser.add_argument("--step-layers", type=int, default=4)
    parser.add_argument("--step-vocab", type=int, default=128256)
    parser.add_argument("--variant", default="logits", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=128256, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode == "child":
        args.tokens = int(args.tokens)
        child(args)
    else:
        {"head": head, "step": step}[args.mode](args)


if __name__ == "__main__":
    main()
