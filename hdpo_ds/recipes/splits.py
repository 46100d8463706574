"""The data splits of a run (train, eval): records loaded and validated, then tokenized (cached).

Shared by training and the offline reference pass, so both see exactly the same pairs, ids and
token ids; SFT (hdpo_ds/recipes/sft.py) takes its splits, row slices and tokenization options from here too.
Every rank calls `tokenize_split`; rank 0 tokenizes first and the others read its cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from hdpo_ds.config import Config, ConfigError
from hdpo_ds.data import (
    DataError,
    LoadResult,
    TokenizeResult,
    load_records,
    tokenize_pairs,
    tokenizer_fingerprint,
)
from hdpo_ds.runtime import dist

__all__ = [
    "Split",
    "load_split_records",
    "main_process_first",
    "split_sources",
    "tokenize_options",
    "tokenize_split",
]

T = TypeVar("T")


@dataclass
class Split:
    name: str
    records: LoadResult
    data: TokenizeResult
    tokenizer_fingerprint: str


def split_sources(cfg: Config) -> dict[str, tuple[str, list[str], str]]:
    """The configured splits: name -> (config key of its files, the files, its row slice); no eval split
    without data.eval_files. Preference training and SFT read their data through this."""
    specs = {
        "train": ("data.train_files", cfg.data.train_files, cfg.data.rows),
        "eval": ("data.eval_files", cfg.data.eval_files, cfg.data.eval_rows),
    }
    return {name: spec for name, spec in specs.items() if name == "train" or spec[1]}


def load_split_records(cfg: Config) -> dict[str, LoadResult]:
    """Read and validate the records of every configured split (before any engine is built).

    A source that cannot be read is reported under its config key (data.train_files / data.eval_files)."""
    template = cfg.data.chat_template
    if template and "{" not in template and not os.path.isfile(os.path.expanduser(template)):
        # without a "{" it can only be a file name: a typo must not become the template's text
        raise ConfigError(f"data.chat_template: no such file {template} (a Jinja file, or the template text)")
    splits = {}
    for name, (key, files, rows) in split_sources(cfg).items():
        try:
            splits[name] = load_records(
                files, split=cfg.data.split or None, rows=rows or None, on_bad_record=cfg.data.on_bad_record
            )
        except DataError as e:
            raise DataError(str(e), source=key, kind=e.kind) from None
    return splits


def tokenize_options(cfg: Config) -> dict:
    """The keyword arguments of `tokenize_pairs` a run config implies (cache_dir included)."""
    return dict(
        max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
        truncation=cfg.data.truncation,
        chat_template=cfg.data.chat_template or None,
        cache_dir=cfg.data.cache_dir or os.path.join(cfg.output_dir, "cache"),
        on_bad_record=cfg.data.on_bad_record,
    )


def tokenize_split(cfg: Config, name: str, records: LoadResult, tokenizer) -> Split:
    """Tokenize one split; collective. Rank 0 tokenizes and writes the Arrow cache; its outcome (or its
    error) is broadcast, so a failure there stops every rank instead of leaving them at a barrier."""
    template_source = cfg.data.chat_template or None
    kwargs = tokenize_options(cfg)
    data = main_process_first(
        name, lambda main: tokenize_pairs(records, tokenizer, is_main_process=main, barrier=None, **kwargs)
    )
    return Split(name, records, data, tokenizer_fingerprint(tokenizer, template_source))


def main_process_first(name: str, build: Callable[[bool], T]) -> T:
    """Collective: rank 0 runs `build(True)` (which writes the cache), then the other ranks `build(False)`
    (which read it). Rank 0's error is broadcast, so it stops every rank instead of leaving them waiting."""
    data, error = None, None
    if dist.is_main_process():
        try:
            data = build(True)
        except Exception as e:  # re-raised below on this rank, reported on the others
            error = e
    message = dist.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise DataError(f"tokenizing the {name} split failed on rank 0: {message}")
    return data if dist.is_main_process() else build(False)
