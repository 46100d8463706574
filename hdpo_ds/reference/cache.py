"""The offline reference cache: per-pair reference log-probs in Arrow, keyed by pair id.

Layout of a cache directory (one per data split):

    manifest.json          written last, atomically: the fingerprint, the pair count, and every shard
                           with its row count and sha256. No manifest = no cache (an interrupted
                           precompute leaves shards but no manifest, and is resumed, never read).
    shard-00000.arrow      Arrow IPC files of `reference.shard_pairs` consecutive pairs each, written
    shard-00001.arrow      atomically (temporary name, fsync, rename); the fingerprint is in their
                           schema metadata.

Columns: `id` (string), `ref_chosen_logps`, `ref_rejected_logps` (float64: sums over the response
tokens, accumulated in float64), `chosen_tokens`, `rejected_tokens` (int64).

The fingerprint names everything the values depend on: the reference model (resolved path, sha256 of its
config and of its weight files' bytes, or the seed of a from-scratch init), the data, the tokenizer
and chat template, the lengths and truncation, and the dtype. A mismatch is an error that lists the
differing entries; it is never recomputed silently. Package versions are recorded beside it and only
warned about when they differ (numerics may move by float rounding, not by meaning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hdpo_ds.common.atomic import fsync_dir, write_json

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = "1"
MANIFEST = "manifest.json"
COLUMNS = ("id", "ref_chosen_logps", "ref_rejected_logps", "chosen_tokens", "rejected_tokens")

__all__ = [
    "CACHE_FORMAT_VERSION",
    "RefCache",
    "RefCacheError",
    "cache_status",
    "diff_fingerprints",
    "file_sha256",
    "read_manifest",
    "shard_path",
    "write_manifest",
    "write_shard",
]


class RefCacheError(ValueError):
    """The reference cache cannot be used: the message says what differs or what is broken."""


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def shard_path(cache_dir: str, index: int) -> str:
    return os.path.join(cache_dir, f"shard-{index:05d}.arrow")


def write_shard(cache_dir: str, index: int, columns: dict[str, Sequence], fingerprint: dict) -> str:
    """Write one shard atomically; returns its sha256."""
    import pyarrow as pa

    table = pa.table(
        {
            "id": pa.array(columns["id"], pa.string()),
            "ref_chosen_logps": pa.array(columns["ref_chosen_logps"], pa.float64()),
            "ref_rejected_logps": pa.array(columns["ref_rejected_logps"], pa.float64()),
            "chosen_tokens": pa.array(columns["chosen_tokens"], pa.int64()),
            "rejected_tokens": pa.array(columns["rejected_tokens"], pa.int64()),
        }
    )
    meta = {
        b"hdpo_ds.fingerprint": json.dumps(fingerprint, sort_keys=True).encode(),
        b"hdpo_ds.shard": str(index).encode(),
    }
    table = table.replace_schema_metadata(meta)
    final = shard_path(cache_dir, index)
    tmp = f"{final}.tmp-{os.getpid()}"
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(cache_dir)
    return file_sha256(final)


def read_shard(path: str):
    """Read one shard fully; a truncated or foreign file raises RefCacheError naming it."""
    import pyarrow as pa

    try:
        with pa.memory_map(path, "r") as source:
            table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise RefCacheError(
            f"reference cache shard {path} is unreadable (truncated or corrupt?): {e}"
        ) from None
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise RefCacheError(f"reference cache shard {path} lacks columns {missing}")
    return table


def write_manifest(
    cache_dir: str, fingerprint: dict, versions: dict, shards: list[dict], num_pairs: int
) -> None:
    manifest = {
        "format": CACHE_FORMAT_VERSION,
        "fingerprint": fingerprint,
        "versions": versions,
        "num_pairs": num_pairs,
        "shards": shards,
    }
    write_json(os.path.join(cache_dir, MANIFEST), manifest)


def read_manifest(cache_dir: str) -> dict | None:
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise RefCacheError(f"reference cache manifest {path} is not valid JSON: {e}") from None
    if manifest.get("format") != CACHE_FORMAT_VERSION:
        raise RefCacheError(
            f"reference cache {cache_dir} has format {manifest.get('format')!r}, "
            f"this version reads {CACHE_FORMAT_VERSION!r}"
        )
    return manifest


def diff_fingerprints(cached: dict, expected: dict) -> list[str]:
    """Human-readable differences, one line per entry: 'name: cached -> now'."""
    lines = []
    for key in sorted(set(cached) | set(expected)):
        if cached.get(key) != expected.get(key):
            lines.append(f"{key}: {cached.get(key)!r} in the cache, {expected.get(key)!r} now")
    return lines


def cache_status(cache_dir: str, expected: dict) -> tuple[str, list[str]]:
    """("ok", []), ("missing", []) or ("stale", differences) for a cache directory."""
    manifest = read_manifest(cache_dir)
    if manifest is None:
        return "missing", []
    differences = diff_fingerprints(manifest["fingerprint"], expected)
    return ("stale", differences) if differences else ("ok", [])


@dataclass
class RefCache:
    """A validated cache, ready for lookups by pair id (``rows_of``: vectorised in Arrow, no Python object
    per pair)."""

    ids: Any  # pyarrow.Array of str: the pair id of each row
    chosen: np.ndarray  # (num_pairs,) float64
    rejected: np.ndarray
    chosen_tokens: np.ndarray
    rejected_tokens: np.ndarray
    path: str
    _index: _HashIndex | None = field(default=None, repr=False)

    @classmethod
    def load(cls, cache_dir: str, expected: dict, versions: dict | None = None) -> RefCache:
        """Read and check everything: fingerprint, shard integrity, row counts, finiteness."""
        manifest = read_manifest(cache_dir)
        if manifest is None:
            raise RefCacheError(
                f"no reference cache at {cache_dir} (no {MANIFEST}; run launch/precompute_ref.py, "
                "or reference.mode=auto to compute it first)"
            )
        differences = diff_fingerprints(manifest["fingerprint"], expected)
        if differences:
            raise RefCacheError(
                f"the reference cache at {cache_dir} is stale:\n  " + "\n  ".join(differences)
            )
        if versions and manifest.get("versions") != versions:
            logger.warning(
                "reference cache %s was computed with %s; now %s",
                cache_dir,
                manifest.get("versions"),
                versions,
            )
        tables = []
        for shard in manifest["shards"]:
            path = os.path.join(cache_dir, shard["file"])
            if not os.path.isfile(path):
                raise RefCacheError(f"reference cache shard {path} is missing")
            table = read_shard(path)
            if table.num_rows != shard["rows"]:
                raise RefCacheError(
                    f"reference cache shard {path} has {table.num_rows} rows, "
                    f"the manifest says {shard['rows']}"
                )
            if file_sha256(path) != shard["sha256"]:
                raise RefCacheError(
                    f"reference cache shard {path} does not match its sha256 in the manifest (modified?)"
                )
            tables.append(table)
        ids = _id_array([t.column("id") for t in tables])
        if len(ids) != manifest["num_pairs"]:
            raise RefCacheError(
                f"reference cache {cache_dir} holds {len(ids)} rows, "
                f"the manifest says {manifest['num_pairs']}"
            )

        def column(name, dtype):
            return (
                np.concatenate([t.column(name).to_numpy() for t in tables]).astype(dtype)
                if tables
                else np.zeros(0, dtype)
            )

        chosen, rejected = column("ref_chosen_logps", np.float64), column("ref_rejected_logps", np.float64)
        bad = ~(np.isfinite(chosen) & np.isfinite(rejected))
        if bad.any():
            examples = ids.take(np.flatnonzero(bad)[:5]).to_pylist()
            raise RefCacheError(
                f"reference cache {cache_dir} has {int(bad.sum())} non-finite value(s), "
                f"e.g. pair ids {examples}"
            )
        import pyarrow.compute as pc

        if pc.count_distinct(ids).as_py() != len(ids):
            raise RefCacheError(f"reference cache {cache_dir} holds duplicate pair ids")
        return cls(
            ids,
            chosen,
            rejected,
            column("chosen_tokens", np.int64),
            column("rejected_tokens", np.int64),
            cache_dir,
        )

    def rows_of(self, pair_ids) -> np.ndarray:
        """(n,) int64: the row of each pair id (a sequence of str or a pyarrow array), -1 where the cache
        has none. Many ids: one Arrow hash join; a micro-batch's few: a sorted 64-bit hash index of the
        cache's ids (built once), each hit confirmed against the id itself."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if len(pair_ids) > _JOIN_AT:
            if not isinstance(pair_ids, pa.Array | pa.ChunkedArray):
                pair_ids = pa.array(list(pair_ids), pa.string())
            rows = pc.index_in(pair_ids, value_set=self.ids)
            return rows.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        if isinstance(pair_ids, pa.Array | pa.ChunkedArray):
            pair_ids = pair_ids.to_pylist()
        if self._index is None:
            self._index = _HashIndex(self.ids)
        return self._index.rows_of(list(pair_ids))

    def check_covers(self, pair_ids) -> np.ndarray:
        """Row of each pair id (``rows_of``); missing ids and a row count that differs from the data are
        errors."""
        rows = self.rows_of(pair_ids)
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            examples = [str(pair_ids[int(i)]) for i in missing[:5]]
            raise RefCacheError(
                f"reference cache {self.path} has no values for {len(missing)} of {len(rows)} "
                f"pair(s), e.g. ids {examples}"
            )
        if len(rows) != len(self.ids):
            raise RefCacheError(
                f"reference cache {self.path} holds {len(self.ids)} pairs, the data has {len(rows)}"
            )
        return rows


def _id_array(columns: list) -> Any:
    """The shards' id columns (chunked arrays) as one pyarrow string array."""
    import pyarrow as pa

    chunks = [chunk.cast(pa.string()) for column in columns for chunk in column.chunks]
    return pa.chunked_array(chunks, type=pa.string()).combine_chunks()


_JOIN_AT = 4096  # more ids than this per lookup: one Arrow join beats hashing each in Python


def _id_hash(pair_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(pair_id.encode(), digest_size=8).digest(), "little")


class _HashIndex:
    """The cache's ids by a 64-bit hash, sorted (numpy: no Python object per pair). The rare ids whose
    hash another id shares are kept apart, by name."""

    def __init__(self, ids) -> None:
        hashes = np.fromiter((_id_hash(i) for i in _iter_ids(ids)), dtype=np.uint64, count=len(ids))
        self.order = np.argsort(hashes, kind="stable")
        self.sorted = hashes[self.order]
        self.ids = ids
        clash = np.flatnonzero(self.sorted[1:] == self.sorted[:-1])
        rows = np.unique(np.concatenate([self.order[clash], self.order[clash + 1]])) if len(clash) else []
        self.clashing = {ids[int(r)].as_py(): int(r) for r in rows}

    def rows_of(self, pair_ids: list[str]) -> np.ndarray:
        hashes = np.array([_id_hash(i) for i in pair_ids], dtype=np.uint64)
        at = np.minimum(np.searchsorted(self.sorted, hashes), max(len(self.sorted) - 1, 0))
        rows = np.full(len(pair_ids), -1, dtype=np.int64)
        if len(self.sorted):
            hit = self.sorted[at] == hashes
            rows[hit] = self.order[at[hit]]
        found = self.ids.take(np.maximum(rows, 0)).to_pylist() if len(self.sorted) else [None] * len(rows)
        for j, pair_id in enumerate(pair_ids):
            if pair_id in self.clashing:
                rows[j] = self.clashing[pair_id]
            elif rows[j] >= 0 and found[j] != pair_id:
                rows[j] = -1
        return rows


def _iter_ids(ids, block: int = 65_536):
    for start in range(0, len(ids), block):
        yield from ids.slice(start, block).to_pylist()
