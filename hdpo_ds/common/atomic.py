"""Atomic file writes: a temporary name, fsync, rename, fsync of the directory.

A reader sees the old file or the new one, never half of one, even when the writer is killed.
"""

from __future__ import annotations

import json
import os

__all__ = ["fsync_dir", "fsync_path", "write_json", "write_jsonl", "write_text"]


def fsync_path(path: str) -> None:
    """fsync a file, or a directory (which persists the renames inside it), by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Persist a rename inside `path` (the directory entry itself)."""
    fsync_path(path)


def write_json(path: str, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True))


def write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_jsonl(path: str, records) -> None:
    """One JSON object per line (keys sorted), atomically; the folder is created when missing."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
