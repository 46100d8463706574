"""A moving reference (reference.sync, TR-DPO): config refusals, the update itself on 2 ranks for several
partitionings (tests/probes/ref_sync.py), and a 2-rank run with hard syncs that is SIGKILLed and resumed.

The run (tests/run_helpers.py assets, ZeRO-3 with persistence threshold 0): 4 steps, reference.sync=hard
every 2 applied updates, a checkpoint every 2 steps. The syncs follow steps 1 and 3, so the step-2 forward
sees a reference equal to the policy (log-ratios 0) and the step-2 checkpoint holds the synced reference;
the killed run dies as step 2 starts (just after that checkpoint), so both later steps are
recomputed by the resumed run.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from hdpo_ds.config import ConfigError, load_config
from hdpo_ds.runtime import checkpoint, engine
from tests.run_helpers import ROOT, VENV_BIN, free_port, launch, survivors_of_kill

BASE = ["model.name_or_path=m", "data.train_files=[t.jsonl]"]
SYNC_STEPS = 4
SYNC_ARGS = [
    "reference.sync=hard",
    "reference.sync_every=2",
    "train.save_every=2",
    "train.dump_gradients_at=[]",
    "train.export_hf=false",
]


@pytest.mark.parametrize(
    ("overrides", "key", "why"),
    [
        (["reference.sync_alpha=0.5"], "reference.sync_alpha", "no effect with reference.sync=none"),
        (["reference.sync_every=8"], "reference.sync_every", "no effect with reference.sync=none"),
        (["reference.sync=hard", "reference.sync_alpha=0.5"], "reference.sync_alpha", "sync=hard"),
        (["reference.sync=soft", "reference.mode=auto"], "reference.sync", "reference.mode=auto"),
        (
            ["reference.sync=hard", "reference.mode=cached", "reference.cache_path=c"],
            "reference.sync",
            "cached values of the initial reference",
        ),
        (["reference.sync=soft", "loss.type=simpo"], "reference.sync", "reference-free"),
        (["reference.sync=soft", "reference.sync_alpha=0"], "reference.sync_alpha", "(0, 1]"),
        (["reference.sync=soft", "reference.sync_alpha=1.5"], "reference.sync_alpha", "(0, 1]"),
        (["reference.sync=hard", "reference.sync_every=0"], "reference.sync_every", ">= 1"),
    ],
)
def test_sync_config_refusals_name_the_key(overrides, key, why):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*BASE, *overrides])
    assert str(err.value).startswith(f"{key}:") and why in str(err.value), str(err.value)


def test_sync_config_accepted_and_changes_the_math():
    soft = load_config(
        None, [*BASE, "reference.sync=soft", "reference.sync_alpha=0.3", "reference.sync_every=4"]
    )
    assert (soft.reference.sync, soft.reference.sync_alpha, soft.reference.sync_every) == ("soft", 0.3, 4)
    hard = load_config(None, [*BASE, "reference.sync=hard"])
    assert (hard.reference.sync_alpha, hard.reference.sync_every) == (0.6, 512)  # TRL's defaults
    saved = {"reference.sync": "none", "reference.sync_alpha": 0.6, "reference.sync_every": 512}
    now = {"reference.sync": "soft", "reference.sync_alpha": 0.3, "reference.sync_every": 4}
    lines = checkpoint.math_differences(saved, now)
    assert [line.split(":")[0] for line in lines] == sorted(now), lines


def test_paired_parameters_refuse_other_names_and_shapes():
    """Plain modules (no ZeRO-3): the pairing is by name, grouped per owning module; a renamed or
    reshaped parameter is refused naming it."""
    policy = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    same = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    groups = engine.paired_parameters(policy, same)
    assert [[name for name, _, _ in g] for g in groups] == [["0.weight", "0.bias"], ["1.weight", "1.bias"]]
    assert all(p is dict(policy.named_parameters())[n] for g in groups for n, p, _ in g)
    with pytest.raises(ConfigError, match=r"^reference\.sync: parameter 1\.weight has shape \(2, 4\)"):
        engine.paired_parameters(policy, torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 3)))
    with pytest.raises(ConfigError, match=r"only in the policy: \['1.bias', '1.weight'\]"):
        engine.paired_parameters(policy, torch.nn.Sequential(torch.nn.Linear(3, 4)))


def test_syncs_count_applied_updates_not_skipped_steps(monkeypatch):
    """sync_every=2, step 2 skipped (non-finite): the applied updates are steps 0, 1, 3, 4, 5, so the
    reference moves after steps 1 (2 applied) and 4 (4 applied), soft at sync_alpha; the logged counts
    are applied // sync_every."""
    from types import SimpleNamespace

    from hdpo_ds.recipes.preference import PreferenceRecipe

    calls = []
    monkeypatch.setattr(engine, "sync_reference", lambda pol, ref, alpha: calls.append((session.step, alpha)))
    recipe = PreferenceRecipe.__new__(PreferenceRecipe)
    recipe.cfg = load_config(
        None, [*BASE, "reference.sync=soft", "reference.sync_alpha=0.25", "reference.sync_every=2"]
    )
    session = SimpleNamespace(step=0, nonfinite={"skipped_total": 0}, policy="policy")
    recipe.session, recipe.moving_reference = session, "reference"
    counts = []
    for step in range(6):
        session.step = step
        skipped = step == 2
        session.nonfinite["skipped_total"] += skipped  # count_update ran before the sync
        counts.append(recipe._sync_reference(skipped))
    assert calls == [(1, 0.25), (4, 0.25)]
    assert counts == [0, 1, 1, 1, 2, 2]


@pytest.mark.distributed
def test_sync_reference_on_two_ranks_for_every_partitioning(assets, tmp_path):
    """Soft (alpha 0.6) and hard syncs between different models, gathered and compared: ZeRO-3 on both
    sides (threshold 0), a reference that persists every parameter, and stage 0 on either side."""
    root = assets["root"]
    cmd = [
        os.path.join(VENV_BIN, "torchrun"),
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "tests/probes/ref_sync.py",
        assets["model"],
        assets["ref_model"],
        str(root / "zero3.json"),
        str(root / "zero3_infer.json"),
        str(tmp_path),
    ]
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"z3_z3", "z3_z3persisted", "z0_z3", "z3_z0"}
    # the partitionings really differ: none persisted at threshold 0, all 21 of the tiny Llama when high
    assert results["z3_z3"]["persisted"] == [0, 0]
    assert results["z3_z3persisted"]["persisted"] == [0, 21]
    for case, row in results.items():
        assert row["soft"] <= 1e-6, (case, row)  # alpha * policy + (1 - alpha) * old reference, float32
        assert row["hard"] == 0.0, (case, row)  # a copy of the policy, exactly
        assert row["policy_unchanged"] == 0.0, (case, row)
        assert row["moved"] > 1e-4, (case, row)  # the optimizer step moved the policy before the hard sync
        assert row["reloaded"] == 0.0, (case, row)


@pytest.fixture(scope="module")
def sync_full(assets):
    return launch(assets, "sync_full", "deepspeed", SYNC_STEPS, extra=SYNC_ARGS)


@pytest.mark.distributed
def test_hard_sync_makes_the_reference_the_policy(sync_full):
    metrics = sync_full["metrics"]
    assert [metrics["reference/syncs"][s] for s in range(SYNC_STEPS)] == [0, 1, 1, 2]
    for side in ("chosen", "rejected"):
        ratios = [metrics[f"logratio/{side}"][s] for s in range(SYNC_STEPS)]
        assert ratios[0] == 0.0 and abs(ratios[2]) <= 1e-6, ratios  # reference == policy at steps 0 and 2
        assert abs(ratios[1]) > 1e-4 and abs(ratios[3]) > 1e-4, ratios  # one update apart
    assert sync_full["params"]["config.reference.sync"] == "hard"
    folder = sync_full["dir"] / "checkpoints" / "step00000002"
    files = json.loads((folder / "COMPLETE.json").read_text())["files"]
    assert {"reference/rank0.pt", "reference/rank1.pt"} <= set(files)  # committed with the policy


@pytest.mark.distributed
def test_sync_run_sigkilled_and_resumed_equals_uninterrupted(assets, sync_full):
    killed = launch(
        assets,
        "sync_kill",
        "deepspeed",
        SYNC_STEPS,
        extra=SYNC_ARGS,
        env_extra={"HDPO_FAULT_KILL_AT_STEP": "2"},
        expect_success=False,
    )
    assert killed["returncode"] == -9, killed["stderr"][-3000:]
    assert survivors_of_kill(killed["pgid"]) == []
    assert (assets["root"] / "sync_kill" / "checkpoints" / "latest").read_text() == "step00000002"
    resumed = launch(assets, "sync_kill", "deepspeed", SYNC_STEPS, extra=SYNC_ARGS)
    assert "resumed from" in resumed["stderr"] and "at step 2" in resumed["stderr"]
    for key in ("loss", "logratio/chosen", "rewards/margins", "reference/syncs"):
        for step in range(SYNC_STEPS):
            assert resumed["metrics"][key][step] == pytest.approx(
                sync_full["metrics"][key][step], rel=1e-6, abs=1e-9
            ), (key, step)
    assert resumed["metrics"]["_counts"]["loss"] == SYNC_STEPS
