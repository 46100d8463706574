"""Checkpoints on 2 CPU ranks: killed and resumed runs equal the uninterrupted one; exports; guards.

Runs (tests/run_helpers.py): `ck_full` trains 6 steps without interruption, saving every 2 steps and
keeping 2; `ck_kill` is the same run SIGKILLed (launcher and ranks, one process group) as step 3
starts, then started again; `ck_save` is killed while the step-4 checkpoint is being written, then
started again. The skipped non-finite step on 2 ranks is tested in test_trainer_guards.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.run_helpers import ROOT, launch, survivors_of_kill

CK_STEPS = 6
CK_ARGS = ["train.save_every=2", "train.keep_checkpoints=2", "train.dump_gradients_at=[]"]


@pytest.fixture(scope="module")
def ck_full(assets):
    return launch(assets, "ck_full", "deepspeed", CK_STEPS, extra=CK_ARGS)


def _weights(run_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "hf" / "model.safetensors"))


def _assert_same_training(resumed: dict, full: dict) -> None:
    """Every step logged exactly once, losses (1e-5) and final weights (rtol 1e-5) as uninterrupted."""
    for step in range(CK_STEPS):
        assert resumed["metrics"]["loss"][step] == pytest.approx(
            full["metrics"]["loss"][step], rel=1e-5, abs=1e-7
        )
    assert resumed["metrics"]["_counts"]["loss"] == CK_STEPS  # a redone step's point is not sent twice
    assert resumed["metrics"]["_counts"]["eval/loss"] == len(full["metrics"]["eval/loss"])
    got, expected = _weights(resumed["dir"]), _weights(full["dir"])
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)


@pytest.mark.distributed
def test_sigkill_then_resume_equals_uninterrupted(assets, ck_full):
    killed = launch(
        assets,
        "ck_kill",
        "deepspeed",
        CK_STEPS,
        extra=CK_ARGS,
        env_extra={"HDPO_FAULT_KILL_AT_STEP": "3"},
        expect_success=False,
    )
    assert killed["returncode"] == -9, killed["stderr"][-3000:]
    assert survivors_of_kill(killed["pgid"]) == [], "a rank outlived the kill"
    root = assets["root"] / "ck_kill" / "checkpoints"
    assert (root / "latest").read_text() == "step00000002"
    run_id = json.loads((root / "step00000002" / "client_state.json").read_text())["mlflow_run_id"]

    resumed = launch(assets, "ck_kill", "deepspeed", CK_STEPS, extra=CK_ARGS)
    assert "resumed from" in resumed["stderr"] and "at step 2" in resumed["stderr"]
    assert resumed["info"]["run_id"] == run_id  # the same MLflow run continues
    _assert_same_training(resumed, ck_full)
    # the last 2 complete checkpoints are kept, older ones pruned
    assert sorted(p.name for p in root.glob("step*")) == ["step00000004", "step00000006"]


@pytest.mark.distributed
def test_kill_during_checkpoint_write_keeps_previous_latest(assets, ck_full):
    killed = launch(
        assets,
        "ck_save",
        "deepspeed",
        CK_STEPS,
        extra=CK_ARGS,
        env_extra={"HDPO_FAULT_KILL_DURING_SAVE": "4"},
        expect_success=False,
    )
    assert killed["returncode"] == -9, killed["stderr"][-3000:]
    assert survivors_of_kill(killed["pgid"]) == [], "a rank outlived the kill"
    root = assets["root"] / "ck_save" / "checkpoints"
    assert (root / "latest").read_text() == "step00000002"
    half = root / "step00000004"
    assert half.is_dir() and any(half.glob("*model_states.pt")) and not (half / "COMPLETE.json").exists()

    resumed = launch(assets, "ck_save", "deepspeed", CK_STEPS, extra=CK_ARGS)
    assert "at step 2" in resumed["stderr"]
    _assert_same_training(resumed, ck_full)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_hf_export_loads_and_matches_the_checkpoint(assets, ck_full):
    """The in-run export (safetensors) loads with transformers and gives the logits of the weights
    DeepSpeed saved (reconstructed independently by zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    hf_dir = ck_full["dir"] / "hf"
    # training runs with use_cache=false; the export carries the model's own value (Llama: true)
    assert AutoConfig.from_pretrained(hf_dir).use_cache is True
    exported = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    AutoTokenizer.from_pretrained(hf_dir)  # the tokenizer travels with it
    state = get_fp32_state_dict_from_zero_checkpoint(str(ck_full["dir"] / "checkpoints"), tag="step00000006")
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_dir)).eval()
    reference.load_state_dict(state, strict=False)
    ids = torch.randint(0, exported.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(exported, ids), _logits(reference, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(
        _logits(exported, ids), _logits(AutoModelForCausalLM.from_pretrained(assets["model"]).eval(), ids)
    )  # trained


def test_offline_export_equals_in_run_export(ck_full, tmp_path):
    out = tmp_path / "offline"
    subprocess.run(
        [sys.executable, "-m", "hdpo_ds.runtime.export", str(ck_full["dir"] / "checkpoints"), str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    from safetensors.torch import load_file

    offline, in_run = load_file(str(out / "model.safetensors")), _weights(ck_full["dir"])
    assert set(offline) == set(in_run)
    for name in in_run:
        torch.testing.assert_close(offline[name], in_run[name], rtol=0, atol=0)
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out).use_cache is True  # the checkpoint's hf_config has it too


def test_offline_multi_shard_export_is_hf_hubs_split_and_loads_the_same_weights(ck_full, tmp_path):
    from huggingface_hub import constants, split_torch_state_dict_into_shards
    from transformers import AutoModelForCausalLM

    out = tmp_path / "offline_sharded"
    command = [sys.executable, "-m", "hdpo_ds.runtime.export", str(ck_full["dir"] / "checkpoints"), str(out)]
    command += ["--max-shard-gib", repr(16384 / 2**30)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    # the in-run export as transformers loads it: the module's state dict order, which the split follows
    in_run = AutoModelForCausalLM.from_pretrained(ck_full["dir"] / "hf").state_dict()
    assert sorted(in_run) == sorted(_weights(ck_full["dir"]))  # untied: every name is a saved tensor
    expected = split_torch_state_dict_into_shards(in_run, max_shard_size=16384)
    index = json.loads((out / constants.SAFETENSORS_INDEX_FILE).read_text())
    assert len(expected.filename_to_tensors) == 8  # as on ZeRO-3 in test_export.py
    assert index == {"metadata": expected.metadata, "weight_map": expected.tensor_to_filename}
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(expected.filename_to_tensors)
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert sorted(loaded) == sorted(in_run)
    for name, value in in_run.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)


def test_resume_with_changed_alpha_is_refused(assets, ck_full):
    refused = launch(
        assets, "ck_full", "python", CK_STEPS + 2, extra=[*CK_ARGS, "loss.alpha=0.8"], expect_success=False
    )
    assert refused["returncode"] == 2
    assert "loss.alpha: 0.9 in the checkpoint, 0.8 now" in refused["stderr"]
    assert "train.resume_force" in refused["stderr"]


def test_consecutive_nans_stop_with_a_good_checkpoint(assets):
    run = launch(
        assets,
        "ck_nan_stop",
        "python",
        6,
        extra=["train.save_every=1", "train.max_nonfinite_steps=2", "train.keep_checkpoints=10"],
        env_extra={"HDPO_FAULT_NAN_LOSS_AT_STEPS": "1,2"},
        expect_success=False,
    )
    assert run["returncode"] == 3, run["stderr"][-3000:]
    assert "2 consecutive steps had a non-finite loss" in run["stderr"]
    root = assets["root"] / "ck_nan_stop" / "checkpoints"
    assert (root / "latest").read_text() == "step00000003"
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # the skipped steps 1 and 2 changed nothing: the final checkpoint holds the weights after step 0
    after_step0 = get_fp32_state_dict_from_zero_checkpoint(str(root), tag="step00000001")
    final = get_fp32_state_dict_from_zero_checkpoint(str(root), tag="step00000003")
    for name, value in after_step0.items():
        assert torch.equal(value, final[name]), name
        assert torch.isfinite(final[name]).all()
    assert not (assets["root"] / "ck_nan_stop" / "hf").exists()  # no export of a stopped run
    assert os.path.exists(root / "step00000003" / "COMPLETE.json")


@pytest.mark.distributed
def test_rerun_of_a_finished_run_changes_nothing(assets, ck_full):
    hf = ck_full["dir"] / "hf" / "model.safetensors"
    before = hf.stat().st_mtime_ns
    again = launch(assets, "ck_full", "deepspeed", CK_STEPS, extra=CK_ARGS)
    assert "nothing left to train" in again["stdout"]
    assert again["info"]["run_id"] == ck_full["info"]["run_id"]
    assert again["metrics"]["_counts"]["loss"] == CK_STEPS
    assert again["metrics"]["_counts"]["eval/loss"] == len(ck_full["metrics"]["eval/loss"])
    assert hf.stat().st_mtime_ns == before  # no second export
    assert again["info"] == ck_full["info"]  # run_info.json (final loss, alerts) is the finished run's


@pytest.mark.distributed
@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_with_the_fused_head(assets):
    """train.fused_head on (objectives/fused_head.py: dW from the chunked backward, no logits): a run
    SIGKILLed as step 3 starts and resumed equals the uninterrupted fused run, step by step and in its
    final weights."""
    fused = [*CK_ARGS, "train.fused_head=true"]
    full = launch(assets, "ck_fused_full", "deepspeed", CK_STEPS, extra=fused)
    assert full["params"]["run.fused_head"] == "True"
    killed = launch(
        assets,
        "ck_fused_kill",
        "deepspeed",
        CK_STEPS,
        extra=fused,
        env_extra={"HDPO_FAULT_KILL_AT_STEP": "3"},
        expect_success=False,
    )
    assert killed["returncode"] == -9, killed["stderr"][-3000:]
    resumed = launch(assets, "ck_fused_kill", "deepspeed", CK_STEPS, extra=fused)
    assert "resumed from" in resumed["stderr"] and "at step 2" in resumed["stderr"]
    assert resumed["params"]["run.fused_head"] == "True"
    _assert_same_training(resumed, full)
