"""Ulysses sequence parallelism (train.sequence_parallel; runtime/sequence_parallel.py): the row padding and
slicing (data/packing.py), the refusals, and 2-rank runs with sequence_parallel 2 whose step-0 per-sequence
log-probs, loss and gathered gradient equal one process on the same pairs, with sequences straddling the
split point; the cached reference and resume compose with it."""

from __future__ import annotations

import json

import pytest
import torch

from hdpo_ds.config import ConfigError, load_config
from hdpo_ds.data import collate, pack_step, packing_stats, pad_row, sequence_shard
from hdpo_ds.data.sampler import PairSampler
from tests.run_helpers import BUDGET, PAIRS_PER_STEP, assert_grads_close, launch

SP = 2


def test_pad_row_and_shards_rebuild_the_row(assets):
    """A packed row of odd length gets one pad token (label -100, seq_index -1, a position run of its own);
    the two shards are its halves, and their concatenation is the padded row."""
    pairs = assets["pairs"]
    packed = pack_step(pairs.lengths[:3], world_size=1, max_tokens_per_micro_batch=10_000)
    mb = packed.ranks[0][0]
    plain = collate(pairs, mb, pad_token_id=0, packing=True)
    length = plain.input_ids.shape[1]
    for multiple in (2, 3, 4):
        padded = collate(pairs, mb, pad_token_id=0, packing=True, multiple_of=multiple)
        k = -length % multiple
        assert padded.input_ids.shape[1] == length + k
        assert padded.num_real_tokens == plain.num_real_tokens
        assert padded.position_ids[0, length:].tolist() == list(range(k))
        assert (padded.labels[0, length:] == -100).all() and (padded.seq_index[0, length:] == -1).all()
        assert torch.equal(padded.input_ids[:, :length], plain.input_ids)
        shards = [sequence_shard(padded, multiple, r) for r in range(multiple)]
        for name in ("input_ids", "position_ids", "labels", "seq_index"):
            assert torch.equal(torch.cat([getattr(s, name) for s in shards], dim=1), getattr(padded, name))
    assert pad_row(plain, 1, 0) is plain
    with pytest.raises(ValueError, match="does not split"):
        sequence_shard(plain if length % 2 else pad_row(plain, 3, 0), 2, 0)


def test_pack_step_counts_the_padding():
    """multiple_of pads each packed row by fewer than multiple_of tokens, counted in padding_fraction."""
    lengths = [[5, 6], [7, 7], [3, 4]]  # pairs of 11, 14 and 7 tokens
    packed = pack_step(lengths, world_size=1, max_tokens_per_micro_batch=20, multiple_of=4)
    rows = sorted(mb.tensor_tokens for mb in packed.ranks[0])
    assert sum(mb.tokens for mb in packed.ranks[0]) == 32
    assert all(t % 4 == 0 for t in rows) and sum(rows) - 32 < 4 * len(rows)
    stats = packing_stats(packed)
    assert stats.padding_fraction == pytest.approx((sum(rows) - 32) / sum(rows))
    with pytest.raises(ValueError, match="multiple_of"):
        pack_step(lengths, world_size=1, max_tokens_per_micro_batch=40, packing=False, multiple_of=2)


def _cfg(assets, *extra):
    base = [
        f"model.name_or_path={assets['model']}",
        f"data.train_files=[{assets['train']}]",
        "output_dir=o",
        "train.sequence_parallel=2",
    ]
    return load_config(None, [*base, *extra])


def test_refusals_name_the_key(assets, tmp_path):
    from hdpo_ds.recipes.preference import check_before_engines
    from hdpo_ds.recipes.sft import check_sft_config
    from hdpo_ds.runtime import sequence_parallel

    with pytest.raises(ConfigError, match="train.sequence_parallel: 2 splits packed rows"):
        _cfg(assets, "data.packing=false")
    with pytest.raises(ConfigError, match="train.sequence_parallel: must be >= 1"):
        _cfg(assets, "train.sequence_parallel=0")
    # the group's budget holds a pair: 2 x 96 per rank for pairs of 2 x 192 tokens
    cfg = _cfg(
        assets, "data.max_length=192", "data.max_prompt_length=64", "data.max_tokens_per_micro_batch=192"
    )
    assert cfg.data.max_tokens_per_micro_batch * cfg.train.sequence_parallel >= 2 * cfg.data.max_length
    with pytest.raises(ConfigError, match="the group's budget"):
        _cfg(
            assets, "data.max_length=192", "data.max_prompt_length=64", "data.max_tokens_per_micro_batch=190"
        )
    with pytest.raises(ConfigError, match="TDPO"):
        check_before_engines(_cfg(assets, "loss.type=tdpo2", "loss.alpha=1.0"))
    with pytest.raises(ConfigError, match="does not apply to SFT"):
        check_sft_config(_cfg(assets))
    with pytest.raises(ConfigError, match="must divide .* 4 attention heads"):
        check_before_engines(_cfg(assets, "train.sequence_parallel=3"))
    # a reference whose attention shape differs from the policy's (the all-to-all is built for one)
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(assets["model"])
    config.num_key_value_heads = 4
    LlamaForCausalLM(config).save_pretrained(tmp_path / "ref")
    with pytest.raises(ConfigError, match="reference.name_or_path: .* attention shape"):
        check_before_engines(_cfg(assets, f"reference.name_or_path={tmp_path / 'ref'}"))
    with pytest.raises(ConfigError, match="model.attn_implementation: sdpa cannot run"):
        sequence_parallel.initialize(2, config, "sdpa")
    with pytest.raises(ConfigError, match="2 does not divide the world size 1"):
        sequence_parallel.initialize(2, config, "sdpa_packed")


def _step0(assets, budget: int):
    """H-DPO (beta 0.5, alpha 0.9, the reference the policy's initial copy) over step 0's pairs, one
    sequence at a time in one process: the mean loss, the per-sequence log-probs, the gradient by name."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32).eval()
    pairs = assets["pairs"]
    assignment = PairSampler(
        pairs.lengths,
        pairs_per_step=PAIRS_PER_STEP,
        world_size=1,
        rank=0,
        seed=assets["seed"],
        max_tokens_per_micro_batch=budget,
        multiple_of=SP,
    ).assignment(0, 0)
    beta, alpha = 0.5, 0.9
    losses, logps = [], []
    for index in assignment.pair_indices:
        pair = pairs[int(index)]
        sides = []
        for response in (pair.chosen_ids, pair.rejected_ids):
            ids = torch.tensor([list(pair.prompt_ids) + list(response)])
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].double(), -1)
            start = len(pair.prompt_ids) - 1
            sides.append(logp[start:].gather(-1, ids[0, 1:][start:, None]).sum())
        chosen, rejected = sides
        logps.append((chosen.item(), rejected.item()))
        z = alpha * beta * (chosen - rejected) - beta * (chosen.detach() - rejected.detach())
        losses.append(torch.log1p(torch.exp(-z)))
    loss = sum(losses) / len(losses)
    loss.backward()
    return assignment, loss.item(), logps, {n: p.grad.float() for n, p in model.named_parameters()}


def _straddles(assignment, pairs) -> bool:
    """Whether some sequence of the step's micro-batches runs across the middle of its padded row."""
    for mb in assignment.packed.ranks[0]:
        half, start = mb.tensor_tokens // SP, 0
        for pos in mb.pairs:
            pair = pairs[int(assignment.pair_indices[pos])]
            for response in (pair.chosen_ids, pair.rejected_ids):
                end = start + len(pair.prompt_ids) + len(response)
                if start < half < end:
                    return True
                start = end
    return False


@pytest.mark.distributed
def test_two_ranks_as_one_group_equal_one_process(assets, tmp_path):
    """2 ranks, sequence_parallel 2 (data parallel 1): each micro-batch's row is split between the ranks
    with sequences straddling the cut. Step 0's per-sequence log-probs (the logged means, and every pair
    through the loss), loss and gathered gradient equal one process; then the cached reference (computed
    under the same split) with the fused head gives the same step 0, and a run resumed at step 1 ends with
    the uninterrupted run's weights."""
    assignment, loss, logps, grads = _step0(assets, SP * BUDGET)
    assert _straddles(assignment, assets["pairs"])
    online = launch(assets, "sp2", "deepspeed", 2, extra=["train.sequence_parallel=2", "train.save_every=1"])
    metrics = online["metrics"]
    assert metrics["loss"][0] == pytest.approx(loss, rel=1e-5)
    n = len(logps)
    assert metrics["logps/chosen"][0] == pytest.approx(sum(c for c, _ in logps) / n, rel=1e-5)
    assert metrics["logps/rejected"][0] == pytest.approx(sum(r for _, r in logps) / n, rel=1e-5)
    assert metrics["tokens"][0] == sum(
        int(sum(assets["pairs"].lengths[int(i)])) for i in assignment.pair_indices
    )
    assert metrics["padding_fraction"][0] > 0 or all(
        mb.tensor_tokens == mb.tokens for mb in assignment.packed.ranks[0]
    )
    assert_grads_close(torch.load(online["dir"] / "diagnostics" / "grads_step0.pt"), grads)
    assert "eval/loss" in metrics

    cached = launch(
        assets,
        "sp2_cached",
        "deepspeed",
        1,
        extra=["train.sequence_parallel=2", "reference.mode=auto", "train.fused_head=true"],
    )
    # the precompute pass and the policy both through the fused head, on their slices
    assert cached["params"]["run.fused_head"] == "True"
    assert cached["metrics"]["loss"][0] == pytest.approx(loss, rel=1e-5)
    assert_grads_close(torch.load(cached["dir"] / "diagnostics" / "grads_step0.pt"), grads)
    manifest = json.loads((cached["dir"] / "reference_cache" / "train" / "manifest.json").read_text())
    assert manifest["num_pairs"] == len(assets["pairs"])

    # resume from the first checkpoint (after step 0) of the first run: step 1 equals the uninterrupted one
    first = online["dir"] / "checkpoints" / "step00000001"
    assert (first / "COMPLETE.json").is_file()
    resumed = launch(
        assets,
        "sp2_resumed",
        "deepspeed",
        2,
        extra=[
            "train.sequence_parallel=2",
            f"train.resume={first}",
            "train.dump_gradients_at=[]",
        ],
    )
    assert "resumed from" in resumed["stderr"]
    from safetensors.torch import load_file

    got = load_file(str(resumed["dir"] / "hf" / "model.safetensors"))
    expected = load_file(str(online["dir"] / "hf" / "model.safetensors"))
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.distributed
def test_four_ranks_as_two_groups_of_two_equal_one_process(assets):
    """4 ranks as 2 x 2 (data x sequence): each group packs half of step 0's pairs into rows of twice
    the per-rank budget; loss, log-probs and gathered gradient equal one process (make test-slow)."""
    _, loss, logps, grads = _step0(assets, SP * BUDGET)
    run = launch(assets, "sp4", "deepspeed", 1, extra=["train.sequence_parallel=2"], ranks=4)
    metrics = run["metrics"]
    assert metrics["loss"][0] == pytest.approx(loss, rel=1e-5)
    n = len(logps)
    assert metrics["logps/chosen"][0] == pytest.approx(sum(c for c, _ in logps) / n, rel=1e-5)
    assert_grads_close(torch.load(run["dir"] / "diagnostics" / "grads_step0.pt"), grads)
