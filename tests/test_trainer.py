"""The trainer end to end: 2 ranks of ZeRO-3 on CPU against one process and against plain math.

Runs shared by the tests of this module (each launch costs 15-40 s here; assets: tests/run_helpers.py):
- `ds2`: the deepspeed launcher, 2 ranks, 5 steps, full gradient dumped at step 0;
- `py1`: plain `python launch/train.py`, one process, the same 5 steps;
- `tr2`: torchrun, 2 ranks, 2 steps, padded micro-batches (`data.packing=false`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hdpo_ds.data import PairSampler
from hdpo_ds.tracking.metrics import PAIR_METRICS, STEP_METRICS
from tests.run_helpers import (
    BUDGET,
    PAIRS_PER_STEP,
    RENDEZVOUS_VARIABLES,
    ROOT,
    STEPS,
    overrides,
    restored_environ,
)
from tests.run_helpers import assert_grads_close as _assert_grads_close
from tests.run_helpers import launch as _launch


@pytest.fixture(scope="module")
def ds2(assets):
    return _launch(assets, "ds2", "deepspeed", STEPS)


@pytest.fixture(scope="module")
def py1(assets):
    return _launch(assets, "py1", "python", STEPS)


@pytest.fixture(scope="module")
def tr2(assets):
    return _launch(assets, "tr2", "torchrun", 2, extra=["data.packing=false"])


def _single_process_step0(assets):
    """The step-0 global batch computed with plain transformers, one sequence at a time, no packing."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        assets["model"], dtype=torch.float32, attn_implementation="sdpa"
    )
    pairs = assets["pairs"]
    sampler = PairSampler(
        pairs.lengths,
        pairs_per_step=PAIRS_PER_STEP,
        world_size=1,
        rank=0,
        seed=assets["seed"],
        max_tokens_per_micro_batch=BUDGET,
    )
    indices = sampler.assignment(0, 0).pair_indices

    def sequence_logp(prompt, response):
        ids = torch.tensor([list(prompt) + list(response)])
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].double(), -1)
        targets = ids[0, 1:]
        start = len(prompt) - 1
        return logp[start:].gather(-1, targets[start:, None]).sum()

    lp_w, lp_l = [], []
    for i in indices:
        pair = pairs[int(i)]
        lp_w.append(sequence_logp(pair.prompt_ids, pair.chosen_ids))
        lp_l.append(sequence_logp(pair.prompt_ids, pair.rejected_ids))
    # H-DPO as Omura et al. write it (hdpo_ds/objectives/losses.py), pair by pair:
    # z = alpha*beta*(lp_w - lp_l) - beta*(ref_w - ref_l), loss = -log sigmoid(z) = log(1 + e^-z); at step 0
    # the reference is the policy's initial copy (the same values, no gradient). beta 0.5, alpha 0.9:
    # run_helpers.overrides.
    beta, alpha = 0.5, 0.9
    losses = []
    for chosen, rejected in zip(lp_w, lp_l, strict=True):
        z = alpha * beta * (chosen - rejected) - beta * (chosen.detach() - rejected.detach())
        losses.append(torch.log1p(torch.exp(-z)))
    loss = sum(losses) / len(losses)
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters()}


@pytest.mark.distributed
def test_two_rank_step0_matches_single_process_math(assets, ds2):
    assert ds2["params"]["run.world_size"] == "2"
    expected_loss, expected_grads = _single_process_step0(assets)
    assert ds2["metrics"]["loss"][0] == pytest.approx(expected_loss, rel=1e-5)
    grads = torch.load(ds2["dir"] / "diagnostics" / "grads_step0.pt")
    _assert_grads_close(grads, expected_grads)


def test_one_step_of_the_recipe_object_matches_single_process_math(assets):
    """PreferenceRecipe driven method by method in one process (no launcher): setup, the first
    assignment, train_step, after_step. Its loss and its step-0 gradient equal the plain-transformers
    math; train_step leaves the step counter alone and after_step advances it."""
    out_dir = assets["root"] / "recipe_step"
    cmd = [sys.executable, "tests/probes/recipe_step.py", str(assets["root"] / "zero3.json")]
    cmd += overrides(assets, "recipe_step", 1)
    with restored_environ():
        env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    expected_loss, expected_grads = _single_process_step0(assets)
    sampler = PairSampler(
        assets["pairs"].lengths,
        pairs_per_step=PAIRS_PER_STEP,
        world_size=1,
        rank=0,
        seed=assets["seed"],
        max_tokens_per_micro_batch=BUDGET,
    )
    assert got["pairs"] == [int(i) for i in sampler.assignment(0, 0).pair_indices]
    assert got["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert not got["skipped"] and (got["step_before"], got["step_after"]) == (0, 1)
    _assert_grads_close(torch.load(out_dir / "diagnostics" / "grads_step0.pt"), expected_grads)


@pytest.mark.distributed
def test_two_ranks_follow_the_one_process_trajectory(ds2, py1):
    assert py1["params"]["run.world_size"] == "1"
    assert ds2["params"]["run.torch_threads"] == py1["params"]["run.torch_threads"] == "1"
    for step in range(STEPS):
        assert ds2["metrics"]["loss"][step] == pytest.approx(py1["metrics"]["loss"][step], rel=1e-4, abs=1e-6)
    # training moved: a trajectory that stays at its start would compare equal trivially
    assert abs(py1["metrics"]["loss"][STEPS - 1] - py1["metrics"]["loss"][0]) > 1e-3
    grads_1 = torch.load(py1["dir"] / "diagnostics" / "grads_step0.pt")
    grads_2 = torch.load(ds2["dir"] / "diagnostics" / "grads_step0.pt")
    _assert_grads_close(grads_2, grads_1)


@pytest.mark.distributed
def test_torchrun_launch_with_padded_micro_batches(tr2, py1):
    """torchrun's 2 ranks, one padded sequence per row, follow one packed process."""
    assert tr2["params"]["run.world_size"] == "2" and tr2["params"]["run.attn_implementation"] == "sdpa"
    for step in range(2):
        assert tr2["metrics"]["loss"][step] == pytest.approx(py1["metrics"]["loss"][step], rel=1e-4, abs=1e-6)


def _step_pairs(assets, step: int, world_size: int, packing: bool):
    """The step's pairs (tokenized, in step order) and its packed, from the sampler the run used."""
    sampler = PairSampler(
        assets["pairs"].lengths,
        pairs_per_step=PAIRS_PER_STEP,
        world_size=world_size,
        rank=0,
        seed=assets["seed"],
        max_tokens_per_micro_batch=BUDGET,
        packing=packing,
    )
    assignment = sampler.assignment(0, step)  # 40 pairs, 4 per step: steps 0-4 are epoch 0's first five
    return [assets["pairs"][int(i)] for i in assignment.pair_indices], assignment.packed


@pytest.mark.parametrize(
    ("run", "world_size", "packing", "steps"),
    [
        ("py1", 1, True, STEPS),
        pytest.param("ds2", 2, True, STEPS, marks=pytest.mark.distributed),
        pytest.param("tr2", 2, False, 2, marks=pytest.mark.distributed),
    ],
)
def test_step_metrics_are_what_the_batch_implies(assets, request, run, world_size, packing, steps):
    """Per step, from the tokenized pairs themselves: `tokens` = their non-padding tokens (the prompt in both
    sequences); `packing_fill` = tokens / (micro-batches of all ranks x budget); `padding_fraction` = pad /
    tensor tokens, where a padded micro-batch is 2 x pairs rows of its longest sequence (fillers count) and
    a packed one has none; `tokens_per_second` = tokens / `step_time_s`, and the steps took less time than
    the whole launch; the per-token means divide the per-pair sums by the step's response tokens.
    `perf/mfu` = the step's model FLOPs by hand / (step time x peak x ranks): the tiny Llama (hidden 32,
    2 layers, 4 heads of 8, 2 key/value heads, MLP 64, vocabulary 512, untied) has N = 2 x (32·32 + 2·32·16
    + 32·32 + 3·32·64 + 2·32) + 32 + 512·32 = 34,976 parameters besides the input embedding; the policy
    trains (6·N per token) and the online reference runs forward (2·N); causal attention costs
    2·2 layers·32·n² per sequence forward, 3 times that for the policy and once for the reference."""
    result = request.getfixturevalue(run)
    metrics = result["metrics"]
    flop_params = 34_976
    assert int(result["params"]["run.flop_params"]) == flop_params
    peak = float(result["params"]["run.peak_tflops"]) * 1e12
    assert result["params"]["run.peak_tflops_source"] == "measured: cpu float32 matmul"
    for step in range(steps):
        pairs, packed = _step_pairs(assets, step, world_size, packing)
        tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        assert metrics["tokens"][step] == tokens, step
        squares = sum(
            (len(p.prompt_ids) + len(p.chosen_ids)) ** 2 + (len(p.prompt_ids) + len(p.rejected_ids)) ** 2
            for p in pairs
        )
        flops = (6 + 2) * flop_params * tokens + (3 + 1) * 2 * 2 * 32 * squares
        step_time = metrics["step_time_s"][step]
        assert metrics["perf/mfu"][step] == pytest.approx(flops / (step_time * peak * world_size), rel=1e-9)
        assert metrics["perf/tokens_per_second_per_device"][step] == pytest.approx(
            tokens / (step_time * world_size), rel=1e-12
        )
        phases = sum(
            metrics[f"perf/time/{name}_s"][step]
            for name in ("data", "forward", "backward", "optimizer", "reference", "other")
        )
        assert phases == pytest.approx(step_time, rel=1e-9)
        assert min(metrics[f"perf/time/{name}_s"][step] for name in ("forward", "backward", "reference")) > 0
        micro_batches = [mb for rank in packed.ranks for mb in rank]
        assert len(micro_batches) == world_size * packed.micro_batches_per_rank
        assert metrics["packing_fill"][step] == pytest.approx(
            tokens / (len(micro_batches) * BUDGET), rel=1e-12
        )
        filled, tensor = 0, 0  # over every micro-batch, fillers included (their rows are padded too)
        for mb in micro_batches:
            members = [pairs[i] for i in mb.pairs]
            mb_tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in members)
            longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in members)
            filled += mb_tokens
            tensor += 2 * len(members) * longest if not packing else mb_tokens
        assert (tensor > filled) == (not packing)  # the padded rows of this step do pad
        assert metrics["padding_fraction"][step] == pytest.approx(
            (tensor - filled) / tensor, rel=1e-12, abs=0
        )
        assert metrics["tokens_per_second"][step] == pytest.approx(
            tokens / metrics["step_time_s"][step], rel=1e-12
        )
        for side in ("chosen", "rejected"):
            response_tokens = sum(len(getattr(p, f"{side}_ids")) for p in pairs)
            assert metrics[f"logps/{side}_mean"][step] == pytest.approx(
                metrics[f"logps/{side}"][step] * len(pairs) / response_tokens, rel=1e-12
            )
    assert 0 < sum(metrics["step_time_s"][s] for s in range(steps)) < result["wall_s"]


def test_mlflow_holds_every_metric_for_every_step(py1):
    """The keys logged per step are STEP_METRICS exactly (a key missing from the list fails), every step;
    evaluations log PAIR_METRICS under eval/."""
    metrics = py1["metrics"]
    per_step = {k for k in metrics if k != "_counts" and not k.startswith(("eval/", "memory/"))}
    assert per_step == set(STEP_METRICS), per_step ^ set(STEP_METRICS)
    for key in STEP_METRICS:
        assert sorted(metrics[key]) == list(range(STEPS)), key
    eval_keys = {k for k in metrics if k.startswith("eval/")}
    assert eval_keys == {f"eval/{k}" for k in PAIR_METRICS}
    for key in eval_keys:
        assert sorted(metrics[key]) == [2, 4, STEPS], key
    params = py1["params"]
    assert params["config.loss.alpha"] == "0.9" and params["run.attn_implementation"] == "sdpa_packed"
    assert params["run.reference_source"] == "engine" and params["run.reference_mode"] == "online"
    assert params["ds_config.train_batch_size"] == "1" and "versions.deepspeed" in params
    # step 0: policy == reference, so the log-ratios are exactly 0
    assert metrics["logratio/chosen"][0] == 0.0 and metrics["logratio/rejected"][0] == 0.0
    assert all(0 <= metrics["rewards/accuracies"][s] <= 1 for s in range(STEPS))


def _train_main():
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import train as launch_train

    return launch_train.main


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.type=kto", "loss.type: unknown loss_type 'kto'"),
        ("loss.beta=-1", "loss.beta: must be > 0"),
        ("model.name_or_path=/nonexistent/model", "model.name_or_path: no such model directory"),
        ("data.train_files=[/nonexistent/train.jsonl]", "/nonexistent/train.jsonl"),
    ],
)
def test_bad_input_fails_before_any_engine(assets, monkeypatch, capsys, isolated_environ, override, message):
    from hdpo_ds.runtime import engine

    def forbidden(*args, **kwargs):
        raise AssertionError("an engine was built before the bad input was reported")

    monkeypatch.setattr(engine, "build_policy_engine", forbidden)
    monkeypatch.setattr(engine, "init_distributed", forbidden)
    for key in RENDEZVOUS_VARIABLES:  # a world of one, as `python launch/train.py` is (restored after)
        isolated_environ.pop(key, None)
    args = ["--ds", "ds_configs/zero3.json", *overrides(assets, "bad", 1), override]
    assert _train_main()(args) == 2
    assert message in capsys.readouterr().err


def test_an_in_process_run_leaves_the_environment_as_it_was(assets, capsys):
    """The entry point fills RANK, WORLD_SIZE, MASTER_PORT ... for a world of one; restored_environ (what
    the isolated_environ fixture uses) takes them, and anything else the run set, away again."""
    before = dict(os.environ)
    with restored_environ():
        for key in RENDEZVOUS_VARIABLES:
            os.environ.pop(key, None)
        args = ["--ds", "ds_configs/zero3.json", *overrides(assets, "bad", 1), "loss.beta=-1"]
        assert _train_main()(args) == 2
        assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1" and "MASTER_PORT" in os.environ
    assert dict(os.environ) == before
    assert "loss.beta: must be > 0" in capsys.readouterr().err


def _without_version(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "transformers_version"}


def test_demo_assets_are_reproducible(tmp_path):
    """`python -m hdpo_ds.examples.demo_assets` regenerates the committed demo data byte for byte, the same
    model config (up to the library's version string) and a tokenizer that is the same (files and
    encodings)."""
    out = tmp_path / "model"
    data = tmp_path / "data"
    subprocess.run(
        [sys.executable, "-m", "hdpo_ds.examples.demo_assets", "--out", str(out), "--data", str(data)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    committed_model = os.path.join(ROOT, "configs/models/tiny-demo")
    for name in ("train.jsonl", "eval.jsonl"):
        with open(data / name, "rb") as a, open(os.path.join(ROOT, "configs/data/demo", name), "rb") as b:
            assert a.read() == b.read(), name
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        with open(out / name) as a, open(os.path.join(committed_model, name)) as b:
            assert _without_version(json.load(a)) == _without_version(json.load(b)), name
    with (
        open(out / "chat_template.jinja") as a,
        open(os.path.join(committed_model, "chat_template.jinja")) as b,
    ):
        assert a.read() == b.read()
    from transformers import AutoTokenizer

    fresh, committed = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(committed_model)
    with open(data / "eval.jsonl") as f:
        texts = [json.loads(line)["chosen"] for line in f][:64]
    texts = [t if isinstance(t, str) else t[0]["content"] for t in texts] + ["unseen words: zebra 12345"]
    assert [fresh(t)["input_ids"] for t in texts] == [committed(t)["input_ids"] for t in texts]
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    assert fresh.apply_chat_template(messages, add_generation_prompt=True) == committed.apply_chat_template(
        messages, add_generation_prompt=True
    )
    shutil.rmtree(tmp_path)


# ---------------------------------------------------------------- the offline reference cache (issue #7)


def _cache_values(cache_dir) -> dict:
    from hdpo_ds.reference.cache import RefCache, read_manifest

    manifest = read_manifest(str(cache_dir))
    cache = RefCache.load(str(cache_dir), manifest["fingerprint"])
    order = cache.ids.to_pylist()  # in row order
    return {
        "ids": order,
        "chosen": cache.chosen,
        "rejected": cache.rejected,
        "tokens": (cache.chosen_tokens, cache.rejected_tokens),
        "manifest": manifest,
    }


@pytest.fixture(scope="module")
def py1_cached(assets):
    """reference.mode=auto with no cache yet: computes it first (1 process), then trains from it."""
    return _launch(
        assets, "py1_cached", "python", STEPS, extra=["reference.mode=auto", "reference.shard_pairs=8"]
    )


def test_cached_training_follows_the_online_trajectory(py1, py1_cached):
    assert py1_cached["params"]["run.reference_mode"] == "auto"
    assert py1_cached["params"]["run.reference_source"] == "cache"
    assert py1_cached["params"]["run.reference_cache.train"] == "computed"
    assert py1_cached["params"]["run.reference_cache.eval"] == "computed"
    for step in range(STEPS):
        assert py1_cached["metrics"]["loss"][step] == pytest.approx(py1["metrics"]["loss"][step], rel=1e-5)
    for step in (2, 4, STEPS):
        assert py1_cached["metrics"]["eval/loss"][step] == pytest.approx(
            py1["metrics"]["eval/loss"][step], rel=1e-5
        )


def _precompute(assets, name: str, launcher: str, extra: list[str], env_extra: dict | None = None):
    run = _launch(
        assets,
        name,
        launcher,
        1,
        extra=extra,
        env_extra=env_extra,
        expect_success=False,
        script="launch/precompute_ref.py",
    )
    return SimpleNamespace(returncode=run["returncode"], stderr=run["stderr"])


@pytest.mark.distributed
def test_two_rank_precompute_with_other_packing_equals_one_process(assets, py1_cached):
    """World size 2 and a 5x larger packing budget against world size 1: same values (rtol 1e-5)."""
    cache = assets["root"] / "pc2" / "cache"
    proc = _precompute(
        assets,
        "pc2",
        "deepspeed",
        [f"reference.cache_path={cache}", "reference.shard_pairs=16", "data.max_tokens_per_micro_batch=1024"],
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    for split in ("train", "eval"):
        two = _cache_values(cache / split)
        one = _cache_values(py1_cached["dir"] / "reference_cache" / split)
        assert two["ids"] == one["ids"]
        np.testing.assert_allclose(two["chosen"], one["chosen"], rtol=1e-5)
        np.testing.assert_allclose(two["rejected"], one["rejected"], rtol=1e-5)
        assert (two["tokens"][0] == one["tokens"][0]).all() and (two["tokens"][1] == one["tokens"][1]).all()
        assert len(two["manifest"]["shards"]) != len(one["manifest"]["shards"]) or split == "eval"


def test_killed_precompute_resumes_to_the_same_cache(assets, py1_cached):
    cache = assets["root"] / "pck" / "cache"
    args = [f"reference.cache_path={cache}", "reference.shard_pairs=8"]
    killed = _precompute(assets, "pck", "python", args, {"HDPO_FAULT_EXIT_AFTER_SHARDS": "2"})
    assert killed.returncode == 17, killed.stderr[-3000:]
    assert not (cache / "train" / "manifest.json").exists()  # unfinished: never readable as a cache
    assert sorted(p.name for p in (cache / "train").glob("shard-*.arrow")) == [
        "shard-00000.arrow",
        "shard-00001.arrow",
    ]
    (cache / "train" / "shard-00002.arrow.tmp-999").write_bytes(b"half a shard")  # a torn write is ignored
    resumed = _precompute(assets, "pck", "python", args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming, 2 of 5 shards already complete" in resumed.stderr
    for split in ("train", "eval"):
        got = _cache_values(cache / split)
        expected = _cache_values(py1_cached["dir"] / "reference_cache" / split)
        assert got["ids"] == expected["ids"]
        assert (got["chosen"] == expected["chosen"]).all() and (got["rejected"] == expected["rejected"]).all()
        assert got["manifest"]["shards"] == expected["manifest"]["shards"]  # byte-identical shards (sha256)


@pytest.mark.distributed
def test_tokenization_error_on_rank0_stops_every_rank(assets):
    """Only rank 0 prepares the data; its DataError must reach rank 1 instead of leaving it at a barrier."""
    bad = assets["root"] / "merge.jsonl"
    bad.write_text(
        json.dumps({"prompt": "What is 2 + 2? ", "chosen": "4 is it.", "rejected": "5 is it."}) + "\n" * 1
    )
    run = _launch(
        assets,
        "merge",
        "deepspeed",
        1,
        extra=[f"data.train_files=[{bad}]", "data.eval_files=[]", "train.pairs_per_step=2"],
        expect_success=False,
    )
    assert run["returncode"] != 0
    assert (
        "error (rank 0):" in run["stderr"] and "merges across the prompt/response boundary" in run["stderr"]
    )
    assert "error (rank 1): preparing the train split failed on rank 0: DataError:" in run["stderr"]
