"""Tokenize preference records into (prompt, chosen, rejected) token ids, truncate, and cache as Arrow.

How each record format becomes ids:

- text: ``prompt_ids = special_prefix + tok(prompt)`` where ``special_prefix`` is what the tokenizer itself
  adds in front (BOS for Llama-style tokenizers); the response ids are
  ``tok(prompt + response)[len(tok(prompt)):]`` followed by EOS (unless the text already ends with it);
- chat: the prompt is the template rendered with ``add_generation_prompt=True``, and the full conversation is
  rendered with the response appended; the rendered prompt must be a prefix of the rendered conversation.
  Both texts are tokenized without extra special tokens (the template writes them). The response ids run up
  to and including the last EOS; what a template writes after EOS (often a newline) is never generated and
  is dropped. A template that writes no EOS gets one appended;
- tokens (pre-tokenized): taken as given, EOS included or not (counted as ``missing_eos`` when absent).

The prompt/response boundary is checked for every pair: the ids of the prompt alone must be a prefix of
the ids of prompt + response, else the tokenizer merged tokens across the boundary and the response mask
would be wrong. That raises :class:`DataError` (or, with ``on_bad_record="skip"``, counts
``boundary_merge``).

Truncation (``max_prompt_length`` caps the prompt, ``max_length`` caps prompt + the longer response):
``keep_end`` keeps the end of an over-long prompt (and its leading BOS), ``keep_start`` its start; then
responses that still do not fit are cut at the end (a response can only keep its start); ``drop`` drops the
pair instead. Counted in ``stats``: ``truncated_prompt`` (pairs), ``truncated_response`` and ``lost_eos``
(responses whose EOS was cut off), ``dropped_overlength``, ``identical_after_truncation`` (dropped: no
signal left).

The result is an Arrow table written by ``datasets.map`` under ``cache_dir/tokenized-<fingerprint>``; the
fingerprint covers the records, the tokenizer, the chat template, the lengths and the policy, so a second
run with the same inputs reads the table back instead of tokenizing.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from hdpo_ds.data.records import DataError, LoadResult, PreferenceRecord, content_hash

logger = logging.getLogger(__name__)

# Bump when the tokenization rules change: it is part of every cache fingerprint.
TOKENIZE_VERSION = "hdpo_ds.tokenize/3"  # 2: the `source` column; 3: `record_drop` and the error columns
TRUNCATION_POLICIES = ("keep_end", "keep_start", "drop")

# Per-row flags stored in the Arrow table; the stats are counted from them, so a cached table has its stats.
TRUNCATED_PROMPT = 1
TRUNCATED_CHOSEN = 2
TRUNCATED_REJECTED = 4
LOST_EOS_CHOSEN = 8
LOST_EOS_REJECTED = 16
MISSING_EOS_CHOSEN = 32
MISSING_EOS_REJECTED = 64

STAT_KEYS = (
    "pairs_in",
    "pairs",
    "tokens",
    "truncated_prompt",
    "truncated_response",
    "lost_eos",
    "missing_eos",
    "dropped_overlength",
    "identical_after_truncation",
    "boundary_merge",
    "template_mismatch",
    "bad_token_id",
)


@dataclasses.dataclass
class TokenizedPair:
    """One tokenized pair. ``chosen_ids`` / ``rejected_ids`` are the response tokens only (EOS included when
    ``*_has_eos``); the model sees ``prompt_ids + chosen_ids`` and ``prompt_ids + rejected_ids``."""

    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_has_eos: bool
    rejected_has_eos: bool

    @property
    def chosen_length(self) -> int:
        return len(self.prompt_ids) + len(self.chosen_ids)

    @property
    def rejected_length(self) -> int:
        return len(self.prompt_ids) + len(self.rejected_ids)


class TokenizedPairs(Sequence[TokenizedPair]):
    """The kept pairs, read lazily from a (memory-mapped) Arrow table; indexing gives
    :class:`TokenizedPair`."""

    def __init__(self, table: Any, keep: np.ndarray) -> None:
        self._table = table  # pyarrow.Table with all rows, dropped ones included
        self._keep = np.asarray(keep, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._keep)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return self.get_many(range(*index.indices(len(self))))
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"pair index {index} out of range for {n} pairs")
        row = self._table.slice(int(self._keep[index]), 1).to_pylist()[0]
        return _pair_from_row(row)

    def __iter__(self) -> Iterator[TokenizedPair]:
        for start in range(0, len(self), 1024):
            yield from self.get_many(range(start, min(start + 1024, len(self))))

    def get_many(self, indices) -> list[TokenizedPair]:
        """Pairs at several positions, read in one Arrow ``take``."""
        rows = self._table.take(self._keep[np.asarray(list(indices), dtype=np.int64)]).to_pylist()
        return [_pair_from_row(row) for row in rows]

    @property
    def ids(self) -> list[str]:
        return self._table.column("id").take(self._keep).to_pylist()

    @property
    def id_array(self):
        """The pair ids as one pyarrow string array (no Python object per pair)."""
        return self._table.column("id").take(self._keep).combine_chunks()

    @property
    def sources(self) -> np.ndarray:
        """(num_pairs,) int64: the files-list entry (``PreferenceRecord.source_index``) of each pair."""
        return self._table.column("source").take(self._keep).to_numpy().astype(np.int64)

    @property
    def lengths(self) -> np.ndarray:
        """(num_pairs, 2) int64: tokens of the chosen sequence (prompt + chosen) and of the rejected one."""
        import pyarrow.compute as pc

        # from the list offsets alone: a ``take`` of the list columns would copy every token id
        cols = [
            pc.list_value_length(self._table.column(name)).to_numpy(zero_copy_only=False)[self._keep]
            for name in ("prompt_ids", "chosen_ids", "rejected_ids")
        ]
        prompt = cols[0].astype(np.int64)
        return np.stack([prompt + cols[1], prompt + cols[2]], axis=1)


@dataclasses.dataclass
class TokenizeResult:
    """``pairs``: the kept pairs in record order. ``stats``: counts (see ``STAT_KEYS``). ``fingerprint``: the
    cache key. ``from_cache``: whether the table was read back rather than built. ``cache_path``: its
    directory (None without ``cache_dir``). ``source_stats``: per files-list entry, ``pairs_in``,
    ``pairs`` (kept) and the drop reasons."""

    pairs: TokenizedPairs
    stats: collections.Counter[str]
    fingerprint: str
    from_cache: bool
    cache_path: str | None
    source_stats: list[collections.Counter[str]] = dataclasses.field(default_factory=list)


def tokenize_pairs(
    records: Sequence[PreferenceRecord] | LoadResult,
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int,
    truncation: str = "keep_end",
    chat_template: str | None = None,
    cache_dir: str | None = None,
    is_main_process: bool = True,
    barrier: Callable[[], None] | None = None,
    on_bad_record: str = "error",
    data_fingerprint: str | None = None,
    num_proc: int | None = None,
) -> TokenizeResult:
    """Tokenize and truncate preference records; see the module docstring for the rules.

    ``records``: a list of :class:`PreferenceRecord` or a :class:`LoadResult` (whose fingerprint is then the
    data part of the cache key; for a plain list the records' content is hashed, or ``data_fingerprint`` is
    used when given). ``chat_template``: a Jinja template, or the path of a file holding one; default the
    tokenizer's own (needed only for chat records). ``cache_dir``: where the Arrow table is cached; None
    tokenizes in memory. Distributed use: every rank calls this with the same arguments and ``barrier`` (a
    collective barrier); the main process (``is_main_process``) tokenizes and writes the cache, then all
    ranks meet at ``barrier`` and the others read the cache. ``cache_dir`` must then be shared by the ranks
    that wait on the main process (per node, pass the node's local main as ``is_main_process``).
    """
    num_sources = None
    if isinstance(records, LoadResult):
        data_fingerprint = data_fingerprint or records.fingerprint
        num_sources = len(records.entries.specs) or None
        records = records.records
    _check_lengths(max_length, max_prompt_length, truncation, on_bad_record)
    check_eos(tokenizer)
    template = None
    if any(r.format == "chat" for r in records):
        template = resolve_chat_template(tokenizer, chat_template)
        if template is None:
            raise no_chat_template_error()
    invalid = _validate_token_ids(records, len(tokenizer), on_bad_record)

    data_fp = data_fingerprint or records_fingerprint(records)
    fingerprint = cache_key(
        data_fp, tokenizer, template, max_length, max_prompt_length, truncation, on_bad_record
    )
    build = _builder(
        records,
        invalid,
        tokenizer,
        template,
        max_length,
        max_prompt_length,
        truncation,
        on_bad_record,
        num_proc,
    )

    table, from_cache, path = cached_table(
        build,
        cache_dir,
        f"tokenized-{fingerprint[:40]}",
        fingerprint,
        is_main_process=is_main_process,
        barrier=barrier,
    )

    return tokenize_result(table, fingerprint, from_cache, path, num_sources)


def tokenize_result(
    table, fingerprint: str, from_cache: bool, path: str | None, num_sources
) -> TokenizeResult:
    """The :class:`TokenizeResult` of a tokenized table (counts logged); ``num_sources``: the files-list
    entries (None: the largest ``source`` + 1)."""
    pairs, stats = _summarise(table)
    source_stats = _source_stats(table, num_sources)
    for key in (
        "dropped_overlength",
        "identical_after_truncation",
        "boundary_merge",
        "template_mismatch",
        "bad_token_id",
    ):
        if stats[key]:
            logger.warning("tokenization dropped %d pair(s): %s", stats[key], key.replace("_", " "))
    for key in ("truncated_prompt", "truncated_response", "lost_eos", "missing_eos"):
        if stats[key]:
            logger.info("tokenization: %d %s", stats[key], key.replace("_", " "))
    return TokenizeResult(pairs, stats, fingerprint, from_cache, path, source_stats)


def cached_table(
    build: Callable[[str | None], Any],
    cache_dir: str | None,
    name: str,
    fingerprint: str,
    *,
    is_main_process: bool = True,
    barrier: Callable[[], None] | None = None,
) -> tuple[Any, bool, str | None]:
    """The Arrow table `build(cache_file)` makes, cached at `cache_dir/name` (written atomically by the main
    process, read back by later runs and by the other ranks after `barrier`). Returns (table, from_cache,
    cache path); without `cache_dir`, `build(None)` in memory. Shared by the preference and SFT tokenizers."""
    if cache_dir is None:
        return build(None), False, None
    path = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), name)
    built_here = False
    if is_main_process and not _cache_complete(path):
        _write_cache(path, build, fingerprint)
        built_here = True
    if barrier is not None:
        barrier()  # the other ranks wait here until the main process has written the cache
    if _cache_complete(path):
        return _read_cache(path), not built_here, path
    if barrier is None and not is_main_process:
        logger.warning("no barrier given and no cache at %s yet: tokenizing in memory on this rank", path)
        return build(None), False, None
    raise RuntimeError(
        f"the main process did not leave a tokenization cache at {path}; is cache_dir on a filesystem "
        "shared by the ranks that wait on it?"
    )


def truncate_prompt(
    prompt: list[int], max_prompt_length: int, truncation: str, prefix: list[int]
) -> list[int]:
    """An over-long prompt cut to `max_prompt_length`: keep_start keeps its start; keep_end its end and its
    leading special `prefix` (BOS). Shared by the preference and SFT tokenizers."""
    if truncation == "keep_start":
        return prompt[:max_prompt_length]
    # Keep the leading BOS: models lean on it, and it carries no content worth truncating.
    head = prefix if prefix and prompt[: len(prefix)] == prefix else []
    head = head if len(head) < max_prompt_length else []
    return head + prompt[len(prompt) - (max_prompt_length - len(head)) :]


def resolve_chat_template(tokenizer: Any, chat_template: str | None = None) -> str | None:
    """The chat template to use: ``chat_template`` (template text, or a file path if it names an existing file
    and has no ``{``), else the tokenizer's own, else None."""
    if chat_template:
        if "{" not in chat_template and os.path.isfile(os.path.expanduser(chat_template)):
            with open(os.path.expanduser(chat_template), encoding="utf-8") as f:
                return f.read()
        return chat_template
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: "default" is the one apply_chat_template uses
        template = template.get("default")
    return template or None


def tokenizer_fingerprint(tokenizer: Any, chat_template: str | None = None) -> str:
    """sha256 (hex) of everything that decides token ids: the tokenizer's full definition (vocabulary,
    merges, normalizer, pre-tokenizer, post-processor, added tokens), its special tokens and the chat
    template (``chat_template`` if given, else the tokenizer's)."""
    digest = hashlib.sha256()
    digest.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:  # slow tokenizers: the vocabulary is the best available description
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": getattr(tokenizer, "pad_token_id", None),
        "added": sorted((int(i), str(t)) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()),
    }
    digest.update(json.dumps(special).encode())
    digest.update((resolve_chat_template(tokenizer, chat_template) or "").encode())
    return digest.hexdigest()


def records_fingerprint(records: Sequence[PreferenceRecord]) -> str:
    """sha256 (hex) over every record's id and content, in order."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(r.id.encode())
        digest.update(content_hash(r.content()).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- internals


def cache_key(
    data_fp: str,
    tokenizer: Any,
    template: str | None,
    max_length: int,
    max_prompt_length: int,
    truncation: str,
    on_bad_record: str,
    prefix: tuple[str, ...] = (),
) -> str:
    """The tokenized table's cache key: sha256 over ``prefix`` (a caller's own version), the rules'
    version, the data's fingerprint, the tokenizer and template, the lengths and the bad-record policy."""
    key = [
        *prefix,
        TOKENIZE_VERSION,
        data_fp,
        tokenizer_fingerprint(tokenizer, template),
        max_length,
        max_prompt_length,
        truncation,
        on_bad_record,
    ]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def check_eos(tokenizer: Any) -> None:
    """Responses end with EOS: a tokenizer without one cannot tokenize preference pairs."""
    if tokenizer.eos_token_id is None:
        raise DataError(
            "the tokenizer has no EOS token: responses must end with one (set tokenizer.eos_token)",
            source="model.tokenizer",
            kind="no_eos_token",
        )


def no_chat_template_error() -> DataError:
    return DataError(
        "the data holds conversations (lists of messages) but the tokenizer has no chat template; "
        "give one in data.chat_template (a Jinja template file)",
        source="data.chat_template",
        kind="no_chat_template",
    )


def _check_lengths(max_length: int, max_prompt_length: int, truncation: str, on_bad_record: str) -> None:
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"data.max_length must be an integer >= 2, got {max_length!r}")
    if not isinstance(max_prompt_length, int) or not 1 <= max_prompt_length < max_length:
        raise ValueError(
            f"data.max_prompt_length must be an integer in [1, data.max_length - 1] = [1, {max_length - 1}] "
            f"(a response needs at least one token), got {max_prompt_length!r}"
        )
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(
            f"data.truncation must be one of {', '.join(TRUNCATION_POLICIES)}, got {truncation!r}"
        )
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"data.on_bad_record must be one of error, skip; got {on_bad_record!r}")


def token_id_error(record: PreferenceRecord, vocab_size: int) -> DataError | None:
    """The DataError of a pre-tokenized record with an id outside the vocabulary, else None."""
    if not record.tokenized:
        return None
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        ids = getattr(record, name)
        if ids and max(ids) >= vocab_size:
            bad = next(t for t in ids if t >= vocab_size)
            return DataError(
                f"token id {bad} is outside the tokenizer's vocabulary (size {vocab_size})",
                source=record.source,
                index=record.index,
                field=name,
                kind="bad_token_id",
            )
    return None


def _validate_token_ids(
    records: Sequence[PreferenceRecord], vocab_size: int, on_bad_record: str
) -> list[str]:
    """Check pre-tokenized ids against the vocabulary before anything is tokenized; '' or a drop reason."""
    invalid = [""] * len(records)
    for i, r in enumerate(records):
        err = token_id_error(r, vocab_size)
        if err is not None:
            if on_bad_record == "error":
                raise err
            logger.warning("%s", err)
            invalid[i] = "bad_token_id"
    return invalid


def _builder(
    records, invalid, tokenizer, template, max_length, max_prompt_length, truncation, on_bad_record, num_proc
):
    """A closure that builds the Arrow table with ``datasets.map`` (written to ``cache_file`` if given)."""

    def build(cache_file: str | None):
        import datasets

        if not records:  # datasets.map writes nothing for an empty table, not even its schema
            table = _OUT_FEATURES().arrow_schema.empty_table()
            if cache_file is not None:
                write_arrow(table, cache_file)
            return table

        source = datasets.Dataset.from_dict(
            tokenize_columns(records, [r.source_index for r in records], invalid),
            features=datasets.Features(
                {
                    "id": datasets.Value("string"),
                    "kind": datasets.Value("string"),
                    "text": datasets.Value("string"),
                    "prompt_ids": datasets.List(datasets.Value("int64")),
                    "chosen_ids": datasets.List(datasets.Value("int64")),
                    "rejected_ids": datasets.List(datasets.Value("int64")),
                    "source": datasets.Value("string"),
                    "index": datasets.Value("int64"),
                    "source_index": datasets.Value("int32"),
                    "invalid": datasets.Value("string"),
                }
            ),
        )
        fn = _Tokenize(tokenizer, template, max_length, max_prompt_length, truncation, on_bad_record)
        out = source.map(
            fn,
            batched=True,
            batch_size=1000,
            remove_columns=source.column_names,
            features=_OUT_FEATURES(),
            keep_in_memory=cache_file is None,
            cache_file_name=cache_file,
            load_from_cache_file=False,  # we keep our own cache key; a stale file must never be reused
            new_fingerprint=hashlib.sha256(str(cache_file).encode()).hexdigest()[:16],
            num_proc=num_proc,
            desc="tokenize preference pairs",
        )
        return out.data.table

    return build


def _OUT_FEATURES():
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "prompt_ids": ids,
            "chosen_ids": ids,
            "rejected_ids": ids,
            "chosen_has_eos": datasets.Value("bool"),
            "rejected_has_eos": datasets.Value("bool"),
            "flags": datasets.Value("int32"),
            "drop": datasets.Value("string"),
            "source": datasets.Value("int32"),  # the files-list entry (data/mixture.py) the pair came from
            # data/prepare.py validates in the same pass: why a row failed validation ("" if it did not)
            "record_drop": datasets.Value("string"),
            # the DataError that dropped the row (either stage), to name it in the log or raise it later
            "error": datasets.Value("string"),
            "error_source": datasets.Value("string"),
            "error_index": datasets.Value("int64"),
            "error_field": datasets.Value("string"),
        }
    )


def tokenize_columns(
    records: Sequence[PreferenceRecord], source_index: Sequence[int], invalid: Sequence[str]
) -> dict[str, list]:
    """The input columns of ``_Tokenize`` for ``records``: their ids, formats, texts (JSON) or token ids,
    places, files-list entries (``source_index``) and token-id check results (``invalid``)."""
    return {
        "id": [r.id for r in records],
        "kind": [r.format for r in records],
        "text": ["" if r.tokenized else json.dumps([r.prompt, r.chosen, r.rejected]) for r in records],
        "prompt_ids": [list(r.prompt_ids or ()) for r in records],
        "chosen_ids": [list(r.chosen_ids or ()) for r in records],
        "rejected_ids": [list(r.rejected_ids or ()) for r in records],
        "source": [r.source for r in records],
        "index": [r.index for r in records],
        "source_index": list(source_index),
        "invalid": list(invalid),
    }


def write_arrow(table, path: str) -> None:
    """``table`` as an Arrow stream file at ``path`` (the format ``datasets.Dataset.from_file`` maps)."""
    import pyarrow as pa

    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def error_columns(err: DataError | None) -> dict:
    """The error columns of one output row (``_OUT_FEATURES``) for ``err`` (None: no error)."""
    if err is None:
        return {"error": "", "error_source": "", "error_index": -1, "error_field": ""}
    return {
        "error": err.reason,
        "error_source": "" if err.source is None else str(err.source),
        "error_index": -1 if err.index is None else int(err.index),
        "error_field": err.field or "",
    }


def error_from_row(row: dict, kind: str) -> DataError:
    """The DataError a row's error columns (``error_columns``) describe."""
    return DataError(
        row["error"],
        source=row["error_source"] or None,
        index=None if row["error_index"] < 0 else row["error_index"],
        field=row["error_field"] or None,
        kind=kind,
    )


class _Tokenize:
    """The ``datasets.map`` function (batched): raw records -> ids, flags and a drop reason per row."""

    def __init__(
        self, tokenizer, template, max_length, max_prompt_length, truncation, on_bad_record, collect=False
    ):
        # collect: never raise; every error goes to the error columns (data/prepare.py raises the first
        # one in row order once the whole pass is done, whichever worker met it)
        self.collect = collect
        self.tok = tokenizer
        self.template = template
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation = truncation
        self.on_bad_record = on_bad_record
        self.eos = tokenizer.eos_token_id
        self.prefix = special_prefix(tokenizer)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        n = len(batch["id"])
        # Render every text first, then tokenize all of them in one batched call (fast tokenizers
        # parallelise).
        texts: list[str] = []
        spans: list[tuple[int, int, int] | None] = []  # positions of prompt, prompt+chosen, prompt+rejected
        errors: list[DataError | None] = [None] * n
        for i in range(n):
            if batch["kind"][i] == "tokens" or batch["invalid"][i]:
                spans.append(None)
                continue
            prompt, chosen, rejected = json.loads(batch["text"][i])
            try:
                rendered = self._render(batch["kind"][i], prompt, chosen, rejected, batch, i)
            except DataError as err:
                errors[i] = err
                spans.append(None)
                continue
            spans.append((len(texts), len(texts) + 1, len(texts) + 2))
            texts.extend(rendered)
        encoded = (
            self.tok(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
            if texts
            else []
        )

        out: dict[str, list] = {k: [] for k in _OUT_FEATURES()}
        for i in range(n):
            drop = batch["invalid"][i]
            flags = 0
            p = c = r = []
            if not drop and errors[i] is None:
                try:
                    if spans[i] is None:
                        p, c, r = batch["prompt_ids"][i], batch["chosen_ids"][i], batch["rejected_ids"][i]
                        flags |= (MISSING_EOS_CHOSEN if c[-1] != self.eos else 0) | (
                            MISSING_EOS_REJECTED if r[-1] != self.eos else 0
                        )
                    else:
                        p, c, r = self._split(batch["kind"][i], [encoded[j] for j in spans[i]], batch, i)
                except DataError as err:
                    errors[i] = err
            if errors[i] is not None:
                if self.on_bad_record == "error" and not self.collect:
                    raise errors[i]
                if not self.collect:
                    logger.warning("%s", errors[i])
                drop = errors[i].kind
            if not drop:
                p, c, r, flags, drop = self._truncate(p, c, r, flags)
            if drop:
                p = c = r = []
            out["id"].append(batch["id"][i])
            out["prompt_ids"].append(p)
            out["chosen_ids"].append(c)
            out["rejected_ids"].append(r)
            out["chosen_has_eos"].append(bool(c) and c[-1] == self.eos)
            out["rejected_has_eos"].append(bool(r) and r[-1] == self.eos)
            out["flags"].append(flags)
            out["drop"].append(drop)
            out["source"].append(batch["source_index"][i])
            out["record_drop"].append("")
            for name, value in error_columns(errors[i]).items():
                out[name].append(value)
        return out

    def _render(self, kind, prompt, chosen, rejected, batch, i) -> list[str]:
        if kind == "text":
            return [prompt, prompt + chosen, prompt + rejected]
        try:
            prompt_text = self.tok.apply_chat_template(
                prompt, tokenize=False, add_generation_prompt=True, chat_template=self.template
            )
            full = [
                self.tok.apply_chat_template(prompt + resp, tokenize=False, chat_template=self.template)
                for resp in (chosen, rejected)
            ]
        except Exception as err:  # jinja2 raises TemplateError subclasses and whatever the template raises
            raise DataError(
                f"the chat template failed to render this conversation: {type(err).__name__}: {err}",
                source=batch["source"][i],
                index=batch["index"][i],
                field="prompt",
                kind="template_mismatch",
            ) from err
        for name, text in zip(("chosen", "rejected"), full, strict=True):
            if not text.startswith(prompt_text):
                raise DataError(
                    "the chat template renders the prompt (with add_generation_prompt=True) differently from "
                    "the start of the whole conversation, so prompt and response cannot be told apart",
                    source=batch["source"][i],
                    index=batch["index"][i],
                    field=name,
                    kind="template_mismatch",
                )
        return [prompt_text, *full]

    def _split(self, kind, encoded, batch, i) -> tuple[list[int], list[int], list[int]]:
        prompt_ids, *full_ids = encoded
        responses = []
        for name, ids in zip(("chosen", "rejected"), full_ids, strict=True):
            if ids[: len(prompt_ids)] != prompt_ids:
                k = next(
                    (j for j, (a, b) in enumerate(zip(prompt_ids, ids, strict=False)) if a != b), len(ids)
                )
                raise DataError(
                    "tokenizer merges across the prompt/response boundary: the prompt alone tokenizes to "
                    f"{self.tok.convert_ids_to_tokens(prompt_ids[k:])} at its end but prompt + response to "
                    f"{self.tok.convert_ids_to_tokens(ids[k : max(len(prompt_ids), k + 1)])}; "
                    "end the prompt where a token ends (e.g. move trailing whitespace from the prompt to the "
                    "start of the response)",
                    source=batch["source"][i],
                    index=batch["index"][i],
                    field=name,
                    kind="boundary_merge",
                )
            resp = list(ids[len(prompt_ids) :])
            if kind == "chat" and self.eos in resp:
                # What the template writes after EOS (a newline, ...) is never generated: stop at EOS.
                resp = resp[: len(resp) - resp[::-1].index(self.eos)]
            elif not resp or resp[-1] != self.eos:
                resp.append(self.eos)
            responses.append(resp)
        if kind == "text":
            prompt_ids = self.prefix + list(prompt_ids)
        return list(prompt_ids), responses[0], responses[1]

    def _truncate(self, p, c, r, flags):
        max_prompt, max_len = self.max_prompt_length, self.max_length
        over = len(p) > max_prompt or len(p) + max(len(c), len(r)) > max_len
        if not over:
            return p, c, r, flags, ""
        if self.truncation == "drop":
            return p, c, r, flags, "dropped_overlength"
        if len(p) > max_prompt:
            flags |= TRUNCATED_PROMPT
            p = truncate_prompt(p, max_prompt, self.truncation, self.prefix)
        room = max_len - len(p)
        if len(c) > room:
            flags |= TRUNCATED_CHOSEN | (LOST_EOS_CHOSEN if c[-1] == self.eos else 0)
            c = c[:room]
        if len(r) > room:
            flags |= TRUNCATED_REJECTED | (LOST_EOS_REJECTED if r[-1] == self.eos else 0)
            r = r[:room]
        if c == r:
            return p, c, r, flags, "identical_after_truncation"
        return p, c, r, flags, ""


def encode_prompt(tokenizer, prompt: str | list[dict], chat_template: str | None = None) -> list[int]:
    """The ids a prompt has in training (the rules at the top of this module): a text prompt is the
    tokenizer's special prefix + its tokens; a conversation is rendered with the chat template and
    add_generation_prompt=True. Sampling (hdpo_ds/recipes/evaluate.py) and SFT (hdpo_ds/recipes/sft.py) start
    from these."""
    if isinstance(prompt, str):
        return special_prefix(tokenizer) + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    template = resolve_chat_template(tokenizer, chat_template)
    text = tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True, chat_template=template
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts in front of a text (BOS for Llama-style tokenizers)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for k in range(len(with_special) - len(plain) + 1):
        if with_special[k : k + len(plain)] == plain:
            return list(with_special[:k])
    return []


def _pair_from_row(row: dict) -> TokenizedPair:
    return TokenizedPair(
        row["id"],
        row["prompt_ids"],
        row["chosen_ids"],
        row["rejected_ids"],
        row["chosen_has_eos"],
        row["rejected_has_eos"],
    )


def _drop_reasons(table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(validated, keep, codes, reasons) of a tokenized table: a boolean mask of the rows that passed
    validation (``record_drop`` empty), the positions of the kept pairs, and each row's tokenization drop
    reason as a code into ``reasons`` ('' for kept). Vectorised in Arrow: no Python object per row."""
    import pyarrow.compute as pc

    validated = pc.equal(table.column("record_drop"), "").to_numpy(zero_copy_only=False)
    drop = table.column("drop").combine_chunks().dictionary_encode()
    reasons = np.asarray(drop.dictionary.to_pylist(), dtype=object)
    codes = drop.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    empty = np.flatnonzero(reasons == "")
    kept_code = int(empty[0]) if len(empty) else -1
    keep = np.flatnonzero(validated & (codes == kept_code))
    return validated, keep, codes, reasons


def _summarise(table) -> tuple[TokenizedPairs, collections.Counter[str]]:
    import pyarrow.compute as pc

    validated, keep, codes, reasons = _drop_reasons(table)
    flags = table.column("flags").to_numpy()
    kept_flags = flags[keep]
    stats: collections.Counter[str] = collections.Counter(dict.fromkeys(STAT_KEYS, 0))
    stats["pairs_in"] = int(np.count_nonzero(validated))
    stats["pairs"] = len(keep)
    for code, count in enumerate(np.bincount(codes[validated], minlength=len(reasons))):
        if reasons[code] and count:
            stats[reasons[code]] += int(count)
    stats["truncated_prompt"] = int(np.count_nonzero(kept_flags & TRUNCATED_PROMPT))
    stats["truncated_response"] = int(
        np.count_nonzero(kept_flags & TRUNCATED_CHOSEN) + np.count_nonzero(kept_flags & TRUNCATED_REJECTED)
    )
    stats["lost_eos"] = int(
        np.count_nonzero(kept_flags & LOST_EOS_CHOSEN) + np.count_nonzero(kept_flags & LOST_EOS_REJECTED)
    )
    stats["missing_eos"] = int(
        np.count_nonzero(kept_flags & MISSING_EOS_CHOSEN)
        + np.count_nonzero(kept_flags & MISSING_EOS_REJECTED)
    )
    lengths = [
        pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False)[keep].astype(np.int64)
        for name in ("prompt_ids", "chosen_ids", "rejected_ids")
    ]
    stats["tokens"] = int((2 * lengths[0] + lengths[1] + lengths[2]).sum())
    return TokenizedPairs(table, keep), stats


def _source_stats(table, num_sources: int | None) -> list[collections.Counter[str]]:
    """Per source index (``num_sources`` of them, default the largest index + 1), over the rows that passed
    validation: pairs in, pairs kept, and the count of each tokenization drop reason."""
    sources = table.column("source").to_numpy().astype(np.int64)
    validated, _, codes, reasons = _drop_reasons(table)
    if num_sources is None:
        num_sources = int(sources.max()) + 1 if len(sources) else 0
    out = []
    for s in range(num_sources):
        mine = codes[validated & (sources == s)]
        per_code = np.bincount(mine, minlength=len(reasons))
        counts = collections.Counter({"pairs_in": len(mine), "pairs": 0})
        for code, count in enumerate(per_code):
            if count:
                counts["pairs" if reasons[code] == "" else reasons[code]] += int(count)
        out.append(counts)
    return out


def _cache_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "meta.json"))


def _write_cache(path: str, build, fingerprint: str) -> None:
    """Build into a temporary directory beside ``path`` and rename it into place, so that a reader never sees
    a half-written table (an interrupted run leaves only a temporary directory behind)."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        table = build(os.path.join(tmp, "data.arrow"))
        # a map over several workers leaves one file per worker (data_<k>_of_<n>.arrow), in row order
        files = sorted(f for f in os.listdir(tmp) if f.startswith("data") and f.endswith(".arrow"))
        meta = {
            "fingerprint": fingerprint,
            "version": TOKENIZE_VERSION,
            "rows": table.num_rows,
            "files": files,
        }
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)
        del table  # release the memory map before the rename
        try:
            os.replace(tmp, path)
        except OSError:
            if not _cache_complete(path):  # another writer can only have produced the same table
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(path: str):
    """The cached table, memory-mapped: its files (meta.json's ``files``) concatenated in order."""
    import datasets
    import pyarrow as pa

    with open(os.path.join(path, "meta.json")) as f:
        files = json.load(f).get("files", ["data.arrow"])
    tables = [datasets.Dataset.from_file(os.path.join(path, name)).data.table for name in files]
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)
