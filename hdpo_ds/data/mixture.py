"""Weighted mixtures of data sources: the source entries of ``data.train_files`` and each source's quota.

An entry of ``data.train_files`` is a path (a file, directory, glob or cached hub name; see
``data/records.py``) or a mapping ``{path, weight, split, rows}``: ``weight`` (> 0, default 1) is the
source's share of every epoch relative to the others; ``split`` / ``rows`` override ``data.split`` /
``data.rows`` for that source alone. A list of plain paths is a concatenation, as it always was; as soon as
one entry is a mapping the list is a mixture and every entry (a plain path weighs 1) is sampled by its
weight (``data/sampler.py``, docs/design.md §1).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

SOURCE_KEYS = ("path", "weight", "split", "rows")
_ROW_SLICE = re.compile(r"^\[?\s*(-?\d*)\s*:\s*(-?\d*)\s*\]?$")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One entry of ``data.train_files``: ``path`` (a data spec), ``weight`` (> 0), and the entry's own
    ``split`` / ``rows`` (None: the global ``data.split`` / ``data.rows`` apply)."""

    path: str
    weight: float = 1.0
    split: str | None = None
    rows: str | None = None


@dataclasses.dataclass(frozen=True)
class Sources:
    """The parsed entries of a files list. ``mixture``: at least one entry was a mapping, so the sources
    are sampled by weight instead of concatenated."""

    specs: tuple[SourceSpec, ...]
    mixture: bool

    @property
    def weights(self) -> list[float] | None:
        """The sampling weights of a mixture, None for a plain concatenation."""
        return [s.weight for s in self.specs] if self.mixture else None


def parse_rows(rows: str | slice | None) -> slice | None:
    """``"100:200"``, ``"[:1000]"``, ``"-500:"`` or a ``slice`` -> ``slice`` (Python semantics, no step)."""
    if rows is None or isinstance(rows, slice):
        if isinstance(rows, slice) and rows.step not in (None, 1):
            raise ValueError(f"row slice {rows!r}: a step is not supported")
        return rows
    match = _ROW_SLICE.match(str(rows).strip())
    if match is None:
        raise ValueError(f"invalid row slice {rows!r}: expected 'start:stop', e.g. '0:1000' or ':1000'")
    start, stop = (int(g) if g else None for g in match.groups())
    return slice(start, stop)


def parse_sources(entries: Sequence[Any] | str, key: str = "data.train_files") -> Sources:
    """Validate the entries of a files list (paths, mappings or :class:`SourceSpec`); errors name
    ``key[index].field``."""
    if isinstance(entries, str | SourceSpec | Mapping):
        entries = [entries]
    specs, mixture = [], False
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]"
        if isinstance(entry, SourceSpec):
            specs.append(_checked(entry, where))
            mixture = True
        elif isinstance(entry, Mapping):
            unknown = sorted(str(k) for k in entry if k not in SOURCE_KEYS)
            if unknown:
                raise ValueError(
                    f"{where}: unknown key(s) {', '.join(unknown)} (a source entry takes "
                    f"{', '.join(SOURCE_KEYS)})"
                )
            if "path" not in entry:
                raise ValueError(f"{where}.path: required (the source's file, directory, glob or hub name)")
            spec = SourceSpec(
                path=entry["path"],
                weight=entry.get("weight", 1.0),
                split=entry.get("split"),
                rows=entry.get("rows"),
            )
            specs.append(_checked(spec, where))
            mixture = True
        elif isinstance(entry, str):
            specs.append(_checked(SourceSpec(entry), where))
        else:
            raise ValueError(
                f"{where}: expected a path or a mapping with keys {', '.join(SOURCE_KEYS)}, got "
                f"{type(entry).__name__} {entry!r}"
            )
    return Sources(tuple(specs), mixture)


def _checked(spec: SourceSpec, where: str) -> SourceSpec:
    if not isinstance(spec.path, str) or not spec.path:
        raise ValueError(f"{where}.path: expected a non-empty string, got {spec.path!r}")
    weight = spec.weight
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise ValueError(f"{where}.weight: expected a number > 0, got {weight!r}")
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"{where}.weight: must be a finite number > 0, got {weight!r}")
    if spec.split is not None and (not isinstance(spec.split, str) or not spec.split):
        raise ValueError(f"{where}.split: expected a non-empty string, got {spec.split!r}")
    rows = spec.rows
    if rows is not None:
        if not isinstance(rows, str):
            raise ValueError(f"{where}.rows: expected a row slice string like '0:1000', got {rows!r}")
        try:
            parse_rows(rows)
        except ValueError as e:
            raise ValueError(f"{where}.rows: {e}") from None
    return dataclasses.replace(spec, weight=float(weight))


def quotas(weights: Sequence[float], total: int) -> np.ndarray:
    """Each source's draws in an epoch of ``total`` draws: ``total * w_s / sum(w)`` rounded by largest
    remainder (floors first; the leftover draws go one each to the largest fractional parts, ties to the
    lower source index). Exact: the weights are taken as the rationals their floats are.

    >>> quotas([3, 1], 110).tolist()
    [83, 27]
    """
    fractions = [Fraction(w) for w in weights]
    if not fractions or any(f <= 0 for f in fractions):
        raise ValueError(f"mixture weights must be > 0, got {list(weights)}")
    whole = sum(fractions)
    exact = [total * f / whole for f in fractions]
    floors = [math.floor(x) for x in exact]
    leftover = total - sum(floors)
    order = sorted(range(len(exact)), key=lambda s: (-(exact[s] - floors[s]), s))
    for s in order[:leftover]:
        floors[s] += 1
    return np.asarray(floors, dtype=np.int64)
