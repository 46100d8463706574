"""The data splits of a run (train, eval): records read, validated and tokenized (cached, Arrow).

Shared by training and the offline reference pass, so both see exactly the same pairs, ids and
token ids; SFT (hdpo_ds/recipes/sft.py) takes its splits, row slices and tokenization options from here too.
Every rank calls `prepare_split`; rank 0 does the work (data/prepare.py) and the others open its cache.
The dry run validates a sample in memory instead (`load_split_records`).
"""

from __future__ import annotations

import logging
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
    tokenizer_fingerprint,
)
from hdpo_ds.data.prepare import open_pairs, prepare_pairs, resolve_num_proc
from hdpo_ds.data.records import ReadSummary, file_entries, plan_entries
from hdpo_ds.runtime import dist

logger = logging.getLogger(__name__)

__all__ = [
    "Split",
    "load_split_records",
    "log_sources",
    "main_process_first",
    "prepare_split",
    "source_params",
    "split_sources",
    "tokenize_options",
]

T = TypeVar("T")


@dataclass
class Split:
    name: str
    records: ReadSummary  # what validation found (the records themselves stay in data's Arrow table)
    data: TokenizeResult
    tokenizer_fingerprint: str


def split_sources(cfg: Config) -> dict[str, tuple[str, list, str]]:
    """The configured splits: name -> (config key of its files, the files, its row slice); no eval split
    without data.eval_files. Preference training and SFT read their data through this. A files entry is
    a path or a source mapping (data/mixture.py)."""
    specs = {
        "train": ("data.train_files", cfg.data.train_files, cfg.data.rows),
        "eval": ("data.eval_files", cfg.data.eval_files, cfg.data.eval_rows),
    }
    return {name: spec for name, spec in specs.items() if name == "train" or spec[1]}


def load_split_records(cfg: Config, sample: int | None = None) -> dict[str, LoadResult]:
    """Read and validate the records of every configured split (before any engine is built); with
    ``sample`` (the dry run) every file is read but only that many rows per split are validated
    (``load_records``).

    A source that cannot be read is reported under its config key (data.train_files / data.eval_files)."""
    check_data_options(cfg)
    splits = {}
    for name, (key, files, rows) in split_sources(cfg).items():
        try:
            splits[name] = load_records(
                files,
                split=cfg.data.split or None,
                rows=rows or None,
                on_bad_record=cfg.data.on_bad_record,
                key=key,
                sample=sample,
            )
        except DataError as e:
            raise DataError(str(e), source=key, kind=e.kind) from None
    return splits


def check_chat_template(cfg: Config) -> None:
    template = cfg.data.chat_template
    if template and "{" not in template and not os.path.isfile(os.path.expanduser(template)):
        # without a "{" it can only be a file name: a typo must not become the template's text
        raise ConfigError(f"data.chat_template: no such file {template} (a Jinja file, or the template text)")


def check_data_options(cfg: Config) -> None:
    """The data keys checked on every rank before any engine or process group exists: the chat template
    file, data.num_proc, and that every files-list entry names sources that exist (nothing is read)."""
    check_chat_template(cfg)
    try:
        resolve_num_proc(cfg.data.num_proc)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key, files, rows in split_sources(cfg).values():
        try:
            plan_entries(file_entries(files, key), cfg.data.split or None, rows or None)
        except DataError as e:
            raise DataError(str(e), source=key, kind=e.kind) from None


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


def prepare_split(cfg: Config, name: str, tokenizer) -> Split:
    """Read, validate and tokenize one split; collective (data/prepare.py). Rank 0 does the work (or
    finds it cached) and sends the cache's handle; every rank then opens the cache memory-mapped. Rank 0's
    error is broadcast, so a failure there stops every rank instead of leaving them waiting. A
    ``data.cache_dir`` that is local to each node works too: the first rank of every node that cannot see
    rank 0's cache prepares the same split into its own, and that node's other ranks open that one."""
    key, files, rows = split_sources(cfg)[name]

    def prepare():
        return prepare_pairs(
            files,
            tokenizer,
            split=cfg.data.split or None,
            rows=rows or None,
            key=key,
            num_proc=cfg.data.num_proc,
            **tokenize_options(cfg),
        )

    handle, error = None, None
    if dist.is_main_process():
        try:
            handle = prepare()
        except DataError as e:
            error = DataError(str(e), source=key, kind=e.kind)
        except Exception as e:  # re-raised below on this rank, reported on the others
            error = e
    handle, message = dist.broadcast_object(
        (handle, None if error is None else f"{type(error).__name__}: {error}")
    )
    if error is not None:
        raise error
    if message is not None:
        raise DataError(f"preparing the {name} split failed on rank 0: {message}")
    meta = os.path.join(handle.cache_path, "meta.json")
    if not all(dist.gather_objects(os.path.isfile(meta))):
        if not os.path.isfile(meta) and dist.local_rank() == 0:
            logger.warning(
                "rank %d cannot see rank 0's prepared %s split at %s: data.cache_dir is not shared; "
                "preparing it again on this node",
                dist.rank(),
                name,
                handle.cache_path,
            )
            handle = prepare()
        dist.barrier()
        if not os.path.isfile(os.path.join(handle.cache_path, "meta.json")):
            raise DataError(
                f"rank {dist.rank()} cannot see the prepared {name} split at {handle.cache_path}: "
                "data.cache_dir must be one filesystem for the ranks of a node (a shared one spares "
                "every node the work)",
                source="data.cache_dir",
            )
    summary, data = open_pairs(handle, log=dist.is_main_process())
    return Split(name, summary, data, tokenizer_fingerprint(tokenizer, cfg.data.chat_template or None))


def source_params(split: Split, quotas=None) -> dict[str, object]:
    """The MLflow params of each files-list entry of a split: ``data.source.<i>.path``, ``.weight``,
    ``.rows`` (read), ``.kept`` (pairs after validation and tokenization), ``.skipped.<reason>`` (each
    nonzero reason of either stage) and, for a mixture, ``.draws_per_epoch`` (the sampler's quota)."""
    out: dict[str, object] = {}
    for i, (spec, loaded, tokenized) in enumerate(
        zip(split.records.entries.specs, split.records.source_counts, split.data.source_stats, strict=True)
    ):
        key = f"data.source.{i}."
        out[key + "path"] = spec.path
        out[key + "weight"] = spec.weight
        out[key + "rows"] = loaded["rows"]
        out[key + "kept"] = tokenized["pairs"]
        reasons = {k: v for k, v in loaded.items() if k not in ("rows", "kept")}
        reasons.update({k: v for k, v in tokenized.items() if k not in ("pairs_in", "pairs")})
        out.update({f"{key}skipped.{k}": v for k, v in sorted(reasons.items()) if v})
        if quotas is not None:
            out[key + "draws_per_epoch"] = int(quotas[i])
    return out


def log_sources(split: Split, key: str, quotas=None) -> None:
    """One log line per files-list entry of a split when it has several (or is a mixture): rows read,
    pairs kept, what was skipped and why, and a mixture's weight and draws per epoch."""
    entries = split.records.entries
    if len(entries.specs) < 2 and not entries.mixture:
        return
    params = source_params(split, quotas)
    for i, spec in enumerate(entries.specs):
        p = f"data.source.{i}."
        prefix = p + "skipped."
        skipped = {k.removeprefix(prefix): v for k, v in params.items() if k.startswith(prefix)}
        logger.info(
            "%s[%d] %s: %d row(s) read, %d pair(s) kept%s%s",
            key,
            i,
            spec.path,
            params[p + "rows"],
            params[p + "kept"],
            f", skipped {', '.join(f'{v} {k}' for k, v in skipped.items())}" if skipped else "",
            f"; weight {spec.weight:g}, {params[p + 'draws_per_epoch']} draws per epoch"
            if quotas is not None
            else "",
        )


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
