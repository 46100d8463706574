"""Preference pairs from scored samples: correct completions are chosen, incorrect ones rejected.

    python -m hdpo_ds.tools.sampled_pairs --samples samples.jsonl --train train.jsonl --eval eval.jsonl \
        [--pairs-per-prompt 2] [--eval-fraction 0.05] [--seed 0]

`samples.jsonl` is what `launch/evaluate.py --samples` writes (one line per completion: id, prompt,
completion, correct). For each prompt, distinct correct and distinct incorrect completions are shuffled
(seeded) and zipped into at most `--pairs-per-prompt` pairs, no completion used twice. Prompts whose
samples are all correct or all incorrect give no pair; they are counted and reported, as are duplicate
completions. A seeded fraction of the prompts (not of the pairs) goes to the eval file, so no prompt is in
both. Outputs are preference records (hdpo_ds/data/records.py) written atomically.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict

from hdpo_ds.common.atomic import write_jsonl
from hdpo_ds.data.records import DataError, read_rows, row_error

__all__ = ["build_pairs", "main"]


def build_pairs(
    samples_spec: str, *, pairs_per_prompt: int, eval_fraction: float, seed: int
) -> tuple[list, list, dict]:
    """(train records, eval records, counts). Raises DataError naming the file, line and field of a bad
    row."""
    by_prompt: dict[str, dict] = {}
    for source, rows in read_rows(samples_spec):
        for i, row in enumerate(rows):
            err = row_error(row, source=source, index=i)
            if err is not None:
                raise err
            for name, kind in (("id", str), ("completion", str), ("correct", bool)):
                if not isinstance(row.get(name), kind):
                    raise DataError(f"missing or not a {kind.__name__}", source=source, index=i, field=name)
            if "prompt" not in row:
                raise DataError("missing", source=source, index=i, field="prompt")
            entry = by_prompt.setdefault(row["id"], {"prompt": row["prompt"], "good": [], "bad": []})
            entry["good" if row["correct"] else "bad"].append(row["completion"])
    rng = random.Random(seed)
    counts: dict[str, int] = defaultdict(int)
    ids = sorted(by_prompt)
    eval_ids = set(rng.sample(ids, round(len(ids) * eval_fraction))) if eval_fraction > 0 else set()
    train, evaluation = [], []
    for prompt_id in ids:
        entry = by_prompt[prompt_id]
        good, bad = sorted(set(entry["good"])), sorted(set(entry["bad"]))
        counts["duplicate_completions"] += len(entry["good"]) + len(entry["bad"]) - len(good) - len(bad)
        if not good or not bad:
            counts["prompts_all_correct" if good else "prompts_all_incorrect"] += 1
            continue
        rng.shuffle(good)
        rng.shuffle(bad)
        target = evaluation if prompt_id in eval_ids else train
        for j, (chosen, rejected) in enumerate(list(zip(good, bad, strict=False))[:pairs_per_prompt]):
            target.append(
                {"id": f"{prompt_id}-{j}", "prompt": entry["prompt"], "chosen": chosen, "rejected": rejected}
            )
        counts["prompts_with_pairs"] += 1
    counts["prompts"] = len(ids)
    counts["train_pairs"], counts["eval_pairs"] = len(train), len(evaluation)
    return train, evaluation, dict(counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", required=True)
    parser.add_argument("--train", required=True, help="train pairs (JSONL)")
    parser.add_argument("--eval", default="", help="eval pairs (JSONL); needs --eval-fraction > 0")
    parser.add_argument("--pairs-per-prompt", type=int, default=2)
    parser.add_argument("--eval-fraction", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.eval_fraction > 0 and not args.eval:
        parser.error("--eval-fraction needs --eval")
    try:
        train, evaluation, counts = build_pairs(
            args.samples,
            pairs_per_prompt=args.pairs_per_prompt,
            eval_fraction=args.eval_fraction,
            seed=args.seed,
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not train:
        print(f"error: no pair could be built from {args.samples} ({counts})", file=sys.stderr)
        return 2
    write_jsonl(args.train, train)
    if args.eval:
        write_jsonl(args.eval, evaluation)
    print(json.dumps(counts, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
