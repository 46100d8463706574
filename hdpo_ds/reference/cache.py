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

The fingerprint names everything the values depend on: the reference model (path, sha256 of its
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
from dataclasses import dataclass

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
    """A validated cache, ready for lookups by pair id."""

    ids: dict[str, int]
    chosen: np.ndarray  # (num_pairs,) float64
    rejected: np.ndarray
    chosen_tokens: np.ndarray
    rejected_tokens: np.ndarray
    path: str

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
        ids = [i for t in tables for i in t.column("id").to_pylist()]
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
            examples = [ids[i] for i in np.flatnonzero(bad)[:5]]
            raise RefCacheError(
                f"reference cache {cache_dir} has {int(bad.sum())} non-finite value(s), "
                f"e.g. pair ids {examples}"
            )
        index = {pair_id: row for row, pair_id in enumerate(ids)}
        if len(index) != len(ids):
            raise RefCacheError(f"reference cache {cache_dir} holds duplicate pair ids")
        return cls(
            index,
            chosen,
            rejected,
            column("chosen_tokens", np.int64),
            column("rejected_tokens", np.int64),
            cache_dir,
        )

    def check_covers(self, pair_ids: Sequence[str]) -> np.ndarray:
        """Row of each pair id; missing ids and a row count that differs from the data are errors."""
        missing = [i for i in pair_ids if i not in self.ids]
        if missing:
            raise RefCacheError(
                f"reference cache {self.path} has no values for {len(missing)} of {len(pair_ids)} "
                f"pair(s), e.g. ids {missing[:5]}"
            )
        if len(pair_ids) != len(self.ids):
            raise RefCacheError(
                f"reference cache {self.path} holds {len(self.ids)} pairs, the data has {len(pair_ids)}"
            )
        return np.array([self.ids[i] for i in pair_ids], dtype=np.int64)
