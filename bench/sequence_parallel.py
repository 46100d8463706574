"""Peak memory and throughput against pair length, with and without Ulysses sequence parallelism.

For each pair length L (tokens of prompt + chosen plus prompt + rejected), two `deepspeed
--num_accelerators 2 launch/train.py` runs (ZeRO-3, CPU, the reference online) on generated pairs of
about L tokens, with the demo model widened to --hidden x --layers (random init): data parallel
(`train.sequence_parallel=1`: each rank packs whole pairs, micro-batches of L tokens) and sequence
parallel (`train.sequence_parallel=2`: both ranks share every row, L/2 tokens each). Both runs train
the same 2 pairs per step. Tokens/s is the runs' MLflow metric (median after step 1); peak memory is the
largest peak RSS over the ranks (`memory/peak_host_rss_mib_max_over_ranks`).

    .venv/bin/python bench/sequence_parallel.py [--lengths 2048,4096,8192,16384] [--steps 4] \
        [--hidden 256] [--layers 4] [--kv-heads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.ref_modes import model_dir, run  # noqa: E402  (the same launcher and metric reading)

WORDS = "apple river stone cloud maple quiet seven orange window silver garden thunder pencil".split()


def write_pairs(path: str, tokenizer, pair_tokens: int, count: int, seed: int) -> int:
    """`count` records whose prompt, chosen and rejected have about pair_tokens / 4 tokens each (a pair
    holds the prompt twice); returns the longest sequence (prompt + response) in tokens."""
    rng = random.Random(seed)

    sample = [rng.choice(WORDS) for _ in range(1000)]
    per_word = len(tokenizer(" ".join(sample))["input_ids"]) / len(sample)

    def text(tokens: int) -> str:
        words = [rng.choice(WORDS) for _ in range(int(tokens / per_word) + 8)]
        while len(tokenizer(" ".join(words))["input_ids"]) > tokens:
            words.pop()
        return " ".join(words)

    longest = 0
    with open(path, "w") as f:
        for i in range(count):
            quarter = pair_tokens // 4
            record = {
                "id": f"p{i}",
                "prompt": text(quarter) + "\n",  # a newline: the prompt ends where a token ends
                "chosen": text(quarter),
                "rejected": text(quarter),
            }
            longest = max(longest, len(tokenizer(record["prompt"] + record["chosen"])["input_ids"]))
            f.write(json.dumps(record) + "\n")
    return longest


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="2048,4096,8192,16384", help="pair lengths in tokens")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (4 query heads; 4: no GQA)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, "configs/models/tiny-demo"))
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        model = model_dir(workdir, args.hidden, args.layers)
        with open(os.path.join(model, "config.json")) as f:
            config = json.load(f)
        config["max_position_embeddings"] = 2 * max(int(x) for x in args.lengths.split(","))
        config["num_key_value_heads"] = args.kv_heads
        with open(os.path.join(model, "config.json"), "w") as f:
            json.dump(config, f)
        for length in (int(x) for x in args.lengths.split(",")):
            data = os.path.join(workdir, f"pairs{length}.jsonl")
            # room for the chat template's tokens around each sequence
            max_length = write_pairs(data, tokenizer, length, 4 * args.steps, seed=length) + 64
            common = [
                f"model.name_or_path={model}",
                f"data.train_files=[{data}]",
                f"data.max_length={max_length}",
                f"data.max_prompt_length={max_length - 16}",
                "train.pairs_per_step=2",
                "reference.mode=online",
                "train.save_every=0",
                "train.export_hf=false",
            ]
            for sp in (1, 2):
                budget = 2 * max_length // sp  # a group of sp ranks holds one pair per micro-batch
                overrides = [
                    *common,
                    f"train.sequence_parallel={sp}",
                    f"data.max_tokens_per_micro_batch={budget}",
                ]
                try:
                    result = run(f"L{length}-sp{sp}", overrides, args, workdir)
                except subprocess.CalledProcessError as e:
                    sys.exit(
                        f"the run for {length} tokens, sequence_parallel {sp} failed:\n{e.stderr[-4000:]}"
                    )
                rows.append((length, sp, budget, result))
    print(
        f"\n2 ranks, ZeRO-3, CPU, Llama hidden {args.hidden} x {args.layers} layers, 4 query / "
        f"{args.kv_heads} key-value heads, reference online, "
        f"2 pairs per step, {args.steps} steps, median tokens/s after step 1\n"
    )
    print(
        "| pair tokens | sequence_parallel | data.max_tokens_per_micro_batch (per rank) "
        "| peak RSS per rank (max, MiB) | vs sp 1 | real tokens/s | vs sp 1 |"
    )
    print("|---|---|---|---|---|---|---|")
    base = {length: r for length, sp, _, r in rows if sp == 1}
    for length, sp, budget, r in rows:
        b = base[length]
        print(
            f"| {length:,} | {sp} | {budget:,} | {r['peak_rss_mib']:.0f} | "
            f"{r['peak_rss_mib'] / b['peak_rss_mib']:.2f}x | {r['tokens_per_second']:.0f} | "
            f"{r['tokens_per_second'] / b['tokens_per_second']:.2f}x |"
        )


if __name__ == "__main__":
    main()
