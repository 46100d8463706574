"""Preference records: read the source shapes the ecosystem uses, validate every record, normalise.

Sources (one spec each; several are concatenated in the order given):

- a JSON Lines file (``.jsonl``), or a ``.json`` file holding a JSON array (or JSON Lines);
- a Parquet file (``.parquet`` / ``.pq``);
- a directory written by ``datasets.save_to_disk`` (a ``Dataset`` or a ``DatasetDict``);
- any other directory: its ``.jsonl`` / ``.json`` / ``.parquet`` files, sorted by name;
- a glob pattern (``data/*.jsonl``), expanded and sorted;
- a Hugging Face dataset name (``org/name``), resolved offline from the local ``datasets`` cache only.

Record formats (docs/design.md §3), detected per record:

- standard: ``prompt``, ``chosen``, ``rejected`` strings;
- conversational: lists of ``{"role", "content"}`` messages. ``prompt`` holds the conversation so far and
  ``chosen`` / ``rejected`` one assistant message each (a plain string response is wrapped as one);
- implicit prompt: no ``prompt``; ``chosen`` and ``rejected`` are whole texts or conversations and the prompt
  is their longest common prefix (Anthropic HH style). Strings are cut at a word boundary, and the space
  before the first differing word goes to the responses, because BPE tokenizers attach a space to the word
  after it (a prompt ending in a space would merge across the boundary). A string ``prompt`` beside
  conversations that already contain the user turn (UltraFeedback style) is redundant and replaced by the
  common message prefix;
- pre-tokenized: ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (taken as given; text fields are ignored).

Every pair gets a stable ``id``: the record's own ``id`` or, without one, a content hash (sha256 over the
normalised record). Records that cannot be used raise :class:`DataError` naming the source, the record
index (0-based, within its source) and the field. With ``on_bad_record="skip"`` they are counted per reason
and logged instead. Pairs whose chosen and rejected are identical carry no preference signal: they are
always dropped and counted as ``identical_chosen_rejected``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from hdpo_ds.data.mixture import Sources, SourceSpec, parse_rows, parse_sources

logger = logging.getLogger(__name__)

# Bump when normalisation changes, so fingerprints (and the tokenization cache keyed on them) change too.
RECORDS_FORMAT_VERSION = "hdpo_ds.records/1"
ROLES = ("system", "user", "assistant")
ON_BAD_RECORD = ("error", "skip")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".pq")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")

Message = dict[str, str]
Text = str | list[Message]


class DataError(ValueError):
    """A record or a source that cannot be used.

    The message reads ``<source>: record <index>: field '<field>': <reason>`` (parts that do not apply are
    left out). ``kind`` is a short reason code (``missing_field``, ``wrong_type``, ``empty_response``,
    ``empty_prompt``, ``bad_role``, ``invalid_json``, ``duplicate_id``, ...) used to count skipped records.
    """

    def __init__(
        self,
        reason: str,
        *,
        source: str | None = None,
        index: int | None = None,
        field: str | None = None,
        kind: str = "invalid",
    ) -> None:
        self.reason = reason
        self.source = source
        self.index = index
        self.field = field
        self.kind = kind
        parts = []
        if source is not None:
            parts.append(str(source))
        if index is not None:
            parts.append(f"record {index}")
        if field is not None:
            parts.append(f"field '{field}'")
        super().__init__(": ".join([*parts, reason]))


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
    """One validated, normalised preference pair.

    Text records: ``prompt``, ``chosen``, ``rejected`` are all strings (``format == "text"``) or all lists of
    ``{"role", "content"}`` messages (``format == "chat"``; ``prompt`` ends with a user message, ``chosen``
    and ``rejected`` are one assistant message each). Pre-tokenized records (``format == "tokens"``) have
    ``prompt``/``chosen``/``rejected`` set to None and the token ids in ``prompt_ids``/``chosen_ids``/
    ``rejected_ids``. ``source`` and ``index`` say where the record came from, for error messages;
    ``source_index`` is the index of the files-list entry it came from (per-source counts and metrics).
    """

    id: str
    prompt: Text | None
    chosen: Text | None
    rejected: Text | None
    prompt_ids: tuple[int, ...] | None = None
    chosen_ids: tuple[int, ...] | None = None
    rejected_ids: tuple[int, ...] | None = None
    source: str = dataclasses.field(default="", compare=False)
    index: int = dataclasses.field(default=-1, compare=False)
    source_index: int = dataclasses.field(default=0, compare=False)  # its data.train_files entry

    @property
    def format(self) -> str:
        """``"tokens"`` (pre-tokenized), ``"chat"`` (messages) or ``"text"`` (strings)."""
        if self.prompt_ids is not None:
            return "tokens"
        return "chat" if isinstance(self.chosen, list) else "text"

    @property
    def tokenized(self) -> bool:
        return self.prompt_ids is not None

    def content(self) -> dict[str, Any]:
        """The pair's content without its id, as plain JSON-able values (lists, not tuples)."""
        if self.tokenized:
            return {
                "prompt_ids": list(self.prompt_ids or ()),
                "chosen_ids": list(self.chosen_ids or ()),
                "rejected_ids": list(self.rejected_ids or ()),
            }
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


@dataclasses.dataclass
class ReadSummary:
    """What reading and validating a split's sources found, without the records themselves
    (data/prepare.py keeps those in Arrow).

    ``skipped``: how many rows were dropped, per reason (``identical_chosen_rejected`` always; the
    DataError kinds with ``on_bad_record="skip"``). ``fingerprint``: sha256 (hex) over the sources' bytes,
    the split, the row slice and the loader version (for a mixture: each entry's weight, split and row slice
    too); it identifies the records exactly. ``num_rows``: rows read after slicing, before validation.
    ``sources``: the files read. ``entries``: the parsed files list (``entries.mixture``: sampled by
    weight). ``source_counts``: per entry, ``rows`` read (validated), ``kept`` and the skip reasons.
    """

    skipped: collections.Counter[str]
    fingerprint: str
    num_rows: int
    sources: list[str]
    entries: Sources = dataclasses.field(default_factory=lambda: Sources((), False))
    source_counts: list[collections.Counter[str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class LoadResult(ReadSummary):
    """What :func:`load_records` returns: a :class:`ReadSummary` and ``records``, the valid pairs in source
    order (each record's ``source_index`` is its files-list entry). ``sampled_rows``: with
    ``load_records(sample=...)``, how many of ``num_rows`` were validated (None: all)."""

    records: list[PreferenceRecord] = dataclasses.field(default_factory=list)
    sampled_rows: int | None = None


def content_hash(content: Mapping[str, Any]) -> str:
    """Stable id of a pair's content: the first 32 hex digits of sha256 over canonical JSON."""
    blob = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


@dataclasses.dataclass
class RawTable:
    """What :func:`read_table` returns: ``rows`` (source, index within the source, raw row) after the row
    slice, not yet validated; ``row_entries``: the files-list entry of each row; ``fingerprint``,
    ``sources`` and ``entries`` as in :class:`LoadResult`."""

    rows: list[tuple[str, int, Any]]
    fingerprint: str
    sources: list[str]
    row_entries: list[int] = dataclasses.field(default_factory=list)
    entries: Sources = dataclasses.field(default_factory=lambda: Sources((), False))


@dataclasses.dataclass(frozen=True)
class EntryPlan:
    """One files-list entry resolved: its sources (nothing read yet), the split and the row slice that
    apply to it alone (a mixture entry's own, else the global ones; a plain list slices the
    concatenation, so its entries carry ``rows=None``)."""

    sources: tuple[SourceFile, ...]
    split: str | None
    rows: slice | None


def plan_entries(entries: Sources, split: str | None, rows: str | slice | None) -> list[EntryPlan]:
    """Every entry's sources, split and row slice (see :func:`read_table`)."""
    row_slice = parse_rows(rows)
    plans = []
    for spec in entries.specs:
        entry_split = split if spec.split is None else spec.split
        entry_slice = (row_slice if spec.rows is None else parse_rows(spec.rows)) if entries.mixture else None
        plans.append(EntryPlan(tuple(source_files(str(spec.path), entry_split)), entry_split, entry_slice))
    return plans


def data_fingerprint(
    entries: Sources, plans: list[EntryPlan], split: str | None, rows: str | slice | None, memo=None
) -> str:
    """sha256 (hex) over the loader version, the split and row slice, each mixture entry's weight, split
    and slice, and every source's content (:func:`source_fingerprint`; ``memo`` as there)."""
    fp = hashlib.sha256()
    fp.update(RECORDS_FORMAT_VERSION.encode())
    if not entries.mixture:  # unchanged from before mixtures existed: the same data keeps its caches
        fp.update(
            json.dumps({"split": split, "rows": _slice_repr(parse_rows(rows))}, sort_keys=True).encode()
        )
    for spec, plan in zip(entries.specs, plans, strict=True):
        if entries.mixture:
            fp.update(
                json.dumps(
                    {"weight": spec.weight, "split": plan.split, "rows": _slice_repr(plan.rows)},
                    sort_keys=True,
                ).encode()
            )
        for src in plan.sources:
            fp.update(source_fingerprint(src, memo).encode())
    return fp.hexdigest()


def read_table(
    files: Sequence[str | Mapping | SourceSpec] | str | Sources,
    *,
    split: str | None = None,
    rows: str | slice | None = None,
    key: str = "data.train_files",
) -> RawTable:
    """Read the rows of every source (``split`` and ``rows`` as in :func:`load_records`, which validates
    them as preference pairs; SFT reads its records through this too).

    Plain paths are concatenated and ``rows`` slices the concatenation. A mixture (an entry is a mapping,
    ``data/mixture.py``) reads each entry on its own: its ``split`` / ``rows``, else ``split`` / ``rows``,
    apply to that entry alone. ``key`` names the files list in errors about its entries."""
    entries = files if isinstance(files, Sources) else file_entries(files, key)
    if not entries.specs:
        raise ValueError("no data files given")
    plans = plan_entries(entries, split, rows)
    table: list[tuple[str, int, Any]] = []  # (source, index within source, raw row)
    row_entries: list[int] = []
    sources: list[str] = []
    for e, plan in enumerate(plans):
        part: list[tuple[str, int, Any]] = []
        for src in plan.sources:
            sources.append(src.name)
            rows_read = [row for batch in iter_source_rows(src) for row in batch]
            part.extend((src.name, i, row) for i, row in enumerate(rows_read))
        if plan.rows is not None:
            part = part[plan.rows]
        table.extend(part)
        row_entries.extend([e] * len(part))
    row_slice = parse_rows(rows)
    if not entries.mixture and row_slice is not None:
        table = table[row_slice]
        row_entries = row_entries[row_slice]
    fingerprint = data_fingerprint(entries, plans, split, rows)
    return RawTable(table, fingerprint, sources, row_entries, entries)


def file_entries(files, key: str) -> Sources:
    """The parsed files list (``data/mixture.py``); a bad entry raises DataError naming ``key``."""
    specs = [files] if isinstance(files, str | os.PathLike) else list(files)
    specs = [str(f) if isinstance(f, os.PathLike) else f for f in specs]
    try:
        return parse_sources(specs, key)
    except ValueError as e:
        raise DataError(str(e), kind="bad_source") from None


def load_records(
    files: Sequence[str | Mapping | SourceSpec] | str | Sources,
    *,
    split: str | None = None,
    rows: str | slice | None = None,
    on_bad_record: str = "error",
    key: str = "data.train_files",
    sample: int | None = None,
) -> LoadResult:
    """Read, concatenate, slice and validate preference records.

    ``files``: one source spec or several (see the module docstring); rows of all sources are concatenated
    in order. An entry may be a mapping ``{path, weight, split, rows}`` (a mixture; ``data/mixture.py``):
    its own ``split`` / ``rows`` then apply to it alone (see :func:`read_table`). ``split``: which split of
    a ``DatasetDict`` / hub dataset (default: its only split, else ``train``); ignored by single-table
    sources. ``rows``: a slice over the concatenated rows (a mixture: over each entry's rows), applied
    before validation (record indices in errors stay those of the source). ``key``: the config key of
    the files list, for errors about its entries. ``on_bad_record``: ``error``
    raises :class:`DataError` on the first bad record; ``skip`` drops it, counts it per reason in
    ``skipped`` and logs it. Every selected record is validated before this returns, unless ``sample``
    (the dry run): then every source's rows are counted, but only ``sample`` rows, evenly spaced over
    the selected rows (first and last included), are parsed, validated and returned
    (``LoadResult.sampled_rows``; ``num_rows`` stays the count of all selected rows).
    """
    if on_bad_record not in ON_BAD_RECORD:
        raise ValueError(
            f"data.on_bad_record must be one of {', '.join(ON_BAD_RECORD)}; got {on_bad_record!r}"
        )
    if sample is None:
        raw = read_table(files, split=split, rows=rows, key=key)
        num_rows = len(raw.rows)
    else:
        raw, num_rows = _sampled_table(files, split, rows, key, sample)
    table, sources = raw.rows, raw.sources

    records: list[PreferenceRecord] = []
    skipped: collections.Counter[str] = collections.Counter()
    per_entry = [collections.Counter({"rows": 0, "kept": 0}) for _ in raw.entries.specs]
    examples: dict[str, list[str]] = collections.defaultdict(list)
    first_by_id: dict[str, tuple[str, tuple[str, int]]] = {}
    for position in range(len(table)):
        (source, index, row), entry = table[position], raw.row_entries[position]
        counts = per_entry[entry]
        counts["rows"] += 1
        try:
            record = normalise_record(row, source=source, index=index)
            if record is not None:
                _check_unique_id(record, row, first_by_id)
        except DataError as err:
            if on_bad_record == "error":
                raise
            skipped[err.kind] += 1
            counts[err.kind] += 1
            if len(examples[err.kind]) < 3:
                examples[err.kind].append(str(err))
            continue
        if record is None:
            skipped["identical_chosen_rejected"] += 1
            counts["identical_chosen_rejected"] += 1
            if len(examples["identical_chosen_rejected"]) < 3:
                examples["identical_chosen_rejected"].append(f"{source}: record {index}")
            continue
        counts["kept"] += 1
        records.append(dataclasses.replace(record, source_index=entry) if entry else record)

    for kind, count in sorted(skipped.items()):
        logger.warning(
            "dropped %d record(s): %s (e.g. %s)", count, kind.replace("_", " "), "; ".join(examples[kind])
        )
    logger.info(
        "loaded %d preference pairs from %d row(s) in %d source(s)", len(records), len(table), len(sources)
    )
    sampled = len(table) if len(table) < num_rows else None
    return LoadResult(
        skipped,
        raw.fingerprint,
        num_rows,
        sources,
        raw.entries,
        per_entry,
        records=records,
        sampled_rows=sampled,
    )


def _sample_positions(counts: Sequence[int], sample: int) -> list[int]:
    """About ``sample`` positions among the selected rows (``counts``: per entry, in order): per entry a
    share by its row count (at least one row of each entry that has rows), evenly spaced over its rows,
    its first and last included."""
    total = sum(counts)
    positions, start = [], 0
    for n in counts:
        k = min(n, max(1, round(sample * n / total))) if n else 0
        positions += sorted({start + round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})
        start += n
    return positions


def selected_rows(
    entries: Sources, plans: list[EntryPlan], rows: str | slice | None, entry_sizes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Which rows the row slices select, in the rules of :func:`read_table`, from each entry's row count
    (``entry_sizes``): (positions into the concatenation of all entries' rows, the entry of each)."""
    parts, owners, start = [], [], 0
    for e, (plan, size) in enumerate(zip(plans, entry_sizes, strict=True)):
        positions = np.arange(start, start + size, dtype=np.int64)
        if plan.rows is not None:
            positions = positions[plan.rows]
        parts.append(positions)
        owners.append(np.full(len(positions), e, dtype=np.int64))
        start += size
    order = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    owner = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64)
    row_slice = parse_rows(rows)
    if not entries.mixture and row_slice is not None:
        order, owner = order[row_slice], owner[row_slice]
    return order, owner


def _sampled_table(files, split, rows, key: str, sample: int) -> tuple[RawTable, int]:
    """A :class:`RawTable` of about ``sample`` of the selected rows (``_sample_positions``) and the number
    of selected rows, in two streaming passes: the rows are counted, then only the sampled ones parsed
    (the dry run; no Python object per row of a large set)."""
    entries = files if isinstance(files, Sources) else file_entries(files, key)
    if not entries.specs:
        raise ValueError("no data files given")
    plans = plan_entries(entries, split, rows)
    sources = [src.name for plan in plans for src in plan.sources]
    sizes = [[count_rows(src) for src in plan.sources] for plan in plans]
    order, owner = selected_rows(entries, plans, rows, [sum(s) for s in sizes])
    counts = np.bincount(owner, minlength=len(plans)).tolist()
    chosen = _sample_positions(counts, sample) if len(order) > sample else list(range(len(order)))
    wanted, row_entries = order[chosen], owner[chosen]
    picked: dict[int, tuple[str, int, Any]] = {}
    targets, start = set(wanted.tolist()), 0
    for plan, plan_sizes in zip(plans, sizes, strict=True):
        for src, size in zip(plan.sources, plan_sizes, strict=True):
            if targets.intersection(range(start, start + size)):
                index = 0
                for batch in iter_source_json(src):
                    for text, line in batch:
                        if start + index in targets:
                            picked[start + index] = (src.name, index, parse_json_row(text, line))
                        index += 1
            start += size
    table = [picked[int(p)] for p in wanted]
    fingerprint = data_fingerprint(entries, plans, split, rows)
    raw = RawTable(table, fingerprint, sources, [int(e) for e in row_entries], entries)
    return raw, len(order)


def count_rows(src: SourceFile) -> int:
    """The number of rows of one source, without parsing them (JSON Lines: its non-blank lines; Parquet:
    its metadata)."""
    lower = src.name.lower()
    if src.kind == "file" and lower.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(src.name).metadata.num_rows
        except Exception as err:  # pyarrow raises several types for corrupt files
            raise DataError(f"cannot read Parquet: {err}", source=src.name) from err
    if src.kind != "file":
        return len(_open_dataset(src))
    return sum(len(batch) for batch in iter_source_json(src))


def normalise_record(row: Any, *, source: str = "<records>", index: int = 0) -> PreferenceRecord | None:
    """Validate one raw row and return its normalised record, or None when chosen == rejected.

    Raises :class:`DataError` naming ``source``, ``index`` and the field on any malformed content.
    """
    where = {"source": source, "index": index}
    if isinstance(row, _Unreadable):
        raise DataError(row.reason, kind=row.kind, **where)
    if not isinstance(row, Mapping):
        raise DataError(
            f"wrong type: a record must be an object, got {_type(row)}", kind="wrong_type", **where
        )
    record_id = _record_id(row, where)
    if any(row.get(k) is not None for k in ("prompt_ids", "chosen_ids", "rejected_ids")):
        return _normalise_tokens(row, record_id, where)

    chosen = _required(row, "chosen", where)
    rejected = _required(row, "rejected", where)
    prompt = row.get("prompt")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str | list):
            raise DataError(
                f"wrong type: expected a string or a list of {{role, content}} messages, got {_type(value)}",
                field=name,
                kind="wrong_type",
                **where,
            )
    if prompt is not None and not isinstance(prompt, str | list):
        raise DataError(
            f"wrong type: expected a string or a list of {{role, content}} messages, got {_type(prompt)}",
            field="prompt",
            kind="wrong_type",
            **where,
        )
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise DataError(
            f"wrong type: chosen is {_type(chosen)} but rejected is {_type(rejected)}; both must be strings "
            "or both message lists",
            field="rejected",
            kind="wrong_type",
            **where,
        )
    if isinstance(chosen, list) or isinstance(prompt, list):
        return _normalise_chat(prompt, chosen, rejected, record_id, where)
    return _normalise_text(prompt, chosen, rejected, record_id, where)


# --------------------------------------------------------------------------------------------- formats


def _normalise_text(
    prompt: str | None, chosen: str, rejected: str, record_id, where
) -> PreferenceRecord | None:
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not value.strip():
            raise DataError("empty response", field=name, kind="empty_response", **where)
    if chosen == rejected:
        return None
    if prompt is None:
        cut = _text_prefix_cut(chosen, rejected)
        prompt, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
        if not prompt.strip():
            raise DataError(
                "empty prompt: no 'prompt' field and chosen and rejected share no common prefix to use as "
                "one",
                field="prompt",
                kind="empty_prompt",
                **where,
            )
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if not value.strip():
                raise DataError(
                    "empty response after removing the prompt shared with the other response",
                    field=name,
                    kind="empty_response",
                    **where,
                )
    elif not prompt.strip():
        raise DataError("empty prompt", field="prompt", kind="empty_prompt", **where)
    record = PreferenceRecord("", prompt, chosen, rejected, source=where["source"], index=where["index"])
    return dataclasses.replace(record, id=record_id or content_hash(record.content()))


def _text_prefix_cut(a: str, b: str) -> int:
    """Where the implicit prompt of two texts ends: before the whitespace preceding the first differing
    word."""
    n = 0
    limit = min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    # If they differ inside a word ("Yes," vs "Yes I", "Yes" vs "Yesterday"), back up to that word's start.
    if n > 0 and not a[n - 1].isspace() and any(n < len(s) and not s[n].isspace() for s in (a, b)):
        while n > 0 and not a[n - 1].isspace():
            n -= 1
    while n > 0 and a[n - 1].isspace():  # the whitespace before it belongs to the responses
        n -= 1
    return n


def _normalise_chat(prompt, chosen, rejected, record_id, where) -> PreferenceRecord | None:
    prompt_msgs = _messages(prompt, "prompt", where) if isinstance(prompt, list) else None
    responses = {}
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(value, str):
            # A plain string response after a message-list prompt is one assistant message.
            responses[name] = [{"role": "assistant", "content": value}]
        else:
            responses[name] = _messages(value, name, where)
        if not responses[name]:
            raise DataError("empty response", field=name, kind="empty_response", **where)
    chosen_msgs, rejected_msgs = responses["chosen"], responses["rejected"]
    if chosen_msgs == rejected_msgs:
        return None

    offset = 0  # index of the first response message in the original chosen/rejected lists
    if prompt_msgs is None:
        starts_with_assistant = (
            chosen_msgs[0]["role"] == "assistant" and rejected_msgs[0]["role"] == "assistant"
        )
        if isinstance(prompt, str) and starts_with_assistant:
            if not prompt.strip():
                raise DataError("empty prompt", field="prompt", kind="empty_prompt", **where)
            prompt_msgs = [{"role": "user", "content": prompt}]
        else:
            while (
                offset < min(len(chosen_msgs), len(rejected_msgs))
                and chosen_msgs[offset] == rejected_msgs[offset]
            ):
                offset += 1
            if offset == 0:
                raise DataError(
                    "empty prompt: no 'prompt' field and chosen and rejected share no leading messages to "
                    "use as one",
                    field="prompt",
                    kind="empty_prompt",
                    **where,
                )
            prompt_msgs = chosen_msgs[:offset]
            chosen_msgs, rejected_msgs = chosen_msgs[offset:], rejected_msgs[offset:]
            for name, msgs in (("chosen", chosen_msgs), ("rejected", rejected_msgs)):
                if not msgs:
                    raise DataError(
                        "empty response: the conversation has no messages after the prompt shared with the "
                        "other response",
                        field=name,
                        kind="empty_response",
                        **where,
                    )
    if not prompt_msgs:
        raise DataError("empty prompt", field="prompt", kind="empty_prompt", **where)

    prompt_field = "prompt" if isinstance(prompt, list) else "chosen"
    _check_alternation(prompt_msgs, prompt_field, 0, where)
    if prompt_msgs[-1]["role"] != "user":
        raise DataError(
            f"roles must alternate: the prompt must end with a user message, got '{prompt_msgs[-1]['role']}'",
            field=f"{prompt_field}[{len(prompt_msgs) - 1}].role",
            kind="bad_role",
            **where,
        )
    for name, msgs, raw in (("chosen", chosen_msgs, chosen), ("rejected", rejected_msgs, rejected)):

        def field(i: int, key: str, name=name, raw=raw) -> str:
            # Name the message by its index in the record's own list (a string response has none).
            return f"{name}[{offset + i}].{key}" if isinstance(raw, list) else name

        if msgs[0]["role"] != "assistant":
            raise DataError(
                f"roles must alternate: the response must be an assistant message after the prompt's final "
                f"user message, got '{msgs[0]['role']}'",
                field=field(0, "role"),
                kind="bad_role",
                **where,
            )
        if len(msgs) > 1:
            raise DataError(
                f"a response must be a single assistant message; found {len(msgs)} messages with roles "
                f"{', '.join(m['role'] for m in msgs)}",
                field=field(1, "role"),
                kind="bad_role",
                **where,
            )
        if not msgs[0]["content"].strip():
            raise DataError("empty response", field=field(0, "content"), kind="empty_response", **where)
    record = PreferenceRecord(
        "", prompt_msgs, chosen_msgs, rejected_msgs, source=where["source"], index=where["index"]
    )
    return dataclasses.replace(record, id=record_id or content_hash(record.content()))


def _messages(value: list, name: str, where) -> list[Message]:
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping):
            raise DataError(
                f"wrong type: a message must be an object with 'role' and 'content', got {_type(msg)}",
                field=f"{name}[{i}]",
                kind="wrong_type",
                **where,
            )
        for key in ("role", "content"):
            if msg.get(key) is None:
                raise DataError("missing field", field=f"{name}[{i}].{key}", kind="missing_field", **where)
            if not isinstance(msg[key], str):
                raise DataError(
                    f"wrong type: expected a string, got {_type(msg[key])}",
                    field=f"{name}[{i}].{key}",
                    kind="wrong_type",
                    **where,
                )
        if msg["role"] not in ROLES:
            raise DataError(
                f"unknown role '{msg['role']}' (expected one of {', '.join(ROLES)})",
                field=f"{name}[{i}].role",
                kind="bad_role",
                **where,
            )
        # Only role and content are kept: Parquet struct columns add null keys, and ids must not depend on
        # them.
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def _check_alternation(msgs: list[Message], name: str, base: int, where) -> None:
    """An optional leading system message, then user, assistant, user, ... strictly alternating."""
    expected = "user"
    for i, msg in enumerate(msgs):
        role = msg["role"]
        if role == "system" and i == 0:
            continue
        if role != expected:
            previous = msgs[i - 1]["role"] if i else "the start of the conversation"
            reason = (
                "a system message is only allowed first"
                if role == "system"
                else f"'{role}' follows '{previous}'"
                if i
                else f"the conversation starts with '{role}'"
            )
            raise DataError(
                f"roles must alternate user/assistant after an optional leading system message: {reason}",
                field=f"{name}[{base + i}].role",
                kind="bad_role",
                **where,
            )
        expected = "assistant" if role == "user" else "user"


def _normalise_tokens(row: Mapping, record_id, where) -> PreferenceRecord | None:
    ids = {}
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        value = _required(row, name, where)
        if hasattr(value, "tolist"):  # numpy arrays from Arrow-backed sources
            value = value.tolist()
        # set(map(type, ...)) runs at C speed: pre-tokenized data can hold billions of ids.
        if not isinstance(value, list | tuple) or (
            value and (set(map(type, value)) != {int} or min(value) < 0)
        ):
            raise DataError(
                f"wrong type: expected a list of non-negative integer token ids, got {_type(value)}",
                field=name,
                kind="wrong_type",
                **where,
            )
        ids[name] = tuple(value)
    for name in ("chosen_ids", "rejected_ids"):
        if not ids[name]:
            raise DataError("empty response", field=name, kind="empty_response", **where)
    if ids["chosen_ids"] == ids["rejected_ids"]:
        return None
    if not ids["prompt_ids"]:
        # The first response token is predicted from the last prompt token, so a prompt is required.
        raise DataError("empty prompt", field="prompt_ids", kind="empty_prompt", **where)
    record = PreferenceRecord("", None, None, None, **ids, source=where["source"], index=where["index"])
    return dataclasses.replace(record, id=record_id or content_hash(record.content()))


def _record_id(row: Mapping, where) -> str | None:
    value = row.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(
            f"wrong type: expected a string or an integer, got {_type(value)}",
            field="id",
            kind="wrong_type",
            **where,
        )
    if isinstance(value, str) and not value.strip():
        raise DataError("wrong type: empty id", field="id", kind="wrong_type", **where)
    return str(value)


def _required(row: Mapping, name: str, where) -> Any:
    if row.get(name) is None:
        raise DataError("missing field", field=name, kind="missing_field", **where)
    return row[name]


def _check_unique_id(record: PreferenceRecord, row: Mapping, first_by_id: dict) -> None:
    """Two rows may share an explicit id only with identical content (ids key the reference cache)."""
    if row.get("id") is None:
        return  # content-hash ids: equal ids mean equal content
    digest = content_hash(record.content())
    seen = first_by_id.get(record.id)
    if seen is None:
        first_by_id[record.id] = (digest, (record.source, record.index))
    elif seen[0] != digest:
        raise DataError(
            f"duplicate id '{record.id}' with different content (first seen at {seen[1][0]}: "
            f"record {seen[1][1]})",
            source=record.source,
            index=record.index,
            field="id",
            kind="duplicate_id",
        )


def _type(value: Any) -> str:
    return {str: "a string", list: "a list", dict: "an object", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _slice_repr(s: slice | None) -> list | None:
    return None if s is None else [s.start, s.stop]


# --------------------------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class _Unreadable:
    """A row that could not be parsed; it raises when validated, so slicing and skip counts include it."""

    reason: str
    kind: str = "invalid_json"


def read_rows(spec: str, split: str | None = None) -> Iterator[tuple[str, list]]:
    """(source name, raw rows) for each source a data spec expands to (a .jsonl / .json / .parquet file,
    a directory of them, a glob, a save_to_disk directory). An unparsable JSON line comes back as a row
    that :func:`row_error` turns into a DataError naming the source and line."""
    for src in source_files(spec, split):
        yield src.name, [row for batch in iter_source_rows(src) for row in batch]


def row_error(row: Any, *, source: str, index: int) -> DataError | None:
    """The DataError for a row :func:`read_rows` could not parse or that is not an object, else None."""
    if isinstance(row, _Unreadable):
        return DataError(row.reason, kind=row.kind, source=source, index=index)
    if not isinstance(row, Mapping):
        return DataError(
            f"wrong type: a record must be an object, got {_type(row)}",
            kind="wrong_type",
            source=source,
            index=index,
        )
    return None


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One source a data spec expands to: ``name`` (what errors call it), ``kind`` (``file``, ``saved``: a
    ``datasets.save_to_disk`` directory, ``hub``: a dataset in the local Hugging Face cache) and the
    ``split`` it is read with (saved and hub sources only)."""

    name: str
    kind: str
    split: str | None = None


def source_files(spec: str, split: str | None) -> list[SourceFile]:
    """The sources a data spec expands to, in reading order (nothing is read yet; a spec that matches no
    source raises DataError naming it)."""
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        return [SourceFile(path, "file")]
    if os.path.isdir(path):
        if _is_saved_dataset(path):
            return [SourceFile(path, "saved", split)]
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(_FILE_SUFFIXES))
        if not files:
            raise DataError(
                "not a datasets.save_to_disk directory and holds no .jsonl/.json/.parquet files", source=path
            )
        return [SourceFile(f, "file") for f in files]
    if glob.has_magic(path):
        files = sorted(f for f in glob.glob(path) if os.path.isfile(f))
        if not files:
            raise DataError("no file matches this pattern", source=spec)
        return [SourceFile(f, "file") for f in files]
    if _HUB_NAME.match(spec):
        return [SourceFile(spec, "hub", split)]
    raise DataError("no such file or directory", source=spec)


def source_fingerprint(src: SourceFile, memo: dict | None = None) -> str:
    """The content identity of one source: sha256 of a file's bytes (of every file of a saved dataset),
    datasets' own fingerprint for a hub dataset. ``memo`` (path -> {size, mtime_ns, sha256}) spares
    rehashing a file whose size and modification time are unchanged; a copied file gets a new mtime, is
    hashed again, and keeps its identity."""
    if src.kind == "file":
        return "file:" + _hash_file(src.name, memo)
    if src.kind == "saved":
        digest = hashlib.sha256()
        for root, dirs, files in os.walk(src.name):
            dirs.sort()
            for f in sorted(files):
                full = os.path.join(root, f)
                digest.update(os.path.relpath(full, src.name).encode())
                digest.update(_hash_file(full, memo).encode())
        return f"saved:{digest.hexdigest()}:{src.split}"
    return f"hub:{src.name}:{_open_dataset(src)._fingerprint}"


def iter_source_rows(src: SourceFile, batch_rows: int = 10_000) -> Iterator[list]:
    """The raw rows of one source in order, ``batch_rows`` at a time (JSON Lines and Parquet are streamed;
    a JSON array is parsed whole). An unparsable JSON line comes back as a row that
    :func:`normalise_record` / :func:`row_error` turn into a DataError naming the source and line."""
    if src.kind != "file":
        ds = _open_dataset(src)
        for start in range(0, len(ds), batch_rows):
            yield ds.select(range(start, min(start + batch_rows, len(ds)))).to_list()
        return
    lower = src.name.lower()
    if lower.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        try:
            for batch in pq.ParquetFile(src.name).iter_batches(batch_size=batch_rows):
                yield batch.to_pylist()
        except Exception as err:  # pyarrow raises several types for corrupt files
            raise DataError(f"cannot read Parquet: {err}", source=src.name) from err
    elif lower.endswith((".jsonl", ".json")):
        with open(src.name, encoding="utf-8") as f:
            head = f.read(4096)
            f.seek(0)
            if lower.endswith(".json") and head.lstrip().startswith("["):
                try:
                    rows = json.load(f)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"invalid JSON array: {err}", source=src.name, kind="invalid_json"
                    ) from err
                for start in range(0, len(rows), batch_rows):
                    yield rows[start : start + batch_rows]
                return
            for lines in _json_lines(f, batch_rows):
                yield [parse_json_row(text, lineno) for text, lineno in lines]
    else:
        raise DataError(
            "unsupported file type (expected .jsonl, .json, .parquet, or a datasets.save_to_disk directory)",
            source=src.name,
        )


def iter_source_json(src: SourceFile, batch_rows: int = 10_000) -> Iterator[list[tuple[str, int]]]:
    """The rows of one source as (JSON text, line number) in order, ``batch_rows`` at a time, for parsing
    elsewhere (data/prepare.py parses in its workers): a JSON Lines file's lines as they are (line numbers
    from 1; blank lines skipped), any other source's rows serialised (line number 0). A row that cannot be
    serialised becomes a JSON text that :func:`parse_json_row` reports as unreadable."""
    lower = src.name.lower()
    if src.kind == "file" and lower.endswith((".jsonl", ".json")):
        with open(src.name, encoding="utf-8") as f:
            head = f.read(4096)
            f.seek(0)
            if not (lower.endswith(".json") and head.lstrip().startswith("[")):
                yield from _json_lines(f, batch_rows)
                return
    for rows in iter_source_rows(src, batch_rows):
        yield [(_dump_row(row), 0) for row in rows]


def parse_json_row(text: str, lineno: int = 0) -> Any:
    """One row from its JSON text (``iter_source_json``); an unparsable text comes back as a row that
    :func:`normalise_record` reports as ``invalid_json``, naming the line."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        return _Unreadable(f"invalid JSON on line {lineno}: {err.msg} (column {err.colno})")
    if isinstance(row, dict) and _UNSERIALISABLE in row:
        return _Unreadable(row[_UNSERIALISABLE], kind="wrong_type")
    return row


_UNSERIALISABLE = "\x00hdpo_ds.unserialisable"  # no source has this key: it cannot be written as JSON


def _dump_row(row: Any) -> str:
    try:
        return json.dumps(row, ensure_ascii=False)
    except (TypeError, ValueError) as err:  # bytes, dates, NaN keys ... from Parquet or saved datasets
        return json.dumps({_UNSERIALISABLE: f"wrong type: a value cannot be read as JSON ({err})"})


def _json_lines(f, batch_rows: int) -> Iterator[list[tuple[str, int]]]:
    # Lines end at \n, \r or \r\n only: str.splitlines would also cut at U+2028 and other separators that
    # JSON strings may hold raw.
    batch: list[tuple[str, int]] = []
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        batch.append((line, lineno))
        if len(batch) == batch_rows:
            yield batch
            batch = []
    if batch:
        yield batch


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, marker)) for marker in ("dataset_dict.json", "state.json"))


def _open_dataset(src: SourceFile):
    """The (memory-mapped) ``datasets.Dataset`` of a saved or hub source, its split chosen."""
    import datasets

    if src.kind == "saved":
        return _choose_split(datasets.load_from_disk(src.name), src.split, os.path.abspath(src.name))
    with _hub_offline():
        try:
            ds = datasets.load_dataset(src.name)
        except (
            Exception
        ) as err:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
            raise DataError(
                f"not a local file or directory, and not a dataset in the local Hugging Face cache "
                f"({datasets.config.HF_DATASETS_CACHE}); datasets are never downloaded here: fetch it on a "
                f"machine with network access (datasets.load_dataset({src.name!r}) with the same "
                f"HF_DATASETS_CACHE) or point data.train_files at local files ({type(err).__name__}: {err})",
                source=src.name,
            ) from err
    return _choose_split(ds, src.split, src.name)


def _choose_split(ds, split: str | None, name: str):
    import datasets

    if not isinstance(ds, datasets.DatasetDict):
        return ds
    available = sorted(ds)
    if split is None:
        if len(available) == 1:
            split = available[0]
        elif "train" in ds:
            split = "train"
        else:
            raise DataError(
                f"several splits ({', '.join(available)}); choose one with data.split", source=name
            )
    if split not in ds:
        raise DataError(f"no split '{split}' (available: {', '.join(available)})", source=name)
    return ds[split]


@contextlib.contextmanager
def _hub_offline():
    """Force offline resolution for one call: the flags are read at import time, so patch the modules."""
    import datasets.config
    import huggingface_hub.constants

    saved = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _hash_file(path: str, memo: dict | None = None) -> str:
    stat = os.stat(path)
    key = os.path.abspath(path)
    known = None if memo is None else memo.get(key)
    if known and known["size"] == stat.st_size and known["mtime_ns"] == stat.st_mtime_ns:
        return known["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if memo is not None:
        memo[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    return digest.hexdigest()
