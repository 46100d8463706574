"""Preference splits at production size: read, validate and tokenize into Arrow on the main process only.

The sources are streamed into an Arrow file of raw rows (JSON text, source name, index within the
source, files-list entry), so no process ever holds a Python object per record. One batched
``datasets.map`` over ``data.num_proc`` workers then parses, validates and normalises each row
(``data/records.py`` ``normalise_record``) and tokenizes it (``data/tokenize.py``, the same rules as
``tokenize_pairs``). The result is cached at ``<cache_dir>/pairs-<fingerprint>/`` (atomically), and every
other rank opens it memory-mapped: the sampler and the packer read its length columns
(``TokenizedPairs.lengths``), and each micro-batch reads its own rows.

Identity. The cache key is the data's fingerprint (``records.data_fingerprint``: the sources' content
hashes, split, row slices and mixture weights; the same value ``load_records`` gives) plus the tokenizer,
chat template, lengths, truncation and ``on_bad_record``. Hashing a large file costs seconds, so the hashes
are memoised by path, size and modification time in ``<cache_dir>/source-hashes.json``; a copied file has a
new modification time, is hashed again, and keeps its identity.

Errors. Every error is found in the one pass and kept in the table's error columns; afterwards, with
``on_bad_record: error``, the first bad row in row order is raised (validation errors before tokenization
errors, as ``load_records`` then ``tokenize_pairs`` would) and no cache is written; with ``skip`` the
counts per reason are exact and three examples of each are logged. Explicit ids that repeat with different
content (``duplicate_id``) are found after the pass, in Arrow.

Rank 0 does the work (recipes/splits.py ``prepare_split``); the other ranks wait and then open what it
wrote. On a ``data.cache_dir`` local to each node, the first rank of every other node prepares its own.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hdpo_ds.common.atomic import write_json
from hdpo_ds.data.mixture import Sources
from hdpo_ds.data.records import (
    DataError,
    EntryPlan,
    ReadSummary,
    content_hash,
    data_fingerprint,
    file_entries,
    iter_source_json,
    normalise_record,
    parse_json_row,
    parse_rows,
    plan_entries,
    selected_rows,
)
from hdpo_ds.data.tokenize import (
    _OUT_FEATURES,
    TokenizeResult,
    _check_lengths,
    _Tokenize,
    cache_key,
    cached_table,
    check_eos,
    error_columns,
    error_from_row,
    no_chat_template_error,
    resolve_chat_template,
    token_id_error,
    tokenize_columns,
    tokenize_result,
    write_arrow,
)

logger = logging.getLogger(__name__)

__all__ = ["PREPARE_VERSION", "PreparedHandle", "open_pairs", "prepare_pairs", "resolve_num_proc"]

PREPARE_VERSION = "hdpo_ds.prepare/1"
ROWS_PER_WORKER = 10_000  # fewer rows than this per worker cost more in process start-up than they save
_MEMO = "source-hashes.json"


@dataclasses.dataclass(frozen=True)
class PreparedHandle:
    """What rank 0 sends the other ranks once a split is prepared (small, picklable): the cache
    directory, the cache key, the data's fingerprint, the files list and the sources read."""

    cache_path: str
    fingerprint: str
    data_fingerprint: str
    entries: Sources
    sources: tuple[str, ...]
    built: bool


def resolve_num_proc(num_proc: int, num_rows: int | None = None) -> int | None:
    """``data.num_proc`` (0: the CPUs this process may use), at most one worker per ``ROWS_PER_WORKER``
    rows; None (no worker processes) for one."""
    if not isinstance(num_proc, int) or num_proc < 0:
        raise ValueError(
            f"data.num_proc must be an integer >= 0 (0: one per available CPU); got {num_proc!r}"
        )
    procs = num_proc or len(os.sched_getaffinity(0))
    if num_rows is not None:
        procs = min(procs, max(1, num_rows // ROWS_PER_WORKER))
    return procs if procs > 1 else None


def prepare_pairs(
    files: Sequence[str | Mapping] | str | Sources,
    tokenizer: Any,
    *,
    cache_dir: str,
    max_length: int,
    max_prompt_length: int,
    truncation: str = "keep_end",
    chat_template: str | None = None,
    on_bad_record: str = "error",
    split: str | None = None,
    rows: str | slice | None = None,
    key: str = "data.train_files",
    num_proc: int = 0,
) -> PreparedHandle:
    """Build (or find) the prepared table of one split; main process only. Arguments as
    ``load_records`` (files, split, rows, key, on_bad_record) and ``tokenize_pairs`` (the rest)."""
    entries = files if isinstance(files, Sources) else file_entries(files, key)
    if not entries.specs:
        raise ValueError("no data files given")
    _check_lengths(max_length, max_prompt_length, truncation, on_bad_record)
    check_eos(tokenizer)
    resolve_num_proc(num_proc)
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    plans = plan_entries(entries, split, rows)
    memo_path = os.path.join(cache_dir, _MEMO)
    memo = _read_memo(memo_path)
    before = json.dumps(memo, sort_keys=True)
    data_fp = data_fingerprint(entries, plans, split, rows, memo)
    if json.dumps(memo, sort_keys=True) != before:
        os.makedirs(cache_dir, exist_ok=True)
        write_json(memo_path, memo)
    template = resolve_chat_template(tokenizer, chat_template)
    fingerprint = cache_key(
        data_fp,
        tokenizer,
        template,
        max_length,
        max_prompt_length,
        truncation,
        on_bad_record,
        (PREPARE_VERSION,),
    )
    worker = _Prepare(tokenizer, template, max_length, max_prompt_length, truncation, on_bad_record)

    def build(cache_file: str):
        return _build(plans, entries, rows, worker, on_bad_record, num_proc, cache_file)

    _, from_cache, path = cached_table(build, cache_dir, f"pairs-{fingerprint[:40]}", fingerprint)
    sources = tuple(src.name for plan in plans for src in plan.sources)
    return PreparedHandle(path, fingerprint, data_fp, entries, sources, not from_cache)


def open_pairs(handle: PreparedHandle, *, log: bool = True) -> tuple[ReadSummary, TokenizeResult]:
    """The prepared split on this rank: what validation found (per reason and per files-list entry) and
    the tokenized pairs, memory-mapped; vectorised, no Python object per row. ``log``: log the counts
    and up to three examples of each skip reason (rank 0)."""
    from hdpo_ds.data.tokenize import _read_cache

    table = _read_cache(handle.cache_path)
    num_entries = len(handle.entries.specs)
    import pyarrow.compute as pc

    record_drop = table.column("record_drop").combine_chunks().dictionary_encode()
    reasons = np.asarray(record_drop.dictionary.to_pylist(), dtype=object)
    codes = record_drop.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    entry_of_row = table.column("source").to_numpy().astype(np.int64)
    skipped: collections.Counter[str] = collections.Counter()
    per_entry = []
    for e in range(num_entries):
        counts = np.bincount(codes[entry_of_row == e], minlength=len(reasons))
        entry = collections.Counter({"rows": int(counts.sum()), "kept": 0})
        for code, count in enumerate(counts):
            if count:
                entry["kept" if reasons[code] == "" else reasons[code]] += int(count)
        per_entry.append(entry)
    for code, count in enumerate(np.bincount(codes, minlength=len(reasons))):
        if reasons[code] and count:
            skipped[reasons[code]] = int(count)
    summary = ReadSummary(
        skipped, handle.data_fingerprint, table.num_rows, list(handle.sources), handle.entries, per_entry
    )
    if log:
        for kind, count in sorted(skipped.items()):
            rows = np.flatnonzero(pc.equal(table.column("record_drop"), kind).to_numpy(zero_copy_only=False))
            examples = [_describe(table, int(r), kind) for r in rows[:3]]
            logger.warning(
                "dropped %d record(s): %s (e.g. %s)", count, kind.replace("_", " "), "; ".join(examples)
            )
        logger.info(
            "prepared %d row(s) from %d source(s) (%s)",
            table.num_rows,
            len(handle.sources),
            "built" if handle.built else "from the cache " + handle.cache_path,
        )
    data = tokenize_result(table, handle.fingerprint, not handle.built, handle.cache_path, num_entries)
    return summary, data


# ---------------------------------------------------------------------------------------------- internals


def _describe(table, row: int, kind: str) -> str:
    values = (
        table.slice(row, 1).select(["error", "error_source", "error_index", "error_field"]).to_pylist()[0]
    )
    if values["error"]:
        return str(error_from_row(values, kind))
    return f"{values['error_source']}: record {values['error_index']}"


def _read_memo(path: str) -> dict:
    try:
        with open(path) as f:
            memo = json.load(f)
    except (OSError, ValueError):  # absent or unreadable: every file is hashed again
        return {}
    return memo if isinstance(memo, dict) else {}


def _raw_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("text", pa.large_string()),
            ("line", pa.int64()),
            ("source", pa.string()),
            ("index", pa.int64()),
            ("source_index", pa.int32()),
        ]
    )


def _write_raw(plans: list[EntryPlan], entries: Sources, rows, path: str) -> np.ndarray | None:
    """Stream every source's rows into the Arrow file ``path``; the positions the row slices select
    (``records.selected_rows``; None: all)."""
    import pyarrow as pa

    schema = _raw_schema()
    entry_sizes = []
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for e, plan in enumerate(plans):
            size = 0
            for src in plan.sources:
                index = 0
                for batch in iter_source_json(src):
                    writer.write_batch(
                        pa.record_batch(
                            [
                                pa.array([text for text, _ in batch], pa.large_string()),
                                pa.array([line for _, line in batch], pa.int64()),
                                pa.array([src.name] * len(batch), pa.string()),
                                pa.array(np.arange(index, index + len(batch), dtype=np.int64)),
                                pa.array(np.full(len(batch), e, dtype=np.int32)),
                            ],
                            schema=schema,
                        )
                    )
                    index += len(batch)
                size += index
            entry_sizes.append(size)
    sliced = any(plan.rows is not None for plan in plans) or (
        not entries.mixture and parse_rows(rows) is not None
    )
    return selected_rows(entries, plans, rows, entry_sizes)[0] if sliced else None


def _build(plans, entries, rows, worker, on_bad_record: str, num_proc: int, cache_file: str):
    import datasets

    raw_path = os.path.join(os.path.dirname(cache_file), "raw.arrow")
    selected = _write_raw(plans, entries, rows, raw_path)
    raw = datasets.Dataset.from_file(raw_path, in_memory=False)
    if selected is not None:
        raw = raw.select(selected)
    features = datasets.Features({**_OUT_FEATURES(), "digest": datasets.Value("string")})
    if len(raw) == 0:
        table = features.arrow_schema.empty_table()
        write_arrow(table, cache_file)
    else:
        out = raw.map(
            worker,
            batched=True,
            batch_size=1000,
            remove_columns=raw.column_names,
            features=features,
            cache_file_name=cache_file,
            load_from_cache_file=False,  # our own cache key decides; datasets' would reuse a stale file
            new_fingerprint=hashlib.sha256(cache_file.encode()).hexdigest()[:16],
            num_proc=resolve_num_proc(num_proc, len(raw)),
            desc="validate and tokenize preference pairs",
        )
        table = out.data.table
    if _any_equal(table.column("record_drop"), "no_chat_template"):
        raise no_chat_template_error()
    fixed = _mark_duplicate_ids(table, raw)
    if fixed is not None:
        table = _rewrite(fixed, cache_file)
    if on_bad_record == "error":
        _raise_first_error(table)
    del raw
    os.remove(raw_path)
    return table


def _any_equal(column, value: str) -> bool:
    import pyarrow.compute as pc

    return bool(pc.any(pc.equal(column, value)).as_py())


def _mark_duplicate_ids(table, raw):
    """The table with ``duplicate_id`` recorded on every validated row whose explicit id was first seen
    with different content (None when there is none, the usual case: one Arrow group-by decides)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    validated = pc.and_(pc.equal(table.column("record_drop"), ""), pc.not_equal(table.column("digest"), ""))
    candidates = table.select(["id", "digest"]).filter(validated)
    groups = candidates.group_by("id").aggregate([("digest", "count_distinct")])
    clashing = groups.filter(pc.greater(groups.column("digest_count_distinct"), 1)).column("id")
    if len(clashing) == 0:
        return None
    rows = np.flatnonzero(
        pc.and_(validated, pc.is_in(table.column("id"), value_set=clashing.combine_chunks())).to_numpy(
            zero_copy_only=False
        )
    )
    first: dict[str, tuple[str, str, int]] = {}
    record_drop = table.column("record_drop").to_pylist()
    errors = {
        name: table.column(name).to_pylist()
        for name in ("error", "error_source", "error_index", "error_field")
    }
    for r in rows.tolist():
        pair_id, digest = table.column("id")[r].as_py(), table.column("digest")[r].as_py()
        where = raw[r]
        seen = first.setdefault(pair_id, (digest, where["source"], where["index"]))
        if seen[0] == digest:
            continue
        err = DataError(
            f"duplicate id '{pair_id}' with different content (first seen at {seen[1]}: record {seen[2]})",
            source=where["source"],
            index=where["index"],
            field="id",
            kind="duplicate_id",
        )
        record_drop[r] = "duplicate_id"
        for name, value in error_columns(err).items():
            errors[name][r] = value
    table = table.set_column(
        table.schema.get_field_index("record_drop"), "record_drop", pa.array(record_drop)
    )
    for name, values in errors.items():
        field = table.schema.field(name)
        table = table.set_column(table.schema.get_field_index(name), field, pa.array(values, field.type))
    return table


def _rewrite(table, cache_file: str):
    """Write a corrected table as the cache's one data file (the workers' files removed)."""
    import datasets

    folder = os.path.dirname(cache_file)
    tmp = cache_file + ".rewrite"
    write_arrow(table, tmp)
    for name in os.listdir(folder):
        if name.startswith("data") and name.endswith(".arrow"):
            os.remove(os.path.join(folder, name))
    os.replace(tmp, cache_file)
    return datasets.Dataset.from_file(cache_file).data.table


def _raise_first_error(table) -> None:
    """on_bad_record: error: raise the first bad row, validation before tokenization (the order
    ``load_records`` then ``tokenize_pairs`` meet them)."""
    import pyarrow.compute as pc

    has_error = pc.not_equal(table.column("error"), "")
    for stage in (pc.not_equal(table.column("record_drop"), ""), pc.equal(table.column("record_drop"), "")):
        rows = np.flatnonzero(pc.and_(has_error, stage).to_numpy(zero_copy_only=False))
        if len(rows):
            row = table.slice(int(rows[0]), 1).to_pylist()[0]
            raise error_from_row(row, row["record_drop"] or row["drop"])


class _Prepare:
    """The ``datasets.map`` function (batched): raw JSON rows -> validated, normalised and tokenized rows
    (``_OUT_FEATURES`` plus ``digest``: the content hash of a row with an explicit id, for the
    duplicate check). Never raises on a bad row: its error goes to the error columns."""

    def __init__(self, tokenizer, template, max_length, max_prompt_length, truncation, on_bad_record):
        self.template = template
        self.vocab_size = len(tokenizer)
        self.tokenize = _Tokenize(
            tokenizer, template, max_length, max_prompt_length, truncation, on_bad_record, collect=True
        )

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        n = len(batch["text"])
        record_drop = [""] * n
        errors: list[DataError | None] = [None] * n
        digests = [""] * n
        locations: dict[int, tuple[str, int]] = {}
        valid: list[int] = []
        records = []
        for i in range(n):
            source, index = batch["source"][i], batch["index"][i]
            row = parse_json_row(batch["text"][i], batch["line"][i])
            try:
                record = normalise_record(row, source=source, index=index)
            except DataError as err:
                record_drop[i], errors[i] = err.kind, err
                continue
            if record is None:
                record_drop[i] = "identical_chosen_rejected"
                locations[i] = (source, index)  # no error text: the log names it by its place
                continue
            if record.format == "chat" and self.template is None:
                record_drop[i] = "no_chat_template"
                continue
            if row.get("id") is not None:  # content-hash ids: equal ids mean equal content
                digests[i] = content_hash(record.content())
            valid.append(i)
            records.append(record)
        token_errors = [token_id_error(r, self.vocab_size) for r in records]
        tokenized = self.tokenize(
            tokenize_columns(
                records,
                [batch["source_index"][i] for i in valid],
                ["" if e is None else e.kind for e in token_errors],
            )
        )
        for j, err in enumerate(token_errors):
            if err is not None:
                for name, value in error_columns(err).items():
                    tokenized[name][j] = value
        out: dict[str, list] = {name: [] for name in tokenized}
        out["digest"] = []
        position = dict(zip(valid, range(len(valid)), strict=True))
        for i in range(n):
            j = position.get(i)
            if j is not None:
                for name, values in tokenized.items():
                    out[name].append(values[j])
            else:
                row = {
                    "id": "",
                    "prompt_ids": [],
                    "chosen_ids": [],
                    "rejected_ids": [],
                    "chosen_has_eos": False,
                    "rejected_has_eos": False,
                    "flags": 0,
                    "drop": "",
                    "source": batch["source_index"][i],
                    "record_drop": record_drop[i],
                    **error_columns(errors[i]),
                }
                if i in locations:
                    row["error_source"], row["error_index"] = locations[i]
                for name, value in row.items():
                    out[name].append(value)
            out["digest"].append(digests[i])
        return out
