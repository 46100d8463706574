"""The distributed step sampler: which pairs make each optimizer step, and how each rank's share is packed.

Each epoch the pairs are shuffled with a permutation that depends only on (seed, epoch): sorting PCG64 raw
64-bit draws, whose streams NumPy keeps stable across versions (unlike ``Generator.permutation``). Steps take
consecutive slices of ``pairs_per_step`` pairs (global, not per rank); each step is packed with
:func:`~hdpo_ds.data.packing.pack_step`, which balances tokens, not pair counts, across ranks and gives every
rank the same number of micro-batches. Every rank computes the same permutation and packing, so no
communication is needed. ``state_dict`` holds (epoch, steps consumed in the epoch) for exact resume.

A weighted mixture (``weights`` and ``sources`` given; ``data/mixture.py``) changes which pairs an epoch
holds, not how they are shuffled and packed. The rule:

- an epoch is N draws, N = the number of pairs over all sources (so ``len(sampler)`` is unchanged);
- source s gets q_s = N * w_s / sum(w) draws per epoch, rounded by largest remainder (``mixture.quotas``);
- source s is an endless stream of passes over its n_s pairs, pass k a permutation keyed on
  (seed, source s, pass k); epoch e takes the stream's positions [e * q_s, (e + 1) * q_s). So a source
  with q_s < n_s is subsampled without replacement, the permutation continuing across epochs (every pair
  is drawn once per pass before any pair is drawn again); one with q_s > n_s is repeated (whole passes
  and part of another). An epoch whose window spans two passes may draw a pair of that source twice;
- the epoch's N draws, listed source by source in stream order, are put in the order of the
  (seed, epoch) permutation above.

With no weights (a plain list of paths) the draws are the pairs 0..N-1 once each, so the order is the
permutation itself, exactly as before mixtures existed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from hdpo_ds.data.mixture import quotas
from hdpo_ds.data.packing import MicroBatchPacking, StepPacking, pack_step

# Keeps the per-source pass keys (seed, tag, source, pass) apart from the epoch keys (seed, epoch).
_PASS_TAG = 0x6D6978  # "mix"


@dataclasses.dataclass(frozen=True)
class StepAssignment:
    """One optimizer step as seen by one rank.

    ``pair_indices`` (num_pairs,): dataset indices of all the step's pairs (every rank's), in step order; the
    packing's pair positions index it. ``micro_batches``: this rank's micro-batches. ``num_pairs``: the step's
    global pair count (the loss is the mean over these).
    """

    epoch: int
    step: int
    rank: int
    pair_indices: np.ndarray
    packed: StepPacking

    @property
    def micro_batches(self) -> tuple[MicroBatchPacking, ...]:
        return self.packed.for_rank(self.rank)

    @property
    def num_pairs(self) -> int:
        return len(self.pair_indices)

    def pairs(self, dataset: Sequence[Any]) -> IndexedPairs:
        """A lazy view for :func:`~hdpo_ds.data.packing.collate`: ``view[pos] = dataset[pair_indices[pos]]``,
        so a rank reads only the pairs of its own micro-batches."""
        return IndexedPairs(dataset, self.pair_indices)


class IndexedPairs:
    """`view[pos] = dataset[indices[pos]]`, read lazily: what `collate` takes for packing positions."""

    def __init__(self, dataset: Sequence[Any], indices: np.ndarray) -> None:
        self._dataset = dataset
        self._indices = indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, pos: int) -> Any:
        return self._dataset[int(self._indices[pos])]


class PairSampler:
    """Deterministic, resumable step sampler over pairs of known lengths.

    ``lengths``: (num_pairs, 2) token lengths of each pair's chosen and rejected sequence, prompt included
    (``TokenizedPairs.lengths``). ``pairs_per_step``: global pairs per optimizer step
    (``train.pairs_per_step``). ``max_length``: the configured ``data.max_length``, used to validate the
    budget (default: the longest sequence present). ``drop_last``: drop the final partial step of an epoch;
    without it that step is shorter (``StepAssignment.num_pairs`` says by how much). Iterating runs from the
    current position to the end of the epoch, then moves to the next epoch. ``sources`` (num_pairs,): each
    pair's source index (``TokenizedPairs.sources``); ``weights``: one per source, for a weighted mixture
    drawn by the rule in the module docstring (None: every pair once per epoch). Under sequence
    parallelism ``world_size`` and ``rank`` are the data-parallel ones (groups of ranks share a micro-batch),
    the budget is the group's, and ``multiple_of`` (the group size) pads each row (``pack_step``).
    """

    def __init__(
        self,
        lengths: Sequence[Sequence[int]] | np.ndarray,
        *,
        pairs_per_step: int,
        world_size: int,
        rank: int,
        seed: int,
        max_tokens_per_micro_batch: int,
        max_length: int | None = None,
        packing: bool = True,
        drop_last: bool = True,
        sources: Sequence[int] | np.ndarray | None = None,
        weights: Sequence[float] | None = None,
        multiple_of: int = 1,
    ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64).reshape(-1, 2)
        num_pairs = len(self.lengths)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if num_pairs == 0:
            raise ValueError("no pairs to sample from")
        if not isinstance(pairs_per_step, int) or pairs_per_step < world_size:
            raise ValueError(
                f"train.pairs_per_step must be an integer >= the world size ({world_size}): every rank needs "
                f"a pair to work on; got {pairs_per_step!r}"
            )
        if drop_last and pairs_per_step > num_pairs:
            raise ValueError(
                f"train.pairs_per_step ({pairs_per_step}) exceeds the number of pairs ({num_pairs}): with "
                "drop_last an epoch would have no step"
            )
        longest = int(self.lengths.max())
        if max_length is not None and longest > max_length:
            raise ValueError(
                f"a pair has a sequence of {longest} tokens, more than data.max_length ({max_length})"
            )
        max_length = longest if max_length is None else max_length
        if max_tokens_per_micro_batch < 2 * max_length:
            raise ValueError(
                f"data.max_tokens_per_micro_batch ({max_tokens_per_micro_batch}) must be >= 2 × "
                f"data.max_length ({2 * max_length}) so that any pair fits in one micro-batch"
            )
        self.pairs_per_step = pairs_per_step
        self.world_size = world_size
        self.rank = rank
        self.seed = int(seed)
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.packing = packing
        self.multiple_of = multiple_of  # sequence parallelism: rows padded to a multiple (pack_step)
        self.drop_last = drop_last
        self.epoch = 0
        self.offset = 0  # steps of the current epoch already handed out
        self._perm_epoch: int | None = None
        self._perm = np.empty(0, dtype=np.int64)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.quotas: np.ndarray | None = None
        if self.weights is not None:
            self._members = _source_members(sources, num_pairs, self.weights)
            self.quotas = quotas(self.weights, num_pairs)

    @property
    def source_sizes(self) -> list[int] | None:
        """Pairs per source of a mixture (None without weights)."""
        return None if self.weights is None else [len(m) for m in self._members]

    def __len__(self) -> int:
        """Optimizer steps per epoch."""
        n = len(self.lengths)
        return n // self.pairs_per_step if self.drop_last else -(-n // self.pairs_per_step)

    def __iter__(self) -> Iterator[StepAssignment]:
        while self.offset < len(self):
            assignment = self.assignment(self.epoch, self.offset)
            self.offset += 1  # before yielding: a state_dict taken after this step resumes with the next one
            yield assignment
        self.epoch += 1
        self.offset = 0

    def permutation(self, epoch: int) -> np.ndarray:
        """The pairs ``epoch`` draws, in order (same on every rank and every run): all pairs once each, or
        a mixture's draws (the module docstring's rule)."""
        if self._perm_epoch != epoch:
            keys = np.random.PCG64(np.random.SeedSequence([self.seed, int(epoch)])).random_raw(
                len(self.lengths)
            )
            order = np.argsort(keys, kind="stable")
            self._perm = order if self.weights is None else self.epoch_draws(epoch)[order]
            self._perm_epoch = epoch
        return self._perm

    def epoch_draws(self, epoch: int) -> np.ndarray:
        """A mixture's draws in ``epoch`` before the shuffle: source by source, each in stream order."""
        if self.weights is None:
            return np.arange(len(self.lengths), dtype=np.int64)
        parts = []
        for s, (members, quota) in enumerate(zip(self._members, self.quotas, strict=True)):
            n, start = len(members), int(epoch) * int(quota)
            first, last = start // n, -(-(start + int(quota)) // n)  # the passes the window touches
            stream = [members[self._pass_order(s, k, n)] for k in range(first, last)]
            window = np.concatenate(stream) if stream else np.empty(0, dtype=np.int64)
            parts.append(window[start - first * n : start - first * n + int(quota)])
        return np.concatenate(parts)

    def _pass_order(self, source: int, k: int, n: int) -> np.ndarray:
        keys = np.random.PCG64(np.random.SeedSequence([self.seed, _PASS_TAG, source, k])).random_raw(n)
        return np.argsort(keys, kind="stable")

    def assignment(self, epoch: int, step: int) -> StepAssignment:
        """Step ``step`` of ``epoch`` for this rank: a pure function of the arguments and the
        constructor's."""
        if not 0 <= step < len(self):
            raise IndexError(f"step {step} out of range: an epoch has {len(self)} steps")
        indices = self.permutation(epoch)[step * self.pairs_per_step : (step + 1) * self.pairs_per_step]
        packed = pack_step(
            self.lengths[indices],
            world_size=self.world_size,
            max_tokens_per_micro_batch=self.max_tokens_per_micro_batch,
            packing=self.packing,
            multiple_of=self.multiple_of,
        )
        return StepAssignment(int(epoch), int(step), self.rank, indices.copy(), packed)

    def state_dict(self) -> dict:
        state = {
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "num_pairs": len(self.lengths),
            "pairs_per_step": self.pairs_per_step,
        }
        if self.weights is not None:  # absent without a mixture: older checkpoints stay loadable
            state["mixture"] = self._mixture_state()
        return state

    def _mixture_state(self) -> dict | None:
        if self.weights is None:
            return None
        return {"source_pairs": self.source_sizes, "quotas": [int(q) for q in self.quotas]}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at the saved position. The data, seed and pairs_per_step must be those of the saved run (a
        different world size is allowed: the pairs of each step stay the same, only their packing differs)."""
        for key, mine in (
            ("seed", self.seed),
            ("num_pairs", len(self.lengths)),
            ("pairs_per_step", self.pairs_per_step),
        ):
            if int(state[key]) != mine:
                raise ValueError(
                    f"cannot resume the sampler: the checkpoint has {key}={state[key]} but this run has "
                    f"{mine}"
                )
        if state.get("mixture") != self._mixture_state():
            raise ValueError(
                "cannot resume the sampler: the checkpoint's mixture (pairs and draws per source) is "
                f"{state.get('mixture')} but this run's is {self._mixture_state()}"
            )
        if not 0 <= int(state["offset"]) <= len(self):
            raise ValueError(
                f"cannot resume the sampler: offset {state['offset']} is outside [0, {len(self)}]"
            )
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])


def _source_members(sources, num_pairs: int, weights: list[float]) -> list[np.ndarray]:
    """The pair indices of each source (ascending); every source must have a pair to draw."""
    if sources is None:
        raise ValueError("a weighted mixture needs each pair's source index (sources)")
    src = np.asarray(sources, dtype=np.int64).reshape(-1)
    if len(src) != num_pairs:
        raise ValueError(f"sources has {len(src)} entries for {num_pairs} pairs")
    if len(src) and (src.min() < 0 or src.max() >= len(weights)):
        raise ValueError(f"a source index lies outside [0, {len(weights)}) (one weight per source)")
    members = [np.flatnonzero(src == s) for s in range(len(weights))]
    for s, m in enumerate(members):
        if not len(m):
            raise ValueError(
                f"data.train_files[{s}]: no pairs left after validation and tokenization, so its weight "
                f"{weights[s]:g} cannot be drawn"
            )
    return members
