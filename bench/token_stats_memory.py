"""Peak extra memory and time of `token_stats` against the naive full-vocabulary computation.

Each measurement runs in its own process, so one variant's allocator state cannot flatter another.
A child allocates the logits (T x V) and the labels, resets the kernel's peak-RSS counter
(/proc/self/clear_refs), runs the forward of all four statistics and the backward of the log-probs,
and reports the peak RSS above that starting point for each. Both variants must produce the logits'
gradient (a tensor the size of the logits), so the backward's extra memory is counted beyond it.

    python bench/token_stats_memory.py                       # the numbers in docs/benchmarks.md
    python bench/token_stats_memory.py --vocab 32000 --tokens 1024 --reps 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _naive(logits, labels, top_k):
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    top = p.topk(top_k, dim=-1).values
    mass = top.sum(-1)
    q = top / mass.unsqueeze(-1)
    topk_entropy = -(q * torch.log2(q)).sum(-1)
    logps = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return logps, entropy.detach(), mass.detach(), topk_entropy.detach()


def _naive_kl(policy, reference):
    import torch

    log_pol = torch.log_softmax(policy.float(), dim=-1)
    log_ref = torch.log_softmax(reference.float(), dim=-1)
    return (log_ref.exp() * (log_ref - log_pol)).sum(-1)


def child(args) -> None:
    import torch

    from hdpo_ds.objectives.logprobs import token_kl, token_stats

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(args.tokens, args.vocab, generator=g) * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    logits_bytes = logits.numel() * logits.element_size()

    reference = (torch.randn(args.tokens, args.vocab, generator=g) * 2).to(dtype) if args.kl else None

    def forward():
        if args.kl:  # TDPO's per-token KL against a second (reference) logits tensor
            if args.variant == "naive":
                return (_naive_kl(logits, reference),)
            return (token_kl(logits, reference, labels, chunk_size=args.chunk_size),)
        if args.variant == "naive":
            return _naive(logits, labels, 10)
        return token_stats(logits, labels, top_k=10, chunk_size=args.chunk_size)

    def reset_peak() -> int:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return _rss_bytes("VmRSS")

    times, forward_extra, backward_extra = [], [], []
    for rep in range(args.reps + 1):
        logits.grad = None
        start = reset_peak()
        t0 = time.perf_counter()
        stats = forward()
        t1 = time.perf_counter()
        forward_peak = _rss_bytes("VmHWM") - start
        reset_peak()
        t2 = time.perf_counter()
        stats[0].sum().backward()
        t3 = time.perf_counter()
        backward_peak = _rss_bytes("VmHWM") - start
        del stats
        if rep > 0:  # the first repetition warms up the thread pool
            times.append((t1 - t0) + (t3 - t2))
            forward_extra.append(forward_peak)
            backward_extra.append(backward_peak)
    grad_bytes = logits.grad.numel() * logits.grad.element_size()
    # Peak above the logits, during the forward, and during the backward less the logits' gradient
    # (both variants must produce it).
    fwd, bwd = max(forward_extra), max(backward_extra) - grad_bytes
    print(
        json.dumps(
            {
                "variant": args.variant,
                "dtype": args.dtype,
                "chunk_size": args.chunk_size if args.variant == "chunked" else None,
                "logits_gib": logits_bytes / 2**30,
                "forward_extra_ratio": fwd / logits_bytes,
                "backward_extra_ratio": bwd / logits_bytes,
                "extra_ratio": max(fwd, bwd) / logits_bytes,
                "seconds_median": statistics.median(times),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--chunk-sizes", default="1024,512,256")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kl", action="store_true", help="measure token_kl (TDPO) instead of token_stats")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="naive", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=1024, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    rows = []
    for dtype in args.dtypes.split(","):
        variants = [("naive", 0)] + [("chunked", int(c)) for c in args.chunk_sizes.split(",")]
        for variant, chunk in variants:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--variant",
                variant,
                "--dtype",
                dtype,
                "--chunk-size",
                str(chunk or 1024),
                "--vocab",
                str(args.vocab),
                "--tokens",
                str(args.tokens),
                "--reps",
                str(args.reps),
                "--threads",
                str(args.threads),
                *(["--kl"] if args.kl else []),
            ]
            # A fixed mmap threshold makes glibc return every large block to the OS when it is freed, so
            # RSS follows the live tensors instead of what the allocator kept from earlier chunks.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr, flush=True)

    print(
        f"\n{'token_kl (TDPO; a second logits tensor is the reference)' if args.kl else 'token_stats'}: "
        f"T={args.tokens}, V={args.vocab}, threads={args.threads}, median of {args.reps} after a warm-up\n"
    )
    print(
        "| logits | variant | chunk | forward extra (x logits) "
        "| backward extra beyond the gradient (x logits) | extra peak (x logits) | fwd+bwd s "
        "| time vs naive |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        group = [r for r in rows if r["dtype"] == dtype]
        naive_time = next(r["seconds_median"] for r in group if r["variant"] == "naive")
        for r in group:
            print(
                f"| {dtype} | {r['variant']} | {r['chunk_size'] or '-'} | {r['forward_extra_ratio']:.3f} "
                f"| {r['backward_extra_ratio']:.3f} | {r['extra_ratio']:.3f} | {r['seconds_median']:.2f} "
                f"| {r['seconds_median'] / naive_time:.2f}x |"
            )


if __name__ == "__main__":
    main()
