"""Pack the pairs of one optimizer step into micro-batches of bounded size, identically on every rank.

Planning (:func:`pack_step`) sees only the sequence lengths of the step's pairs and returns, for every rank,
the same number of micro-batches (ZeRO-3 gathers parameters collectively on every forward, so all ranks must
run as many forward/backward passes: docs/design.md §5). A micro-batch holds whole pairs (chosen and rejected
together) and at most ``max_tokens_per_micro_batch`` tokens:

- packed (``packing=True``): the cost of a micro-batch is its real token count (one row, no padding).
  Pairs go longest first to the least-loaded rank with room, into its least-filled micro-batch (so
  micro-batches come out alike in size) or, where that fails, its fullest micro-batch with room; the
  micro-batch count per rank is the smallest at which this succeeds (found by bisection, never more than
  best-fit-decreasing bins spread over the ranks). Ranks end up with near-equal token counts, not pair
  counts, and each rank's micro-batches are ordered largest first;
- padded (``packing=False``): one sequence per row, padded to the longest in the micro-batch, so the cost is
  rows × longest. Pairs are sorted by length and cut into micro-batches (length grouping keeps the padding
  low), which are then dealt to ranks by padded cost.

A rank short of micro-batches gets fillers: a real pair (the step's shortest) with weight 0, so its forward
and backward run on finite data and contribute nothing. The packing depends only on the lengths, in order:
ties break by position, never by set or dict order, so every rank computes the same packing.

:func:`collate` turns one micro-batch into tensors (:class:`PackedBatch`).
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class MicroBatchPacking:
    """One micro-batch of a step: ``pairs`` are positions in the step's pair list (sorted). A ``filler``
    repeats one real pair with weight 0. ``tokens``: real tokens of its sequences (the filler's included);
    ``tensor_tokens``: tokens of the collated tensors (packed: = tokens; padded: rows × longest)."""

    pairs: tuple[int, ...]
    filler: bool
    tokens: int
    tensor_tokens: int


@dataclasses.dataclass(frozen=True)
class StepPacking:
    """The micro-batches of one optimizer step for every rank: ``ranks[r]`` is rank r's list, all equally
    long."""

    ranks: tuple[tuple[MicroBatchPacking, ...], ...]
    max_tokens_per_micro_batch: int
    packing: bool
    num_pairs: int

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def micro_batches_per_rank(self) -> int:
        return len(self.ranks[0])

    def for_rank(self, rank: int) -> tuple[MicroBatchPacking, ...]:
        return self.ranks[rank]

    def rank_tokens(self) -> list[int]:
        """Real tokens per rank, fillers excluded."""
        return [sum(mb.tokens for mb in mbs if not mb.filler) for mbs in self.ranks]


@dataclasses.dataclass(frozen=True)
class PackingStats:
    """``fill`` = real tokens / (micro-batches × budget), all ranks, fillers counted as micro-batches but not
    as real tokens. ``padding_fraction`` = pad tokens / tensor tokens. ``rank_imbalance`` = the busiest
    rank's real tokens / the mean (1.0 = perfectly balanced)."""

    micro_batches: int
    fillers: int
    real_tokens: int
    tensor_tokens: int
    budget: int
    fill: float
    padding_fraction: float
    rank_imbalance: float


@dataclasses.dataclass
class PackedBatch:
    """One micro-batch as tensors.

    Packed mode: B == 1; the sequences are concatenated in one row of length L = their total length (plus
    fewer than N pad tokens at the end under sequence parallelism, :func:`pad_row`), and
    ``position_ids`` restart at 0 at each sequence start (transformers then keeps the sequences apart when no
    attention mask is passed). Padded mode: one sequence per row (B = number of sequences), right-padded with
    ``pad_token_id`` to the longest; ``position_ids`` run 0..L-1 on every row; ``attention_mask`` marks real
    tokens.

    Sequence order: for each pair, in ``pair_ids`` order, its chosen then its rejected sequence. Each sequence
    is ``prompt_ids + response_ids``.

    - ``input_ids``, ``position_ids``, ``labels``, ``seq_index``: LongTensor (B, L).
    - ``labels`` are already shifted: ``logits[:, t]`` predicts ``labels[:, t]``. For a sequence of prompt
      length P and total length n starting at row offset s, ``labels[s + t] = input_ids[s + t + 1]`` for
      P - 1 <= t <= n - 2 (each response token, EOS included, is the label of the position before it);
      all other positions (prompt tokens but the last, each sequence's last token, padding) are -100.
      So each sequence has exactly its response length of labelled positions.
    - ``seq_index``: the sequence (0..num_seqs-1) each token belongs to; -1 on padding.
    - ``pair_index`` (num_seqs,): the pair (0..num_pairs-1, an index into ``pair_ids``) of each sequence.
    - ``is_chosen`` (num_seqs,): True for chosen sequences.
    - ``num_real_tokens``: non-padding tokens in the tensors (a filler's included).
    - ``weight``: 1.0, or 0.0 for a filler micro-batch (multiply its loss by it; skip it in metrics).
    - ``seq_offsets`` (packed only; ``()`` when padded): the row offsets where the row's position runs
      start, and the row length last: host ints, computed once here, so no attention layer reads
      position_ids back from the device. Every run counts, the sequence-parallel pad run too; under
      sequence parallelism a shard keeps the whole row's offsets (what the attention core sees after
      Ulysses' all-to-all). ``cu_seq_lens`` is the same as an int32 tensor (S + 1,), moved with the batch;
      ``max_seq_len`` the longest run. ``model_inputs`` hands them to the model as transformers'
      ``cu_seq_lens_q/k`` and ``max_length_q/k`` (docs/design.md §5 rule 13).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    seq_index: torch.Tensor
    pair_index: torch.Tensor
    is_chosen: torch.Tensor
    pair_ids: list[str]
    num_real_tokens: int
    weight: float
    attention_mask: torch.Tensor | None = None
    seq_offsets: tuple[int, ...] = ()
    cu_seq_lens: torch.Tensor | None = None
    max_seq_len: int = 0

    @property
    def num_pairs(self) -> int:
        return len(self.pair_ids)

    @property
    def num_seqs(self) -> int:
        return int(self.pair_index.numel())

    def sum_squared_lengths(self) -> int:
        """Σ n² over the row's sequences (causal attention's cost, runtime/perf.py): from the host offsets
        when packed (a sequence-parallel pad run included), else from the attention mask (read it before
        the batch moves to a device: no sync)."""
        if self.seq_offsets:
            return sum((b - a) ** 2 for a, b in itertools.pairwise(self.seq_offsets))
        return int((self.attention_mask.sum(dim=1) ** 2).sum())

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments for a transformers causal LM: no attention mask when packed (it would disable
        the position_ids-based packing), and no KV cache."""
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        if self.cu_seq_lens is not None:
            # The host copy rides on the tensor for the per-sequence paths (runtime/attention.py), so
            # they slice without reading the device; varlen kernels take the tensor itself.
            self.cu_seq_lens.host_offsets = self.seq_offsets
            inputs.update(
                cu_seq_lens_q=self.cu_seq_lens,
                cu_seq_lens_k=self.cu_seq_lens,
                max_length_q=self.max_seq_len,
                max_length_k=self.max_seq_len,
            )
        return inputs

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


def pack_step(
    pairs_lengths_for_step: Sequence[Sequence[int]] | np.ndarray,
    *,
    world_size: int,
    max_tokens_per_micro_batch: int,
    packing: bool = True,
    multiple_of: int = 1,
) -> StepPacking:
    """Pack one optimizer step into micro-batches.

    ``pairs_lengths_for_step``: (num_pairs, 2) ints, the token lengths of each pair's chosen sequence and
    rejected sequence (prompt included), in step order. Returns a :class:`StepPacking` whose micro-batch pair
    positions index this list. Every pair appears in exactly one non-filler micro-batch on exactly one rank.
    ``multiple_of`` (packed only): each micro-batch's row is padded to a multiple of it (fewer than
    ``multiple_of`` pad tokens, in ``tensor_tokens``), as sequence parallelism splits the row evenly; the
    budget holds the real tokens.
    """
    lengths = np.asarray(pairs_lengths_for_step, dtype=np.int64).reshape(-1, 2)
    n = len(lengths)
    budget = int(max_tokens_per_micro_batch)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if multiple_of < 1 or (multiple_of > 1 and not packing):
        raise ValueError(f"multiple_of={multiple_of}: must be >= 1, and 1 unless packed")
    if n == 0:
        raise ValueError("a step needs at least one pair")
    if lengths.min() < 1:
        raise ValueError("every sequence needs at least one token")
    longest = lengths.max(axis=1)
    cost = lengths.sum(axis=1) if packing else 2 * longest
    if cost.max() > budget:
        i = int(np.argmax(cost))
        raise ValueError(
            f"data.max_tokens_per_micro_batch={budget} cannot hold pair {i} (sequences of {lengths[i, 0]} "
            f"and {lengths[i, 1]} tokens{'' if packing else ', padded'}); it must be >= 2 × data.max_length"
        )
    return _pack_items(
        [int(x) for x in lengths.sum(axis=1)],
        [int(x) for x in longest],
        2,
        world_size,
        budget,
        packing,
        multiple_of,
    )


def pack_sequences(
    lengths: Sequence[int] | np.ndarray,
    *,
    world_size: int,
    max_tokens_per_micro_batch: int,
    packing: bool = True,
) -> StepPacking:
    """:func:`pack_step` for single sequences (supervised fine-tuning): ``lengths`` (n,) token lengths;
    the packing's "pairs" are sequence positions (collate them with :func:`collate_sequences`)."""
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    budget = int(max_tokens_per_micro_batch)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if len(lengths) == 0:
        raise ValueError("a step needs at least one sequence")
    if lengths.min() < 1:
        raise ValueError("every sequence needs at least one token")
    if lengths.max() > budget:
        raise ValueError(
            f"data.max_tokens_per_micro_batch={budget} cannot hold a sequence of {lengths.max()} tokens; "
            "it must be >= data.max_length"
        )
    sizes = [int(x) for x in lengths]
    return _pack_items(sizes, sizes, 1, world_size, budget, packing)


def _pack_items(
    sizes: list[int],
    longest: list[int],
    seqs_per_item: int,
    world_size: int,
    budget: int,
    packing: bool,
    multiple_of: int = 1,
) -> StepPacking:
    """Bins for items (pairs or single sequences) of `sizes` real tokens, `longest` sequence each."""
    n = len(sizes)

    def padded(tokens: int) -> int:  # the packed row, padded to a multiple of `multiple_of`
        return -(-tokens // multiple_of) * multiple_of

    if packing:
        bins = _packed_bins(sizes, world_size, budget)
    else:
        bins = _padded_bins(longest, sizes, world_size, budget, seqs_per_item)

    # The filler replays the step's shortest item: cheap, real (its reference log-probs exist), finite.
    shortest = min(range(n), key=lambda i: (sizes[i], i))
    ranks = []
    for rank_bins in bins:
        mbs = []
        for members in rank_bins:
            if members:
                members = tuple(sorted(members))
                tokens = sum(sizes[i] for i in members)
                tensor = (
                    padded(tokens)
                    if packing
                    else seqs_per_item * len(members) * max(longest[i] for i in members)
                )
                mbs.append(MicroBatchPacking(members, False, tokens, tensor))
        # Largest first on every rank, so that the k-th micro-batches of all ranks are alike in size: under
        # ZeRO-3 the ranks wait for each other inside every micro-batch.
        mbs.sort(key=lambda mb: (-mb.tensor_tokens, mb.pairs))
        while len(mbs) < len(rank_bins):
            tensor = padded(sizes[shortest]) if packing else seqs_per_item * longest[shortest]
            mbs.append(MicroBatchPacking((shortest,), True, sizes[shortest], tensor))
        ranks.append(tuple(mbs))
    return StepPacking(tuple(ranks), budget, packing, n)


def lower_bound_micro_batches(sizes: Sequence[int] | np.ndarray, budget: int) -> int:
    """Martello and Toth's L2 lower bound on the micro-batches of `budget` tokens that packed items of
    `sizes` (each <= budget) need on one rank: no packing does with fewer (bench/packing.py compares the
    planner with it). L2 = max over K in {0} and the sizes <= budget / 2 of
    |{s > budget - K}| + |{budget - K >= s > budget / 2}| + max(0, ceil((sum of {budget / 2 >= s >= K}
    - the room left beside the second set, one micro-batch each) / budget))."""
    items = [int(x) for x in sizes]
    best = 0
    for k in sorted({0, *(x for x in items if 2 * x <= budget)}):
        alone = sum(x > budget - k for x in items)
        large = [x for x in items if 2 * x > budget and x <= budget - k]
        small = sum(x for x in items if 2 * x <= budget and x >= k)
        spill = small - (len(large) * budget - sum(large))
        best = max(best, alone + len(large) + max(0, -(-spill // budget)))
    return best


def packing_stats(packed: StepPacking) -> PackingStats:
    """Fill, padding and balance of a step's packing (see :class:`PackingStats`)."""
    mbs = [mb for rank in packed.ranks for mb in rank]
    real = sum(mb.tokens for mb in mbs if not mb.filler)
    tensor = sum(mb.tensor_tokens for mb in mbs)
    all_tokens = sum(mb.tokens for mb in mbs)
    rank_tokens = packed.rank_tokens()
    mean = sum(rank_tokens) / len(rank_tokens)
    return PackingStats(
        micro_batches=len(mbs),
        fillers=sum(mb.filler for mb in mbs),
        real_tokens=real,
        tensor_tokens=tensor,
        budget=packed.max_tokens_per_micro_batch,
        fill=real / (len(mbs) * packed.max_tokens_per_micro_batch),
        padding_fraction=(tensor - all_tokens) / tensor,
        rank_imbalance=max(rank_tokens) / mean if mean > 0 else math.inf,
    )


def collate(
    pairs: Any, micro_batch: MicroBatchPacking, *, pad_token_id: int, packing: bool, multiple_of: int = 1
) -> PackedBatch:
    """Build the tensors of one micro-batch (layout and label convention: :class:`PackedBatch`).

    ``pairs``: anything indexable by the packing's pair positions that yields objects with ``id``,
    ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` (``TokenizedPair``). ``multiple_of`` (packed):
    pad the row to a multiple of it (:func:`pad_row`), as :func:`pack_step` planned.
    """
    seqs: list[np.ndarray] = []
    prompt_lens: list[int] = []
    pair_ids: list[str] = []
    for pos in micro_batch.pairs:
        pair = pairs[pos]
        pair_ids.append(pair.id)
        prompt = np.asarray(pair.prompt_ids, dtype=np.int64)
        if len(prompt) == 0:
            raise ValueError(
                f"pair {pair.id}: empty prompt (the first response token needs a position to be predicted "
                "from)"
            )
        for response in (pair.chosen_ids, pair.rejected_ids):
            seqs.append(np.concatenate([prompt, np.asarray(response, dtype=np.int64)]))
            prompt_lens.append(len(prompt))
    tensors = _sequence_tensors(seqs, prompt_lens, pad_token_id=pad_token_id, packing=packing)
    num_seqs = len(seqs)
    batch = PackedBatch(
        **tensors,
        pair_index=torch.arange(num_seqs) // 2,
        is_chosen=torch.arange(num_seqs) % 2 == 0,
        pair_ids=pair_ids,
        weight=0.0 if micro_batch.filler else 1.0,
    )
    return pad_row(batch, multiple_of, pad_token_id) if multiple_of > 1 else batch


def pad_row(batch: PackedBatch, multiple_of: int, pad_token_id: int) -> PackedBatch:
    """A packed batch (B == 1) with its row padded at the end to a multiple of ``multiple_of``.

    The k < multiple_of pad tokens: ``pad_token_id``, label -100, ``seq_index`` -1, and ``position_ids``
    0..k-1 (a sequence of their own, so per-sequence attention keeps them apart). Sums, counts and
    ``num_real_tokens`` are unchanged."""
    if batch.attention_mask is not None or batch.input_ids.shape[0] != 1:
        raise ValueError("pad_row: only packed batches (one row, no attention mask) are padded")
    k = -batch.input_ids.shape[1] % multiple_of
    if k == 0:
        return batch

    def extend(t: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, tail.to(t.device, t.dtype)[None]], dim=1)

    length = batch.input_ids.shape[1]
    return dataclasses.replace(
        batch,
        input_ids=extend(batch.input_ids, torch.full((k,), pad_token_id)),
        position_ids=extend(batch.position_ids, torch.arange(k)),
        labels=extend(batch.labels, torch.full((k,), IGNORE_INDEX)),
        seq_index=extend(batch.seq_index, torch.full((k,), -1)),
        **_boundaries([*batch.seq_offsets[:-1], length, length + k]),
    )


def _boundaries(offsets: Sequence[int]) -> dict[str, Any]:
    """seq_offsets, cu_seq_lens and max_seq_len of a packed row from its run offsets (row length last)."""
    offsets = tuple(int(x) for x in offsets)
    return {
        "seq_offsets": offsets,
        "cu_seq_lens": torch.tensor(offsets, dtype=torch.int32),
        "max_seq_len": max(b - a for a, b in itertools.pairwise(offsets)),
    }


def boundaries_from_positions(position_ids: torch.Tensor) -> tuple[int, ...]:
    """The run offsets of a packed row read from its position_ids (1, L): where they are 0, and L
    (a host sync on a device tensor: what the collator's ``seq_offsets`` spare every layer)."""
    starts = torch.nonzero(position_ids[0] == 0)[:, 0].tolist()
    return (*starts, int(position_ids.shape[1]))


def sequence_shard(batch: PackedBatch, size: int, rank: int) -> PackedBatch:
    """Shard ``rank`` of ``size`` equal, consecutive slices of a packed row (its length a multiple of
    ``size``: :func:`pad_row`): input_ids, position_ids, labels and seq_index (1, L / size). Labels are
    already shifted, so a slice's logits predict its own labels even where a sequence straddles the cut;
    the per-sequence metadata (pair_index, is_chosen, pair_ids, num_real_tokens) and the boundaries
    (seq_offsets, cu_seq_lens, max_seq_len) stay the whole row's."""
    length = batch.input_ids.shape[1]
    if batch.attention_mask is not None or length % size:
        raise ValueError(f"sequence_shard: a packed row of length {length} does not split into {size} shards")
    width = length // size
    cut = slice(rank * width, (rank + 1) * width)
    return dataclasses.replace(
        batch,
        input_ids=batch.input_ids[:, cut],
        position_ids=batch.position_ids[:, cut],
        labels=batch.labels[:, cut],
        seq_index=batch.seq_index[:, cut],
    )


def collate_sequences(
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    ids: Sequence[str],
    *,
    pad_token_id: int,
    packing: bool,
    weight: float = 1.0,
) -> PackedBatch:
    """Single sequences (supervised fine-tuning: hdpo_ds/recipes/sft.py) in the same layout as
    :func:`collate`: each (prompt_ids, response_ids) is one sequence whose response tokens are labelled;
    every sequence is its own "pair" (``pair_index`` = 0..n-1, ``is_chosen`` all True)."""
    seqs, prompt_lens = [], []
    for (prompt, response), seq_id in zip(sequences, ids, strict=True):
        if len(prompt) == 0:
            raise ValueError(
                f"sequence {seq_id}: empty prompt (the first response token needs a position to be "
                "predicted from)"
            )
        seqs.append(
            np.concatenate([np.asarray(prompt, dtype=np.int64), np.asarray(response, dtype=np.int64)])
        )
        prompt_lens.append(len(prompt))
    tensors = _sequence_tensors(seqs, prompt_lens, pad_token_id=pad_token_id, packing=packing)
    return PackedBatch(
        **tensors,
        pair_index=torch.arange(len(seqs)),
        is_chosen=torch.ones(len(seqs), dtype=torch.bool),
        pair_ids=list(ids),
        weight=weight,
    )


def _sequence_tensors(
    seqs: list[np.ndarray], prompt_lens: list[int], *, pad_token_id: int, packing: bool
) -> dict:
    """input_ids, position_ids, labels, seq_index, attention_mask and num_real_tokens of the sequences."""
    num_seqs = len(seqs)
    seq_lens = np.array([len(s) for s in seqs], dtype=np.int64)

    def shifted_labels(seq: np.ndarray, prompt_len: int) -> np.ndarray:
        labels = np.full(len(seq), IGNORE_INDEX, dtype=np.int64)
        labels[prompt_len - 1 : len(seq) - 1] = seq[prompt_len:]
        return labels

    if packing:
        input_ids = np.concatenate(seqs)[None]
        position_ids = np.concatenate([np.arange(n) for n in seq_lens])[None]
        labels = np.concatenate([shifted_labels(s, p) for s, p in zip(seqs, prompt_lens, strict=True)])[None]
        seq_index = np.repeat(np.arange(num_seqs), seq_lens)[None]
        attention_mask = None
        bounds = _boundaries(np.concatenate([[0], np.cumsum(seq_lens)]))
    else:
        bounds = {}
        width = int(seq_lens.max())
        input_ids = np.full((num_seqs, width), pad_token_id, dtype=np.int64)
        labels = np.full((num_seqs, width), IGNORE_INDEX, dtype=np.int64)
        seq_index = np.full((num_seqs, width), -1, dtype=np.int64)
        for i, (s, p) in enumerate(zip(seqs, prompt_lens, strict=True)):
            input_ids[i, : len(s)] = s
            labels[i, : len(s)] = shifted_labels(s, p)
            seq_index[i, : len(s)] = i
        position_ids = np.broadcast_to(np.arange(width), (num_seqs, width)).copy()
        attention_mask = torch.from_numpy((seq_index >= 0).astype(np.int64))
    return {
        "input_ids": torch.from_numpy(input_ids),
        "position_ids": torch.from_numpy(position_ids),
        "labels": torch.from_numpy(labels),
        "seq_index": torch.from_numpy(seq_index),
        "num_real_tokens": int(seq_lens.sum()),
        "attention_mask": attention_mask,
        **bounds,
    }


# ------------------------------------------------------------------------------------------------ planners


def _packed_bins(sizes: list[int], world_size: int, budget: int) -> list[list[list[int]]]:
    """rank -> micro-batches -> pair positions (empty lists become fillers)."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bfd = _best_fit_decreasing(order, sizes, budget)
    most = math.ceil(len(bfd) / world_size)
    least = max(1, math.ceil(sum(sizes) / (world_size * budget)))

    def attempt(per_rank: int):
        # Prefer micro-batches of equal size (ZeRO-3 ranks move in lockstep through each micro-batch); when
        # that does not fit, pack each rank tightly.
        for bins in (_WorstFit, _BestFit):
            ranks = _rank_balanced(order, sizes, world_size, per_rank, budget, bins)
            if ranks is not None:
                return ranks
        return None

    # The smallest per-rank count that works, by bisection (more micro-batches only add room).
    found = None
    while least <= most:
        mid = (least + most) // 2
        ranks = attempt(mid)
        if ranks is None:
            least = mid + 1
        else:
            found, most = ranks, mid - 1
    if found is not None:
        return found
    # Rank-balanced placement can miss the best-fit-decreasing count when ranks > 1; deal those bins instead.
    per_rank = math.ceil(len(bfd) / world_size)
    return _deal(bfd, [sum(sizes[i] for i in b) for b in bfd], world_size, per_rank)


def _rank_balanced(order, sizes, world_size: int, per_rank: int, budget: int, bins_type):
    """Each pair (longest first) goes to the least-loaded rank that has room for it, into the micro-batch that
    ``bins_type`` picks; None if some pair fits nowhere. Heaps of (load, rank) keep it deterministic."""
    ranks = [(0, r) for r in range(world_size)]
    bins = [bins_type(per_rank) for _ in range(world_size)]
    members: list[list[list[int]]] = [[[] for _ in range(per_rank)] for _ in range(world_size)]
    for i in order:
        size = sizes[i]
        tried = []
        while ranks:
            load, r = heapq.heappop(ranks)
            j = bins[r].place(size, budget)
            if j is not None:
                members[r][j].append(i)
                heapq.heappush(ranks, (load + size, r))
                break
            tried.append((load, r))
        else:
            return None
        for entry in tried:
            heapq.heappush(ranks, entry)
    return members


class _WorstFit:
    """A rank's micro-batches; a pair goes to the least-filled one (lowest index on ties) if it fits there."""

    def __init__(self, count: int) -> None:
        self.heap = [(0, j) for j in range(count)]

    def place(self, size: int, budget: int) -> int | None:
        load, j = self.heap[0]
        if load + size > budget:
            return None
        heapq.heapreplace(self.heap, (load + size, j))
        return j


class _BestFit:
    """A rank's micro-batches; a pair goes to the fullest one it still fits in (lowest index on ties)."""

    def __init__(self, count: int) -> None:
        self.sorted = [(0, -j) for j in reversed(range(count))]  # ascending (load, -index)

    def place(self, size: int, budget: int) -> int | None:
        k = bisect.bisect_right(self.sorted, (budget - size, math.inf)) - 1
        if k < 0:
            return None
        load, neg_j = self.sorted.pop(k)
        bisect.insort(self.sorted, (load + size, neg_j))
        return -neg_j


def _best_fit_decreasing(order: list[int], sizes: list[int], budget: int) -> list[list[int]]:
    """Classic bin packing (<= 11/9 OPT + 1 bins): each pair goes to the fullest bin it still fits in."""
    free: list[tuple[int, int]] = []  # sorted (free space, bin index)
    bins: list[list[int]] = []
    for i in order:
        k = bisect.bisect_left(free, (sizes[i], -1))
        if k == len(free):
            bins.append([i])
            bisect.insort(free, (budget - sizes[i], len(bins) - 1))
        else:
            space, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (space - sizes[i], b))
    return bins


def _padded_bins(
    longest: list[int], sizes: list[int], world_size: int, budget: int, seqs_per_item: int = 2
) -> list[list[list[int]]]:
    """Sort by length, cut into micro-batches of at most budget padded tokens, deal them to ranks."""
    order = sorted(range(len(longest)), key=lambda i: (-longest[i], i))
    bins: list[list[int]] = []
    width = 0
    for i in order:
        # Sorted longest first, so the first pair of a micro-batch sets its row length.
        if bins and seqs_per_item * (len(bins[-1]) + 1) * width <= budget:
            bins[-1].append(i)
        else:
            bins.append([i])
            width = longest[i]
    costs = [seqs_per_item * len(b) * longest[b[0]] for b in bins]
    return _deal(bins, costs, world_size, math.ceil(len(bins) / world_size))


def _deal(bins: list[list[int]], costs: list[int], world_size: int, per_rank: int) -> list[list[list[int]]]:
    """Costliest bin first to the least-loaded rank that still has a free slot; empty slots become fillers."""
    assert len(bins) <= world_size * per_rank
    ranks: list[list[list[int]]] = [[] for _ in range(world_size)]
    heap = [(0, r) for r in range(world_size)]
    for b in sorted(range(len(bins)), key=lambda b: (-costs[b], b)):
        load, r = heapq.heappop(heap)
        ranks[r].append(bins[b])
        if len(ranks[r]) < per_rank:
            heapq.heappush(heap, (load + costs[b], r))
    for r in range(world_size):
        ranks[r].extend([] for _ in range(per_rank - len(ranks[r])))
    return ranks
