"""Weighted mixtures (data/mixture.py, data/sampler.py): source entries, quotas, the per-epoch draws, resume,
ranks, per-source counts and metrics; and that a plain list of paths behaves exactly as before."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch

from hdpo_ds.config import ConfigError, load_config
from hdpo_ds.data.mixture import SourceSpec, parse_sources, quotas
from hdpo_ds.data.records import DataError, load_records
from hdpo_ds.data.sampler import PairSampler
from hdpo_ds.data.tokenize import tokenize_pairs
from hdpo_ds.recipes.splits import Split, source_params
from hdpo_ds.tracking.metrics import source_metrics, source_sums
from tests.data_helpers import make_tokenizer

BASE = ["model.name_or_path=configs/models/tiny-demo"]


def write_sources(tmp_path):
    """a.jsonl: 6 pairs; b.jsonl: 4 pairs (contents fixed: the plain-path fingerprints below hash them)."""
    a = [{"prompt": f"Question {i}?", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(6)]
    b = [{"prompt": f"Ask {i}?", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(4)]
    paths = []
    for name, rows in (("a.jsonl", a), ("b.jsonl", b)):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(path))
    return paths


def sampler(sizes, weights, *, seed=1, pairs_per_step=10, world_size=1, rank=0):
    sources = np.repeat(np.arange(len(sizes)), sizes)
    return PairSampler(
        np.full((len(sources), 2), 5),
        pairs_per_step=pairs_per_step,
        world_size=world_size,
        rank=rank,
        seed=seed,
        max_tokens_per_micro_batch=20,
        sources=sources if weights is not None else None,
        weights=weights,
    ), sources


# ------------------------------------------------------------------------------------------- quotas


def test_quotas_by_largest_remainder_hand_worked():
    # 110 * 3/4 = 82.5 and 110 * 1/4 = 27.5: floors 82 + 27 = 109, the last draw goes to the tie's lower index
    assert quotas([3, 1], 110).tolist() == [83, 27]
    # 10/3 each: floors 3, 3, 3; one left, to source 0
    assert quotas([1, 1, 1], 10).tolist() == [4, 3, 3]
    # 3.5, 1.75, 1.75: floors 3, 1, 1; two left, to the largest remainders (.75, .75)
    assert quotas([0.5, 0.25, 0.25], 7).tolist() == [3, 2, 2]
    # exact in rationals: 0.1 + 0.2 is no trouble
    assert quotas([0.1, 0.2, 0.7], 10).tolist() == [1, 2, 7]
    with pytest.raises(ValueError, match="> 0"):
        quotas([1, 0], 5)


# ------------------------------------------------------------------------------------------ sampler


def test_each_epoch_draws_every_source_exactly_its_quota():
    s, sources = sampler([10, 100], [3, 1])
    assert s.quotas.tolist() == [83, 27] and len(s) == 11  # an epoch stays N = 110 draws
    for epoch in range(5):
        order = s.permutation(epoch)
        assert len(order) == 110
        assert np.bincount(sources[order], minlength=2).tolist() == [83, 27]


def test_subsampled_source_is_drawn_without_replacement_across_epochs():
    s, sources = sampler([10, 100], [3, 1])
    big = [np.sort(order[sources[order] == 1]) for order in map(s.permutation, range(4))]
    first_three = np.concatenate(big[:3])  # stream positions 0..80 of pass 0: 81 distinct pairs
    assert len(first_three) == 81 and len(np.unique(first_three)) == 81
    # epoch 3 takes positions 81..107: the 19 pairs pass 0 had left, then 8 of pass 1
    assert set(np.concatenate(big[:4]).tolist()) == set(range(10, 110))


def test_repeated_source_is_drawn_in_whole_passes():
    s, sources = sampler([10, 100], [3, 1])
    # 10 epochs draw source 0 830 times = 83 whole passes over its 10 pairs: each pair exactly 83 times
    small = np.concatenate([o[sources[o] == 0] for o in map(s.permutation, range(10))])
    assert np.bincount(small, minlength=10).tolist() == [83] * 10
    # within epoch 0 (passes 0..7 and 3 pairs of pass 8): every pair 8 or 9 times
    counts = np.bincount(s.permutation(0)[sources[s.permutation(0)] == 0], minlength=10)
    assert sorted(counts.tolist()) == [8] * 7 + [9] * 3


def test_same_seed_same_order_other_seed_other_order():
    a, _ = sampler([10, 100], [3, 1], seed=5)
    b, _ = sampler([10, 100], [3, 1], seed=5)
    c, _ = sampler([10, 100], [3, 1], seed=6)
    for epoch in (0, 3):
        assert np.array_equal(a.permutation(epoch), b.permutation(epoch))
        assert not np.array_equal(a.permutation(epoch), c.permutation(epoch))


def test_two_ranks_see_the_union_of_one_process_order():
    one, _ = sampler([10, 100], [3, 1], world_size=1)
    ranks = [sampler([10, 100], [3, 1], world_size=2, rank=r)[0] for r in range(2)]
    for epoch, step in ((0, 0), (0, 7), (2, 4)):
        single = one.assignment(epoch, step)
        per_rank = [r.assignment(epoch, step) for r in ranks]
        for a in per_rank:
            assert np.array_equal(a.pair_indices, single.pair_indices)
        seen = collections.Counter(
            int(a.pair_indices[pos])
            for a in per_rank
            for mb in a.micro_batches
            if not mb.filler
            for pos in mb.pairs
        )
        assert seen == collections.Counter(single.pair_indices.tolist())


def test_resume_mid_epoch_equals_uninterrupted():
    def steps(s, n):
        out = []
        while len(out) < n:
            for a in s:
                out.append(a.pair_indices.tolist())
                if len(out) == n:
                    break
        return out

    full, _ = sampler([10, 100], [3, 1])
    expected = steps(full, 30)  # almost three epochs of 11 steps
    first, _ = sampler([10, 100], [3, 1])
    head = steps(first, 16)  # stop in the middle of epoch 1
    state = json.loads(json.dumps(first.state_dict()))  # as the checkpoint stores it
    assert state["epoch"] == 1 and state["offset"] == 5
    assert state["mixture"] == {"source_pairs": [10, 100], "quotas": [83, 27]}
    resumed, _ = sampler([10, 100], [3, 1])
    resumed.load_state_dict(state)
    assert head + steps(resumed, 14) == expected

    other, _ = sampler([10, 100], [1, 1])
    with pytest.raises(ValueError, match="mixture"):
        other.load_state_dict(state)
    plain, _ = sampler([10, 100], None)
    with pytest.raises(ValueError, match="mixture"):
        plain.load_state_dict(state)


def test_plain_paths_keep_todays_order():
    # produced by PairSampler before mixtures existed (commit d617290): the demo's baseline depends on it
    s = PairSampler(
        np.full((23, 2), 5), pairs_per_step=4, world_size=2, rank=0, seed=7, max_tokens_per_micro_batch=64
    )
    assert s.permutation(0).tolist() == [
        6,
        21,
        20,
        3,
        12,
        11,
        4,
        10,
        13,
        9,
        14,
        15,
        22,
        18,
        0,
        2,
        17,
        8,
        7,
        5,
        1,
        19,
        16,
    ]
    assert s.permutation(3).tolist()[:8] == [13, 18, 11, 22, 2, 12, 10, 21]
    assert s.assignment(1, 2).pair_indices.tolist() == [8, 15, 16, 4]
    assert "mixture" not in s.state_dict()


def test_a_weighted_source_without_pairs_is_refused_by_entry():
    with pytest.raises(ValueError, match=r"data.train_files\[1\]: no pairs left"):
        PairSampler(
            np.full((4, 2), 5),
            pairs_per_step=2,
            world_size=1,
            rank=0,
            seed=0,
            max_tokens_per_micro_batch=20,
            sources=[0, 0, 2, 2],
            weights=[1, 1, 1],
        )


# ------------------------------------------------------------------------------------ config entries


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{path: a.jsonl, weight: 0}", r"data.train_files\[1\].weight: must be a finite number > 0"),
        ("{path: a.jsonl, weight: -2}", r"data.train_files\[1\].weight: must be a finite number > 0"),
        ("{path: a.jsonl, weight: heavy}", r"data.train_files\[1\].weight: expected a number > 0"),
        ("{path: a.jsonl, wieght: 2}", r"data.train_files\[1\]: unknown key\(s\) wieght"),
        ("{weight: 2}", r"data.train_files\[1\].path: required"),
        ("{path: a.jsonl, rows: '1:2:3'}", r"data.train_files\[1\].rows: invalid row slice"),
        ("{path: a.jsonl, split: 3}", r"data.train_files\[1\].split: expected a non-empty string"),
        ("7", r"data.train_files\[1\]: expected a string or a mapping"),
    ],
)
def test_bad_source_entries_name_the_key_and_index(entry, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*BASE, f"data.train_files=[b.jsonl, {entry}]"])


def test_source_entries_parse_from_yaml(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        "data:\n  train_files:\n    - chat.jsonl\n    - {path: math.jsonl, weight: 3, rows: ':100'}\n"
        "    - {path: safety, split: test}\n"
    )
    cfg = load_config(str(cfg_file), BASE)
    parsed = parse_sources(cfg.data.train_files)
    assert parsed.mixture and parsed.weights == [1.0, 3.0, 1.0]
    assert parsed.specs[1] == SourceSpec("math.jsonl", 3.0, None, ":100")
    assert parsed.specs[2] == SourceSpec("safety", 1.0, "test", None)
    assert not parse_sources(["a", "b"]).mixture and parse_sources(["a", "b"]).weights is None


def test_sft_refuses_weights():
    from hdpo_ds.recipes.sft import check_sft_config

    cfg = load_config(None, [*BASE, "data.train_files=[{path: a.jsonl, rows: ':5'}]"])
    check_sft_config(cfg)  # split / rows apply to SFT
    cfg = load_config(None, [*BASE, "data.train_files=[a.jsonl, {path: b.jsonl, weight: 2}]"])
    with pytest.raises(ConfigError, match=r"data.train_files\[1\].weight: SFT does not sample by weight"):
        check_sft_config(cfg)


# ------------------------------------------------------------------------------ records and counts


def test_plain_paths_keep_todays_fingerprint(tmp_path):
    a, b = write_sources(tmp_path)
    # computed by load_records before mixtures existed (commit d617290), over the same bytes
    assert (
        load_records([a, b]).fingerprint == "f63d9417f6deeb47deed8f038f1884017e0fbfa2b72fb629a2afdbf4b5cfa02c"
    )
    assert (
        load_records([a, b], rows="1:8").fingerprint
        == "9155c2cb1f8ee70c37d3818640fec2f2d331378da8ef10df37bc0385e381d098"
    )
    plain = load_records([a, b], rows="4:8")  # a plain list: the slice is over the concatenation
    assert [(r.source_index, r.index) for r in plain.records] == [(0, 4), (0, 5), (1, 0), (1, 1)]


def test_mixture_rows_apply_per_entry_and_the_fingerprint_covers_each_entry(tmp_path):
    a, b = write_sources(tmp_path)
    mix = load_records([{"path": a, "rows": "1:3"}, b], rows=":2")  # b falls back to data.rows, alone
    assert [(r.source_index, r.index) for r in mix.records] == [(0, 1), (0, 2), (1, 0), (1, 1)]
    assert mix.entries.mixture and mix.entries.weights == [1.0, 1.0]
    assert [dict(c) for c in mix.source_counts] == [{"rows": 2, "kept": 2}, {"rows": 2, "kept": 2}]
    fingerprints = {
        load_records([{"path": a, "rows": "1:3"}, b], rows=":2").fingerprint,
        load_records([{"path": a, "rows": "1:3", "weight": 2}, b], rows=":2").fingerprint,
        load_records([{"path": a, "rows": "1:4"}, b], rows=":2").fingerprint,
        load_records([{"path": a, "rows": "1:3"}, b], rows=":3").fingerprint,
        load_records([{"path": a, "rows": "1:3", "split": "x"}, b], rows=":2").fingerprint,
        load_records([{"path": b, "rows": "1:3"}, a], rows=":2").fingerprint,
    }
    assert len(fingerprints) == 6 and mix.fingerprint in fingerprints


def test_per_source_counts_and_tokenized_source_column(tmp_path):
    a, b = write_sources(tmp_path)
    bad = tmp_path / "c.jsonl"
    bad.write_text(
        json.dumps({"prompt": "Hi?", "chosen": " same", "rejected": " same"})
        + "\n"
        + json.dumps({"prompt": "Hi?", "chosen": " yes"})
        + "\n"
        + json.dumps({"prompt": "Hi?", "chosen": " yes", "rejected": " no"})
        + "\n"
    )
    loaded = load_records([a, {"path": str(bad), "weight": 2}, b], on_bad_record="skip")
    assert [dict(c) for c in loaded.source_counts] == [
        {"rows": 6, "kept": 6},
        {"rows": 3, "kept": 1, "identical_chosen_rejected": 1, "missing_field": 1},
        {"rows": 4, "kept": 4},
    ]
    result = tokenize_pairs(loaded, make_tokenizer(), max_length=64, max_prompt_length=32)
    assert result.pairs.sources.tolist() == [0] * 6 + [1] + [2] * 4
    assert [c["pairs"] for c in result.source_stats] == [6, 1, 4]
    params = source_params(Split("train", loaded, result, ""), quotas([1, 2, 1], 11))
    assert {k: v for k, v in params.items() if k.startswith("data.source.1.")} == {
        "data.source.1.path": str(bad),
        "data.source.1.weight": 2.0,
        "data.source.1.rows": 3,
        "data.source.1.kept": 1,
        "data.source.1.skipped.identical_chosen_rejected": 1,
        "data.source.1.skipped.missing_field": 1,
        # 11 * (1, 2, 1) / 4 = 2.75, 5.5, 2.75: floors 2, 5, 2; the two left go to the .75 remainders
        "data.source.1.draws_per_epoch": 5,
    }
    assert params["data.source.0.draws_per_epoch"] == 3 and params["data.source.2.draws_per_epoch"] == 3

    with pytest.raises(DataError, match=r"c.jsonl: record 1: field 'rejected'"):
        load_records([a, {"path": str(bad), "weight": 2}])


# ------------------------------------------------------------------------------------ eval metrics


def test_source_metrics_hand_worked():
    losses = torch.tensor([0.5, 1.0, 0.25, 2.0])
    chosen = torch.tensor([1.0, 0.0, 2.0, -1.0])
    rejected = torch.tensor([0.0, 0.5, 1.0, 1.0])
    sums = source_sums(losses, chosen, rejected, torch.tensor([0, 0, 2, 2]), 3)
    # a second micro-batch, as evaluate() accumulates them
    more = source_sums(torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([2]), 3)
    total = {k: float(sums[k] + more[k]) for k in sums}
    metrics = source_metrics(total, 3, prefix="eval/")
    assert metrics == {
        "eval/source0/pairs": 2.0,
        "eval/source0/loss": 0.75,
        "eval/source0/rewards/accuracies": 0.5,
        "eval/source0/rewards/margins": (1.0 - 0.5) / 2,
        "eval/source1/pairs": 0.0,
        "eval/source2/pairs": 3.0,
        "eval/source2/loss": (0.25 + 2.0 + 1.0) / 3,
        "eval/source2/rewards/accuracies": 2 / 3,
        "eval/source2/rewards/margins": (1.0 - 2.0 + 2.0) / 3,
    }


# ------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_two_rank_run_with_a_mixture_logs_sources_and_per_source_eval(assets):
    from tests.run_helpers import launch, records

    root = assets["root"]
    files = {}
    for name, count, seed in (("mix_a", 24, 3), ("mix_b", 12, 4), ("mix_eval_a", 4, 5), ("mix_eval_b", 3, 6)):
        rows = [{**r, "id": f"{name}-{r['id']}"} for r in records(count, seed=seed)]
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = launch(
        assets,
        "mix2",
        "torchrun",
        3,
        extra=[
            f"data.train_files=[{{path: {files['mix_a']}, weight: 3}}, {files['mix_b']}]",
            f"data.eval_files=[{files['mix_eval_a']}, {files['mix_eval_b']}]",
            "train.dump_gradients_at=[]",
        ],
    )
    params = run["params"]
    # 36 pairs, weights 3:1 -> 27 and 9 draws per epoch
    assert params["data.source.0.kept"] == "24" and params["data.source.1.kept"] == "12"
    assert params["data.source.0.draws_per_epoch"] == "27" and params["data.source.1.draws_per_epoch"] == "9"
    assert params["data.source.0.weight"] == "3.0"
    metrics = run["metrics"]
    final = max(metrics["eval/rewards/accuracies"])
    pairs = [metrics[f"eval/source{i}/pairs"][final] for i in range(2)]
    assert pairs == [4.0, 3.0]
    for name in ("rewards/accuracies", "rewards/margins", "loss"):
        mixed = sum(metrics[f"eval/source{i}/{name}"][final] * pairs[i] for i in range(2)) / 7
        assert mixed == pytest.approx(metrics[f"eval/{name}"][final], rel=1e-6, abs=1e-9)
    assert "data.train_files[0]" in run["stderr"] + run["stdout"]


def test_sampled_validation_takes_evenly_spaced_rows_per_entry(tmp_path):
    """The dry run's sample (load_records(sample=...)): 5 of 10 rows, a share per entry by its size
    (6 rows -> round(3.0) = 3, 4 rows -> 2), evenly spaced with first and last: a rows 0, 2, 5 (round(2.5)
    is 2) and b rows 0, 3."""
    a, b = write_sources(tmp_path)
    sampled = load_records([a, b], sample=5)
    assert [(r.source_index, r.index) for r in sampled.records] == [(0, 0), (0, 2), (0, 5), (1, 0), (1, 3)]
    assert sampled.num_rows == 10 and sampled.sampled_rows == 5
    assert sampled.fingerprint == load_records([a, b]).fingerprint  # the whole data's identity
    assert load_records([a, b], sample=10).sampled_rows is None  # everything: a full check


@pytest.mark.slow
def test_killed_and_resumed_mixture_run_sees_the_same_pairs(assets):
    """16 pairs (10 + 6, weights 3:1: 12 and 4 draws) at 4 pairs per step: 4 steps per epoch; killed at
    step 3, resumed from the step-2 checkpoint, the run crosses into epoch 1 with the uninterrupted losses."""
    from tests.run_helpers import launch, records

    root = assets["root"]
    files = []
    for name, count, seed in (("rs_a", 10, 7), ("rs_b", 6, 8)):
        path = root / f"{name}.jsonl"
        path.write_text(
            "".join(json.dumps({**r, "id": f"{name}-{r['id']}"}) + "\n" for r in records(count, seed))
        )
        files.append(path)
    extra = [
        f"data.train_files=[{{path: {files[0]}, weight: 3}}, {{path: {files[1]}, weight: 1}}]",
        "train.save_every=2",
        "train.dump_gradients_at=[]",
        "train.export_hf=false",
    ]
    full = launch(assets, "rs_full", "deepspeed", 6, extra=extra)
    killed = launch(
        assets,
        "rs_kill",
        "deepspeed",
        6,
        extra=extra,
        env_extra={"HDPO_FAULT_KILL_AT_STEP": "3"},
        expect_success=False,
    )
    assert killed["returncode"] != 0
    resumed = launch(assets, "rs_kill", "deepspeed", 6, extra=extra)
    assert "at step 2" in resumed["stderr"]
    for step in range(6):
        assert resumed["metrics"]["loss"][step] == pytest.approx(
            full["metrics"]["loss"][step], rel=1e-5, abs=1e-7
        )
    assert resumed["params"]["data.source.0.draws_per_epoch"] == "12"
