"""Supervised fine-tuning data: prompt/completion records validated, tokenized and truncated (cached).

Records: `prompt` (a string, or role/content messages rendered with the chat template) and `completion`
(a string); an optional `id`. Token ids follow the preference data's rules (tokenize.py): a text prompt
is the tokenizer's special prefix + its tokens and the completion is
tok(prompt + completion)[len(tok(prompt)):] + EOS; a conversation gets the completion as the assistant's
message, cut after its EOS. Over-long records follow `truncation` as preference pairs do: `keep_end` /
`keep_start` cut a prompt longer than `max_prompt_length` (keeping its end and BOS, or its start), then
the end of a completion that does not fit `max_length`; `drop` skips the record. Counted:
`truncated_prompt`, `truncated_completion`, `lost_eos`, and skipped records by reason
(`dropped_overlength`; with on_bad_record=skip the malformed ones). The tokenized rows are cached as Arrow
under `cache_dir` (the main process writes them, the others read them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np

from hdpo_ds.data.records import DataError, RawTable, row_error
from hdpo_ds.data.tokenize import (
    cached_table,
    encode_prompt,
    resolve_chat_template,
    special_prefix,
    tokenizer_fingerprint,
    truncate_prompt,
)

logger = logging.getLogger(__name__)

__all__ = ["SFT_TOKENIZE_VERSION", "SFTData", "tokenize_sft"]

# Bump when the SFT tokenization rules change: it is part of the cache fingerprint.
SFT_TOKENIZE_VERSION = "hdpo_ds.sft_tokenize/1"
_TRUNCATED_PROMPT, _TRUNCATED_COMPLETION, _LOST_EOS = 1, 2, 4
_FLAG_NAMES = {
    _TRUNCATED_PROMPT: "truncated_prompt",
    _TRUNCATED_COMPLETION: "truncated_completion",
    _LOST_EOS: "lost_eos",
}


class SFTData:
    """Tokenized SFT examples: `prompts[i]`, `completions[i]` (lists of ids), `ids[i]`; `skipped` counts
    what was left out, by reason; `stats` what was truncated; `from_cache` / `cache_path`: the Arrow cache."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.prompts: list[list[int]] = []
        self.completions: list[list[int]] = []
        self.skipped: dict[str, int] = {}
        self.stats: dict[str, int] = dict.fromkeys(_FLAG_NAMES.values(), 0)
        self.from_cache = False
        self.cache_path: str | None = None

    @property
    def lengths(self) -> np.ndarray:
        return np.array(
            [len(p) + len(c) for p, c in zip(self.prompts, self.completions, strict=True)], dtype=np.int64
        )

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _completion_ids(tokenizer, prompt, completion: str, template, where: dict) -> list[int]:
    eos = tokenizer.eos_token_id
    if isinstance(prompt, str):
        plain = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
        if full[: len(plain)] != plain:
            raise DataError(
                "tokenizer merges across the prompt/completion boundary; end the prompt where a token ends",
                field="completion",
                kind="boundary_merge",
                **where,
            )
        ids = list(full[len(plain) :])
        return ids if ids and ids[-1] == eos else [*ids, eos]
    prompt_text = tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True, chat_template=template
    )
    full_text = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": completion}], tokenize=False, chat_template=template
    )
    if not full_text.startswith(prompt_text):
        raise DataError(
            "the chat template renders the prompt differently from the start of the conversation",
            field="completion",
            kind="template_mismatch",
            **where,
        )
    ids = list(tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"])
    if eos in ids:  # what a template writes after EOS is never generated
        return ids[: len(ids) - ids[::-1].index(eos)]
    return [*ids, eos]


def tokenize_sft(
    raw: RawTable,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    truncation: str = "keep_end",
    chat_template: str | None = None,
    cache_dir: str | None = None,
    on_bad_record: str = "error",
    is_main_process: bool = True,
) -> SFTData:
    """Validate, tokenize and truncate SFT rows (the keyword arguments are those of
    recipes/splits.py `tokenize_options`); the result is cached at `cache_dir/sft-tokenized-<fingerprint>`
    (the rows' fingerprint, the tokenizer and these options), so a second run, or another rank, reads it."""
    template = resolve_chat_template(tokenizer, chat_template)
    key = [SFT_TOKENIZE_VERSION, raw.fingerprint, tokenizer_fingerprint(tokenizer, template)]
    key += [max_length, max_prompt_length, truncation, on_bad_record]
    fingerprint = hashlib.sha256(json.dumps(key).encode()).hexdigest()
    options = {"max_length": max_length, "max_prompt_length": max_prompt_length, "truncation": truncation}
    options["on_bad_record"] = on_bad_record

    def build(cache_file: str | None):
        import pyarrow as pa

        table = _tokenize_rows(raw, tokenizer, template, **options)
        if cache_file is not None:
            with pa.OSFile(cache_file, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        return table

    table, from_cache, path = cached_table(
        build, cache_dir, f"sft-tokenized-{fingerprint[:40]}", fingerprint, is_main_process=is_main_process
    )
    data = SFTData()
    data.from_cache, data.cache_path = from_cache, path
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    for i, drop in enumerate(columns["drop"]):
        if drop:
            data.skip(drop)
            continue
        data.ids.append(columns["id"][i])
        data.prompts.append(columns["prompt_ids"][i])
        data.completions.append(columns["completion_ids"][i])
        for bit, name in _FLAG_NAMES.items():
            data.stats[name] += bool(columns["flags"][i] & bit)
    return data


def _tokenize_rows(
    raw: RawTable,
    tokenizer,
    template,
    *,
    max_length: int,
    max_prompt_length: int,
    truncation: str,
    on_bad_record: str,
):
    """One Arrow row per raw row: id, prompt_ids, completion_ids, flags and a drop reason ('' = kept)."""
    import pyarrow as pa

    out: dict[str, list] = {"id": [], "prompt_ids": [], "completion_ids": [], "flags": [], "drop": []}
    prefix = special_prefix(tokenizer)

    def add(record_id: str, prompt_ids: list[int], completion_ids: list[int], flags: int, drop: str) -> None:
        for name, value in zip(out, (record_id, prompt_ids, completion_ids, flags, drop), strict=True):
            out[name].append(value)

    for source, i, row in raw.rows:
        where = {"source": source, "index": i}
        record_id = f"{os.path.basename(source)}:{i}"
        try:
            err = row_error(row, **where)
            if err is not None:
                raise err
            record_id = str(row.get("id", record_id))
            prompt, completion = row.get("prompt"), row.get("completion")
            if not (isinstance(prompt, str) and prompt) and not (isinstance(prompt, list) and prompt):
                raise DataError(
                    "missing or empty (a string or a list of messages)",
                    field="prompt",
                    kind="missing_field",
                    **where,
                )
            if not isinstance(completion, str) or not completion:
                raise DataError(
                    "missing or empty (a string)", field="completion", kind="missing_field", **where
                )
            prompt_ids = encode_prompt(tokenizer, prompt, template)
            completion_ids = _completion_ids(tokenizer, prompt, completion, template, where)
        except DataError as err:
            if on_bad_record == "error":
                raise
            logger.warning("skipped: %s", err)
            add(record_id, [], [], 0, err.kind)
            continue
        flags = 0
        if len(prompt_ids) > max_prompt_length or len(prompt_ids) + len(completion_ids) > max_length:
            if truncation == "drop":
                add(record_id, [], [], 0, "dropped_overlength")
                continue
            if len(prompt_ids) > max_prompt_length:
                prompt_ids = truncate_prompt(prompt_ids, max_prompt_length, truncation, prefix)
                flags |= _TRUNCATED_PROMPT
            room = max_length - len(prompt_ids)  # >= 1: max_prompt_length < max_length
            if len(completion_ids) > room:
                flags |= _TRUNCATED_COMPLETION | (
                    _LOST_EOS if completion_ids[-1] == tokenizer.eos_token_id else 0
                )
                completion_ids = completion_ids[:room]
        add(record_id, prompt_ids, completion_ids, flags, "")
    ids = pa.list_(pa.int32())
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("prompt_ids", ids),
            ("completion_ids", ids),
            ("flags", pa.int32()),
            ("drop", pa.string()),
        ]
    )
    return pa.table(out, schema=schema)
