"""What WPO's per-token log sum_v p_v^2 adds to the `token_stats` forward (`collision=True`).

Both variants run in the same process on the same logits, alternated, one thread; the figure is the
ratio of the best-of-N forward times, collision on over off. The backward does not change.

    python bench/token_stats_collision.py                     # the numbers in docs/benchmarks.md
    python bench/token_stats_collision.py --tokens 512 --reps 3
"""

from __future__ import annotations

import argparse
import time

import torch

from hdpo_ds.objectives.logprobs import token_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    logits = torch.randn(args.tokens, args.vocab)
    labels = torch.randint(0, args.vocab, (args.tokens,))
    best = {False: float("inf"), True: float("inf")}
    for _ in range(args.reps):
        for collision in (False, True):
            started = time.perf_counter()
            token_stats(logits, labels, chunk_size=args.chunk_size, collision=collision)
            best[collision] = min(best[collision], time.perf_counter() - started)
    print(
        f"T={args.tokens} V={args.vocab} chunk={args.chunk_size}: off {best[False]:.3f} s, "
        f"on {best[True]:.3f} s, ratio {best[True] / best[False]:.3f}"
    )


if __name__ == "__main__":
    main()
