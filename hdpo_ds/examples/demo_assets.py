"""Generate the demo assets: a toy preference dataset, a tokenizer trained on it, a tiny Llama config.

    python -m hdpo_ds.examples.demo_assets [--out configs/models/tiny-demo] [--data configs/data/demo]
        [--seed 0]

Nothing is downloaded. The task is verifiable and small: arithmetic, sorting, reversing and counting
prompts whose chosen answer is correct and whose rejected answer is wrong in one place (and, in 80% of
pairs, hedged: "Maybe ...", "... I am not sure."). List lengths
follow a lognormal distribution, so sequence lengths are long-tailed like real chat data. About 30% of
the records are conversations (lists of role/content messages, rendered with the chat template); the rest are
plain strings. The same seed gives the same files (config.json also records the transformers version).
"""

from __future__ import annotations

import argparse
import json
import os
import random

WORDS = (
    "apple banana cherry date elder fig grape kiwi lemon mango nectar olive peach pear plum quince "
    "raisin straw tomato ugli vanilla walnut yam zucchini acorn basil clove dill fennel ginger hazel "
    "iris jasmine kale lime mint nutmeg onion parsley radish sage thyme"
).split()
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
# One block per message, each closed by EOS; the assistant header opens a generation.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SYSTEM_PROMPTS = ("You are a careful assistant.", "Answer exactly.", "Be brief and correct.")


def _list_length(rng: random.Random) -> int:
    return max(2, min(60, round(rng.lognormvariate(1.6, 0.7))))


def _task(rng: random.Random) -> tuple[str, str, str]:
    """(prompt, correct answer, wrong answer)."""
    kind = rng.choice(("add", "sort", "reverse", "count"))
    if kind == "add":
        n = _list_length(rng)
        numbers = [rng.randint(1, 99) for _ in range(n)]
        total = sum(numbers)
        expression = " + ".join(map(str, numbers))
        wrong = total + rng.choice((-10, -1, 1, 10))
        return f"What is {expression}?", f"{expression} = {total}.", f"{expression} = {wrong}."
    words = rng.sample(WORDS, min(_list_length(rng), len(WORDS)))
    if kind == "count":
        n = len(words)
        return (
            f"How many words are in: {' '.join(words)}?",
            f"There are {n} words.",
            f"There are {n + rng.choice((-1, 1))} words.",
        )
    answer = sorted(words) if kind == "sort" else list(reversed(words))
    wrong = list(answer)
    i = rng.randrange(len(wrong) - 1)
    wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    verb = "Sort these words alphabetically" if kind == "sort" else "Reverse the order of these words"
    return f"{verb}: {', '.join(words)}.", ", ".join(answer) + ".", ", ".join(wrong) + "."


HEDGES = ("Maybe {}", "I think {}", "{} I am not sure.", "{} Probably.")


def make_records(count: int, seed: int, id_prefix: str) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(count):
        prompt, good, bad = _task(rng)
        # Most rejected answers are also hedged: a style signal a tiny model picks up within a few dozen
        # steps, beside the correctness signal it cannot learn that fast.
        if rng.random() < 0.8:
            bad = rng.choice(HEDGES).format(bad)
        record_id = f"{id_prefix}-{i:05d}"
        if rng.random() < 0.3:
            messages = [{"role": "user", "content": prompt}]
            if rng.random() < 0.5:
                messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
            records.append(
                {
                    "id": record_id,
                    "prompt": messages,
                    "chosen": [{"role": "assistant", "content": good}],
                    "rejected": [{"role": "assistant", "content": bad}],
                }
            )
        else:
            records.append({"id": record_id, "prompt": prompt + "\n", "chosen": good, "rejected": bad})
    return records


def _corpus(records: list[dict]):
    for r in records:
        for field in ("prompt", "chosen", "rejected"):
            value = r[field]
            yield value if isinstance(value, str) else " ".join(m["content"] for m in value)


def train_tokenizer(records: list[dict], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(records), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def model_config(tokenizer) -> dict:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return config


def _write_jsonl(path: str, records: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="configs/models/tiny-demo", help="tokenizer and model config")
    parser.add_argument("--data", default="configs/data/demo", help="train.jsonl and eval.jsonl")
    parser.add_argument("--train-pairs", type=int, default=2000)
    parser.add_argument("--eval-pairs", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train = make_records(args.train_pairs, args.seed, "train")
    evaluation = make_records(args.eval_pairs, args.seed + 1, "eval")
    os.makedirs(args.data, exist_ok=True)
    _write_jsonl(os.path.join(args.data, "train.jsonl"), train)
    _write_jsonl(os.path.join(args.data, "eval.jsonl"), evaluation)
    tokenizer = train_tokenizer(train, args.vocab_size)
    os.makedirs(args.out, exist_ok=True)
    tokenizer.save_pretrained(args.out)
    model_config(tokenizer).save_pretrained(args.out)
    print(f"wrote {len(train)} + {len(evaluation)} pairs to {args.data}, tokenizer and config to {args.out}")


if __name__ == "__main__":
    main()
