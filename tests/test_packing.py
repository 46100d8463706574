"""Packing, collation and the step sampler (hdpo_ds/data/packing.py, hdpo_ds/data/sampler.py)."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hdpo_ds.data.packing import (
    IGNORE_INDEX,
    MicroBatchPacking,
    _best_fit_decreasing,
    collate,
    lower_bound_micro_batches,
    pack_step,
    packing_stats,
)
from hdpo_ds.data.sampler import PairSampler
from hdpo_ds.data.tokenize import TokenizedPair
from tests.data_helpers import tiny_llama

MAX_LENGTH = 512
BUDGET = 2 * MAX_LENGTH


def lognormal_lengths(num_pairs: int, seed: int = 0, max_length: int = MAX_LENGTH) -> np.ndarray:
    """(num_pairs, 2) sequence lengths shaped like chat preference data: a shared prompt (median 60 tokens)
    and two responses (median 120), lognormal with sigma 0.8, capped at max_length (about 7% hit the cap)."""
    rng = np.random.default_rng(seed)
    prompt = np.ceil(rng.lognormal(np.log(60), 0.8, num_pairs)).astype(np.int64)
    responses = np.ceil(rng.lognormal(np.log(120), 0.8, (num_pairs, 2))).astype(np.int64)
    return np.minimum(prompt[:, None] + responses, max_length)


def random_pairs(lengths: np.ndarray, vocab: int = 256, seed: int = 0) -> list[TokenizedPair]:
    """Pairs with the given sequence lengths; prompts take 1..len-1 tokens of the shorter sequence."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i, (c, r) in enumerate(lengths.tolist()):
        prompt_len = int(rng.integers(1, min(c, r))) if min(c, r) > 1 else 1
        prompt_len = min(prompt_len, c - 1, r - 1) if min(c, r) > 1 else 1
        prompt = rng.integers(3, vocab, prompt_len).tolist()
        chosen = rng.integers(3, vocab, max(c - prompt_len, 1)).tolist()
        rejected = rng.integers(3, vocab, max(r - prompt_len, 1)).tolist()
        pairs.append(TokenizedPair(f"p{i}", prompt, chosen, rejected, False, False))
    return pairs


# ------------------------------------------------------------------------------------------------- collate


def test_collate_layout_worked_example():
    """prompt [1, 5], chosen [7, 2], rejected [8, 9, 2]:
    sequences [1, 5, 7, 2] and [1, 5, 8, 9, 2]; logits at t predict labels[t] = input_ids[t + 1] for the
    response tokens only: [-100, 7, 2, -100] and [-100, 8, 9, 2, -100]."""
    pairs = [TokenizedPair("a", [1, 5], [7, 2], [8, 9, 2], True, True)]
    mb = MicroBatchPacking((0,), False, 9, 9)
    packed = collate(pairs, mb, pad_token_id=0, packing=True)
    assert packed.input_ids.tolist() == [[1, 5, 7, 2, 1, 5, 8, 9, 2]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4]]
    assert packed.labels.tolist() == [[-100, 7, 2, -100, -100, 8, 9, 2, -100]]
    assert packed.seq_index.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 1]]
    assert packed.pair_index.tolist() == [0, 0] and packed.is_chosen.tolist() == [True, False]
    assert packed.pair_ids == ["a"] and packed.num_real_tokens == 9 and packed.weight == 1.0
    assert packed.attention_mask is None and "attention_mask" not in packed.model_inputs()

    padded = collate(pairs, mb, pad_token_id=0, packing=False)
    assert padded.input_ids.tolist() == [[1, 5, 7, 2, 0], [1, 5, 8, 9, 2]]
    assert padded.labels.tolist() == [[-100, 7, 2, -100, -100], [-100, 8, 9, 2, -100]]
    assert padded.seq_index.tolist() == [[0, 0, 0, 0, -1], [1, 1, 1, 1, 1]]
    assert padded.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert padded.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert padded.num_real_tokens == 9 and padded.model_inputs()["use_cache"] is False


def per_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """fp32 log-probs of the labels (0 where ignored), same shape as labels."""
    logps = torch.log_softmax(logits.float(), dim=-1)
    safe = labels.clamp(min=0)
    return torch.where(labels != IGNORE_INDEX, logps.gather(-1, safe[..., None])[..., 0], 0.0)


@pytest.mark.parametrize("attn", ["eager", "sdpa", "sdpa_packed", "eager_packed"])
def test_packed_and_padded_forwards_match_separate_forwards(attn):
    """sdpa_packed and eager_packed are hdpo_ds.runtime.models' per-sequence attention; auto selects
    sdpa_packed on CPU for packing (a Llama asks for nothing else)."""
    from hdpo_ds.runtime.attention import select_attention

    config = tiny_llama(256).config
    assert select_attention("auto", "cpu", config, packing=True) == "sdpa_packed"
    assert select_attention("auto", "cpu", config, packing=False) == "sdpa"
    attn = select_attention(attn, "cpu", config)  # registers sdpa_packed with transformers
    lengths = np.array([[9, 14], [30, 5], [2, 3], [17, 17], [25, 40]])
    pairs = random_pairs(lengths, vocab=256, seed=1)
    pairs[2] = TokenizedPair("p2", [7], [9], [10, 11], False, False)  # one-token prompt and response
    model = tiny_llama(256, attn)
    mb = MicroBatchPacking(tuple(range(len(pairs))), False, int(lengths.sum()), int(lengths.sum()))
    packed = collate(pairs, mb, pad_token_id=0, packing=True)
    padded = collate(pairs, mb, pad_token_id=0, packing=False)
    with torch.no_grad():
        packed_lp = per_token_logps(model(**packed.model_inputs()).logits, packed.labels)[0]
        padded_lp = per_token_logps(model(**padded.model_inputs()).logits, padded.labels)

    for s in range(packed.num_seqs):
        pair = pairs[s // 2]
        seq = pair.prompt_ids + (pair.chosen_ids if s % 2 == 0 else pair.rejected_ids)
        ids = torch.tensor([seq])
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[0, len(pair.prompt_ids) - 1 : -1] = ids[0, len(pair.prompt_ids) :]
        alone = per_token_logps(logits, labels)[0]
        in_pack = packed_lp[packed.seq_index[0] == s]
        in_row = padded_lp[s][padded.seq_index[s] == s]
        assert int((labels != IGNORE_INDEX).sum()) == len(seq) - len(pair.prompt_ids)
        torch.testing.assert_close(in_pack, alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(in_row, alone, rtol=1e-5, atol=1e-5)
        total = alone.double().sum()
        torch.testing.assert_close(in_pack.double().sum(), total, rtol=1e-5, atol=0.0)
        torch.testing.assert_close(in_row.double().sum(), total, rtol=1e-5, atol=0.0)


def test_filler_micro_batch_has_zero_weight_and_runs_finite():
    lengths = np.array([[40, 50], [6, 7], [30, 30]])
    packed = pack_step(lengths, world_size=4, max_tokens_per_micro_batch=200)
    assert packed.micro_batches_per_rank == 1
    fillers = [mb for rank in packed.ranks for mb in rank if mb.filler]
    assert len(fillers) == 1 and fillers[0].pairs == (1,)  # the step's shortest pair
    pairs = random_pairs(lengths, vocab=64)
    batch = collate(pairs, fillers[0], pad_token_id=0, packing=True)
    assert batch.weight == 0.0 and batch.pair_ids == ["p1"]
    model = tiny_llama(64, "sdpa")
    model.train()
    loss = -per_token_logps(model(**batch.model_inputs()).logits, batch.labels).sum() * batch.weight
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --------------------------------------------------------------------------------------------------- packing


def test_packing_stats_worked_example():
    """Sizes 7, 10, 4 (21 tokens), budget 20. Packed: 21 > 20, so 2 micro-batches, largest first: [7 + 4]
    and [10]; fill 21 / 40. Padded (sorted by longest 5, 4, 2): [pair 1, pair 0] = 4 rows × 5 = 20,
    [pair 2] = 2 × 2 = 4; tensor tokens 24, padding 3 / 24."""
    lengths = [(3, 4), (5, 5), (2, 2)]
    packed = pack_step(lengths, world_size=1, max_tokens_per_micro_batch=20)
    assert [mb.pairs for mb in packed.ranks[0]] == [(0, 2), (1,)]
    stats = packing_stats(packed)
    assert (
        stats.micro_batches,
        stats.real_tokens,
        stats.tensor_tokens,
        stats.fill,
        stats.padding_fraction,
    ) == (2, 21, 21, 21 / 40, 0.0)
    padded = pack_step(lengths, world_size=1, max_tokens_per_micro_batch=20, packing=False)
    assert [mb.pairs for mb in padded.ranks[0]] == [(0, 1), (2,)]
    assert [mb.tensor_tokens for mb in padded.ranks[0]] == [20, 4]
    stats = packing_stats(padded)
    assert (stats.tensor_tokens, stats.fill, stats.padding_fraction) == (24, 21 / 40, 3 / 24)


@pytest.mark.parametrize("world_size", range(1, 9))
def test_fill_on_long_tailed_data_beats_padding(world_size, capsys):
    """A step of 512 pairs (about 230 micro-batches of 1024 tokens in all). All ranks run the same number of
    micro-batches, which costs up to world_size - 1 micro-batches per step: small steps on many ranks fill
    less (256 pairs on 8 ranks: 92-97%; see docs/benchmarks.md)."""
    lengths = lognormal_lengths(512, seed=world_size)
    packed = packing_stats(pack_step(lengths, world_size=world_size, max_tokens_per_micro_batch=BUDGET))
    padded = packing_stats(
        pack_step(lengths, world_size=world_size, max_tokens_per_micro_batch=BUDGET, packing=False)
    )
    with capsys.disabled():
        print(
            f"\nworld {world_size}: packed fill {packed.fill:.3f}, padded fill {padded.fill:.3f} "
            f"(padding {padded.padding_fraction:.3f}), rank imbalance {packed.rank_imbalance:.4f}"
        )
    assert packed.fill >= 0.95
    assert packed.padding_fraction == 0.0
    assert padded.fill < 0.75
    assert packed.rank_imbalance < 1.01  # ranks get equal tokens, not equal pair counts


def _fewest_bins(sizes: list[int], budget: int) -> int:
    """The optimum, by exhaustive search (small instances only)."""
    order = sorted(sizes, reverse=True)

    def fits(bins: list[int], i: int) -> bool:
        if i == len(order):
            return True
        tried = set()
        for b, load in enumerate(bins):
            if load + order[i] <= budget and load not in tried:
                tried.add(load)
                bins[b] += order[i]
                if fits(bins, i + 1):
                    return True
                bins[b] -= order[i]
        return False

    return next(n for n in range(1, len(order) + 1) if fits([0] * n, 0))


def test_lower_bound_worked_examples():
    # three 7s need a micro-batch each (7 + 4 > 10), the three 4s two more: 5, while sum / budget gives 4
    assert lower_bound_micro_batches([7, 7, 7, 4, 4, 4], 10) == 5 == _fewest_bins([7, 7, 7, 4, 4, 4], 10)
    assert lower_bound_micro_batches([6, 6, 6], 10) == 3  # no two fit together; sum / budget gives 2
    assert lower_bound_micro_batches([5, 5, 5, 5], 10) == 2
    assert lower_bound_micro_batches([10, 1], 10) == 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=1, max_size=7), st.integers(20, 30))
def test_lower_bound_never_exceeds_the_optimum(sizes, budget):
    bound = lower_bound_micro_batches(sizes, budget)
    assert math.ceil(sum(sizes) / budget) <= bound <= _fewest_bins(sizes, budget)


def test_packer_within_two_of_the_lower_bound_and_never_above_best_fit_decreasing():
    """One rank, 15 long-tailed steps of 64-256 pairs (the claim in docs/benchmarks.md)."""
    for i, n in enumerate(np.linspace(64, 256, 15).astype(int)):
        lengths = lognormal_lengths(int(n), seed=100 + i)
        sizes = [int(x) for x in lengths.sum(axis=1)]
        used = len(pack_step(lengths, world_size=1, max_tokens_per_micro_batch=BUDGET).ranks[0])
        order = sorted(range(len(sizes)), key=lambda j: (-sizes[j], j))
        bfd = len(_best_fit_decreasing(order, sizes, BUDGET))
        bound = lower_bound_micro_batches(sizes, BUDGET)
        assert bound <= used <= min(bfd, bound + 2), (n, bound, used, bfd)


def test_equal_micro_batch_counts_where_a_naive_split_differs():
    """Longest pairs first in the step: splitting pairs evenly by count, then packing each rank alone,
    gives the first ranks more micro-batches. The packing gives all ranks the same count."""
    lengths = lognormal_lengths(200, seed=3)
    lengths = lengths[np.argsort(-lengths.sum(axis=1), kind="stable")]
    sizes = lengths.sum(axis=1).tolist()
    for world_size in range(1, 9):
        chunks = np.array_split(np.arange(len(sizes)), world_size)
        naive = [
            len(_best_fit_decreasing(sorted(c.tolist(), key=lambda i: (-sizes[i], i)), sizes, BUDGET))
            for c in chunks
        ]
        if world_size > 1:
            assert len(set(naive)) > 1, naive
        for packing in (True, False):
            packed = pack_step(
                lengths, world_size=world_size, max_tokens_per_micro_batch=BUDGET, packing=packing
            )
            assert len({len(rank) for rank in packed.ranks}) == 1
            real = sorted(p for rank in packed.ranks for mb in rank if not mb.filler for p in mb.pairs)
            assert real == list(range(len(sizes)))


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 64), st.integers(1, 64)), min_size=1, max_size=40),
    world_size=st.integers(1, 8),
    extra=st.integers(0, 64),
    packing=st.booleans(),
)
def test_packing_invariants(lengths, world_size, extra, packing):
    budget = 128 + extra
    packed = pack_step(lengths, world_size=world_size, max_tokens_per_micro_batch=budget, packing=packing)
    assert packed.world_size == world_size
    assert len({len(rank) for rank in packed.ranks}) == 1 and packed.micro_batches_per_rank >= 1
    real = sorted(p for rank in packed.ranks for mb in rank if not mb.filler for p in mb.pairs)
    assert real == list(range(len(lengths)))  # each pair exactly once, chosen and rejected together
    for rank in packed.ranks:
        for mb in rank:
            assert mb.tensor_tokens <= budget
            assert mb.tokens == sum(lengths[p][0] + lengths[p][1] for p in mb.pairs)
            if not packing:
                assert mb.tensor_tokens == 2 * len(mb.pairs) * max(max(lengths[p]) for p in mb.pairs)
            assert not mb.filler or len(mb.pairs) == 1
    # The packed is a function of the lengths alone: same input in another container, same packed.
    again = pack_step(
        np.array(lengths), world_size=world_size, max_tokens_per_micro_batch=budget, packing=packing
    )
    assert again == packed
    if packing:  # never more micro-batches than best-fit-decreasing bins spread over the ranks
        sizes = [c + r for c, r in lengths]
        bfd = _best_fit_decreasing(sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)), sizes, budget)
        assert packed.micro_batches_per_rank <= math.ceil(len(bfd) / world_size)


def test_budget_must_hold_any_pair():
    with pytest.raises(ValueError) as info:
        pack_step([(10, 10), (60, 50)], world_size=1, max_tokens_per_micro_batch=100)
    assert str(info.value) == (
        "data.max_tokens_per_micro_batch=100 cannot hold pair 1 (sequences of 60 and 50 tokens); it must be "
        ">= 2 × data.max_length"
    )
    with pytest.raises(ValueError, match=r"cannot hold pair 0 \(sequences of 60 and 30 tokens, padded\)"):
        pack_step([(60, 30)], world_size=1, max_tokens_per_micro_batch=100, packing=False)


# ------------------------------------------------------------------------------------------------- sampler


def make_sampler(lengths, rank=0, **kw):
    kw.setdefault("pairs_per_step", 32)
    kw.setdefault("world_size", 4)
    kw.setdefault("seed", 1234)
    kw.setdefault("max_tokens_per_micro_batch", BUDGET)
    kw.setdefault("max_length", MAX_LENGTH)
    return PairSampler(lengths, rank=rank, **kw)


def test_sampler_covers_the_epoch_and_ranks_agree():
    lengths = lognormal_lengths(100, seed=5)
    samplers = [make_sampler(lengths, rank=r, drop_last=False) for r in range(4)]
    assert len(samplers[0]) == 4  # 32 + 32 + 32 + 4
    steps = [list(s) for s in samplers]
    seen = []
    for k in range(4):
        packings = {steps[r][k].packed for r in range(4)}
        assert len(packings) == 1  # every rank computed the same packing
        step = steps[0][k]
        for r in range(4):
            for mb in steps[r][k].micro_batches:
                if not mb.filler:
                    seen.extend(int(step.pair_indices[p]) for p in mb.pairs)
    assert sorted(seen) == list(range(100))
    assert [s.num_pairs for s in steps[0]] == [32, 32, 32, 4]
    assert samplers[0].epoch == 1 and samplers[0].offset == 0
    second = list(samplers[0])
    assert not np.array_equal(second[0].pair_indices, steps[0][0].pair_indices)  # reshuffled per epoch


def test_sampler_resume_is_exact():
    lengths = lognormal_lengths(90, seed=6)
    uninterrupted = make_sampler(lengths, pairs_per_step=20)
    expected = [
        (s.epoch, s.step, s.pair_indices.tolist(), s.micro_batches) for _ in range(3) for s in uninterrupted
    ]
    first = make_sampler(lengths, pairs_per_step=20)
    got = []
    for s in first:
        got.append((s.epoch, s.step, s.pair_indices.tolist(), s.micro_batches))
        if s.step == 1:
            break
    state = first.state_dict()
    assert state == {"epoch": 0, "offset": 2, "seed": 1234, "num_pairs": 90, "pairs_per_step": 20}
    resumed = make_sampler(lengths, pairs_per_step=20)
    resumed.load_state_dict(state)
    while len(got) < len(expected):
        got.extend((s.epoch, s.step, s.pair_indices.tolist(), s.micro_batches) for s in resumed)
    assert got == expected
    with pytest.raises(ValueError, match="the checkpoint has seed=1234 but this run has 1"):
        make_sampler(lengths, pairs_per_step=20, seed=1).load_state_dict(state)


def test_sampler_validates_its_settings():
    lengths = lognormal_lengths(50)
    with pytest.raises(ValueError, match=r"^train.pairs_per_step must be an integer >= the world size \(4\)"):
        make_sampler(lengths, pairs_per_step=3)
    with pytest.raises(ValueError, match=r"^train.pairs_per_step \(64\) exceeds the number of pairs \(50\)"):
        make_sampler(lengths, pairs_per_step=64)
    with pytest.raises(ValueError) as info:
        make_sampler(lengths, max_tokens_per_micro_batch=1000)
    assert str(info.value) == (
        "data.max_tokens_per_micro_batch (1000) must be >= 2 × data.max_length (1024) so that any pair fits "
        "in one micro-batch"
    )
    with pytest.raises(ValueError, match=r"more than data.max_length \(100\)"):
        make_sampler(lengths, max_length=100)


PLAN_DIGEST = """
import hashlib, sys
sys.path.insert(0, {root!r})
from tests.test_packing import lognormal_lengths, make_sampler
s = make_sampler(lognormal_lengths(120, seed=9), rank=2, world_size=3, pairs_per_step=40)
plan = [(a.pair_indices.tolist(), a.packed) for _ in range(2) for a in s]
print(hashlib.sha256(repr(plan).encode()).hexdigest())
"""


def test_packing_does_not_depend_on_the_python_hash_seed():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    s = make_sampler(lognormal_lengths(120, seed=9), rank=2, world_size=3, pairs_per_step=40)
    local = hashlib.sha256(
        repr([(a.pair_indices.tolist(), a.packed) for _ in range(2) for a in s]).encode()
    ).hexdigest()
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", PLAN_DIGEST.format(root=root)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            cwd=root,
        )
        digests.add(out.stdout.strip())
    assert digests == {local}
