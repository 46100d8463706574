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
class LoadResult:
    """What :func:`load_records` returns.

    ``records``: the valid pairs in source order. ``skipped``: how many rows were dropped, per reason
    (``identical_chosen_rejected`` always; the DataError kinds with ``on_bad_record="skip"``).
    ``fingerprint``: sha256 (hex) over the sources' bytes, the split, the row slice and the loader version
    (for a mixture: each entry's weight, split and row slice too); it identifies ``records`` exactly.
    ``num_rows``: rows read after slicing, before validation. ``sources``: the files read.
    ``entries``: the parsed files list (``entries.mixture``: sampled by weight; each record's
    ``source_index`` is its entry). ``source_counts``: per entry, ``rows`` read (validated), ``kept``
    and the skip reasons.
    """

    records: list[PreferenceRecord]
    skipped: collections.Counter[str]
    fingerprint: str
    num_rows: int
    sources: list[str]
    entries: Sources = dataclasses.field(default_factory=lambda: Sources((), False))
    source_counts: list[collections.Counter[str]] = dataclasses.field(default_factory=list)
    sampled_rows: int | None = None  # load_records(sample=...) validated only this many of num_rows


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
    entries = files if isinstance(files, Sources) else _entries(files, key)
    if not entries.specs:
        raise ValueError("no data files given")
    row_slice = parse_rows(rows)

    fp = hashlib.sha256()
    fp.update(RECORDS_FORMAT_VERSION.encode())
    if not entries.mixture:  # unchanged from before mixtures existed: the same data keeps its caches
        fp.update(json.dumps({"split": split, "rows": _slice_repr(row_slice)}, sort_keys=True).encode())
    table: list[tuple[str, int, Any]] = []  # (source, index within source, raw row)
    row_entries: list[int] = []
    sources: list[str] = []
    for e, spec in enumerate(entries.specs):
        entry_split = split if spec.split is None else spec.split
        entry_slice = row_slice if spec.rows is None else parse_rows(spec.rows)
        if entries.mixture:
            fp.update(
                json.dumps(
                    {"weight": spec.weight, "split": entry_split, "rows": _slice_repr(entry_slice)},
                    sort_keys=True,
                ).encode()
            )
        part: list[tuple[str, int, Any]] = []
        for source, source_rows, source_fp in _read_spec(str(spec.path), entry_split):
            sources.append(source)
            fp.update(source_fp.encode())
            part.extend((source, i, row) for i, row in enumerate(source_rows))
        if entries.mixture and entry_slice is not None:
            part = part[entry_slice]
        table.extend(part)
        row_entries.extend([e] * len(part))
    if not entries.mixture and row_slice is not None:
        table = table[row_slice]
        row_entries = row_entries[row_slice]
    return RawTable(table, fp.hexdigest(), sources, row_entries, entries)


def _entries(files, key: str) -> Sources:
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
    (the dry run): then every source is still read and parsed, but only ``sample`` rows, evenly spaced
    over the selected rows (first and last included), are validated and returned
    (``LoadResult.sampled_rows``; ``num_rows`` stays the count of all selected rows).
    """
    if on_bad_record not in ON_BAD_RECORD:
        raise ValueError(
            f"data.on_bad_record must be one of {', '.join(ON_BAD_RECORD)}; got {on_bad_record!r}"
        )
    raw = read_table(files, split=split, rows=rows, key=key)
    table, sources = raw.rows, raw.sources

    records: list[PreferenceRecord] = []
    skipped: collections.Counter[str] = collections.Counter()
    per_entry = [collections.Counter({"rows": 0, "kept": 0}) for _ in raw.entries.specs]
    examples: dict[str, list[str]] = collections.defaultdict(list)
    first_by_id: dict[str, tuple[str, tuple[str, int]]] = {}
    positions = range(len(table))
    if sample is not None and sample < len(table):
        positions = _sample_positions(raw.row_entries, len(raw.entries.specs), sample)
    for position in positions:
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
    sampled = len(positions) if len(positions) < len(table) else None
    return LoadResult(records, skipped, raw.fingerprint, len(table), sources, raw.entries, per_entry, sampled)


def _sample_positions(row_entries: list[int], num_entries: int, sample: int) -> list[int]:
    """About ``sample`` row positions: per entry a share by its row count (at least one row of each
    entry that has rows), evenly spaced over its rows, its first and last included."""
    counts = collections.Counter(row_entries)
    positions, start = [], 0
    for entry in range(num_entries):
        n = counts.get(entry, 0)
        k = min(n, max(1, round(sample * n / len(row_entries)))) if n else 0
        positions += sorted({start + round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})
        start += n
    return positions


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
    for source, rows, _ in _read_spec(spec, split):
        yield source, rows


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


def _read_spec(spec: str, split: str | None) -> Iterator[tuple[str, list, str]]:
    """Yield (source name, rows, content fingerprint) for each source a spec expands to."""
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        yield path, *_read_file(path)
    elif os.path.isdir(path):
        if _is_saved_dataset(path):
            yield path, *_read_saved(path, split)
        else:
            files = sorted(
                os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(_FILE_SUFFIXES)
            )
            if not files:
                raise DataError(
                    "not a datasets.save_to_disk directory and holds no .jsonl/.json/.parquet files",
                    source=path,
                )
            for f in files:
                yield f, *_read_file(f)
    elif glob.has_magic(path):
        files = sorted(f for f in glob.glob(path) if os.path.isfile(f))
        if not files:
            raise DataError("no file matches this pattern", source=spec)
        for f in files:
            yield f, *_read_file(f)
    elif _HUB_NAME.match(spec):
        yield spec, *_read_hub(spec, split)
    else:
        raise DataError("no such file or directory", source=spec)


def _read_file(path: str) -> tuple[list, str]:
    lower = path.lower()
    if lower.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises several types for corrupt files
            raise DataError(f"cannot read Parquet: {err}", source=path) from err
    elif lower.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if lower.endswith(".json") and text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"invalid JSON array: {err}", source=path, kind="invalid_json") from err
        else:
            rows = _parse_json_lines(text)
    else:
        raise DataError(
            "unsupported file type (expected .jsonl, .json, .parquet, or a datasets.save_to_disk directory)",
            source=path,
        )
    return rows, "file:" + _hash_file(path)


def _parse_json_lines(text: str) -> list:
    rows: list = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            rows.append(_Unreadable(f"invalid JSON on line {lineno}: {err.msg} (column {err.colno})"))
    return rows


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, marker)) for marker in ("dataset_dict.json", "state.json"))


def _read_saved(path: str, split: str | None) -> tuple[list, str]:
    import datasets

    ds = datasets.load_from_disk(path)
    name = os.path.abspath(path)
    ds = _choose_split(ds, split, name)
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for f in sorted(files):
            full = os.path.join(root, f)
            digest.update(os.path.relpath(full, path).encode())
            digest.update(_hash_file(full).encode())
    return ds.to_list(), f"saved:{digest.hexdigest()}:{split}"


def _read_hub(name: str, split: str | None) -> tuple[list, str]:
    import datasets

    with _hub_offline():
        try:
            ds = datasets.load_dataset(name)
        except (
            Exception
        ) as err:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
            raise DataError(
                f"not a local file or directory, and not a dataset in the local Hugging Face cache "
                f"({datasets.config.HF_DATASETS_CACHE}); datasets are never downloaded here: fetch it on a "
                f"machine with network access (datasets.load_dataset({name!r}) with the same "
                f"HF_DATASETS_CACHE) or point data.train_files at local files ({type(err).__name__}: {err})",
                source=name,
            ) from err
    ds = _choose_split(ds, split, name)
    return ds.to_list(), f"hub:{name}:{ds._fingerprint}"


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


def _hash_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
