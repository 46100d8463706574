"""A verifiable multi-step arithmetic task with many valid solution paths, generated from a seed.

    python -m hdpo_ds.examples.toy.arith --out outputs/toy/seed0/task --seed 0

A problem is a sum of 3 to 5 numbers (1..25); the prompt is ``Q:7+15+3+8=`` plus a newline. A solution
adds two numbers of the current list at a time, in any order, writing each step, then the answer:
``15+3=18 7+8=15 18+15=33 A:33``. For four numbers there are 18 different step orders, all correct, so
diversity among correct samples is meaningful. The checker (hdpo_ds.recipes.evaluate.check_arith) needs the
completion to end with ``A:<integer>`` and compares that integer only; the steps are not checked. The SFT data
shows uniformly random step orders.

Written to --out: ``tokenizer`` and model ``config.json`` (a character-level tokenizer built with
`tokenizers`, a tiny Llama), ``sft_train.jsonl`` / ``sft_eval.jsonl`` (prompt, completion),
``pair_prompts.jsonl`` (prompts to sample preference pairs from), ``val_prompts.jsonl`` (prompts with
their answer for choosing the training setting) and ``eval_prompts.jsonl`` (held-out prompts with their
answer, for the reported numbers). The five sets share no problem. The same seed gives byte-identical files;
the validation set is drawn last, so the other four are those of a task written before it existed.
"""

from __future__ import annotations

import argparse
import os
import random

from hdpo_ds.common.atomic import write_jsonl

ALPHABET = list("0123456789+=: AQ\n")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
MIN_TERMS, MAX_TERMS, MAX_NUMBER = 3, 5, 25


def problem(rng: random.Random) -> tuple[int, ...]:
    return tuple(rng.randint(1, MAX_NUMBER) for _ in range(rng.randint(MIN_TERMS, MAX_TERMS)))


def prompt_text(numbers: tuple[int, ...]) -> str:
    return "Q:" + "+".join(map(str, numbers)) + "=\n"


def solution_text(numbers: tuple[int, ...], rng: random.Random) -> str:
    """One solution path: repeatedly add two numbers of the list (a random pair, in random order)."""
    pool = list(numbers)
    steps = []
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        a, b = pool[i], pool[j]
        pool = [x for k, x in enumerate(pool) if k not in (i, j)] + [a + b]
        steps.append(f"{a}+{b}={a + b}")
    return " ".join(steps) + f" A:{pool[0]}"


def make_sets(seed: int, sizes: dict[str, int]) -> dict[str, list[tuple[int, ...]]]:
    """Disjoint problem sets of the given sizes (no problem occurs in two sets)."""
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    sets: dict[str, list[tuple[int, ...]]] = {}
    for name, size in sizes.items():
        out: list[tuple[int, ...]] = []
        while len(out) < size:
            p = problem(rng)
            if p not in seen:
                seen.add(p)
                out.append(p)
        sets[name] = out
    return sets


def sft_records(problems: list[tuple[int, ...]], seed: int, prefix: str) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"id": f"{prefix}-{i:06d}", "prompt": prompt_text(p), "completion": solution_text(p, rng)}
        for i, p in enumerate(problems)
    ]


def prompt_records(problems: list[tuple[int, ...]], prefix: str) -> list[dict]:
    return [
        {"id": f"{prefix}-{i:05d}", "prompt": prompt_text(p), "answer": str(sum(p))}
        for i, p in enumerate(problems)
    ]


def build_tokenizer():
    """A character-level tokenizer (every character of ALPHABET is one token; BOS in front)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ALPHABET)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def model_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def write_task(
    out: str,
    seed: int,
    *,
    sft_train: int,
    sft_eval: int,
    pair_prompts: int,
    eval_prompts: int,
    val_prompts: int,
) -> None:
    sets = make_sets(
        seed,
        {
            "eval": eval_prompts,
            "pairs": pair_prompts,
            "sft_eval": sft_eval,
            "sft": sft_train,
            "val": val_prompts,
        },
    )
    os.makedirs(out, exist_ok=True)
    write_jsonl(os.path.join(out, "sft_train.jsonl"), sft_records(sets["sft"], seed + 1, "sft"))
    write_jsonl(os.path.join(out, "sft_eval.jsonl"), sft_records(sets["sft_eval"], seed + 2, "sft-eval"))
    write_jsonl(os.path.join(out, "pair_prompts.jsonl"), prompt_records(sets["pairs"], "pairs"))
    write_jsonl(os.path.join(out, "eval_prompts.jsonl"), prompt_records(sets["eval"], "eval"))
    write_jsonl(os.path.join(out, "val_prompts.jsonl"), prompt_records(sets["val"], "val"))
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out)
    model_config(tokenizer).save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-train", type=int, default=40000)
    parser.add_argument("--sft-eval", type=int, default=500)
    parser.add_argument("--pair-prompts", type=int, default=2000)
    parser.add_argument("--eval-prompts", type=int, default=200)
    parser.add_argument("--val-prompts", type=int, default=200)
    args = parser.parse_args(argv)
    write_task(
        args.out,
        args.seed,
        sft_train=args.sft_train,
        sft_eval=args.sft_eval,
        pair_prompts=args.pair_prompts,
        eval_prompts=args.eval_prompts,
        val_prompts=args.val_prompts,
    )
    print(f"wrote the arithmetic task (seed {args.seed}) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
