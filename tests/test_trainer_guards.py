"""Real runs of the guards (tests/run_helpers.py): a non-finite step changes nothing and the next gradient is
that of the untouched weights, bf16 accumulates in fp32, alpha follows an evaluation-time controller,
dropout is off, a resume applies (or refuses) changed optimizer settings."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hdpo_ds.data import PairSampler
from hdpo_ds.recipes.session import lr_multiplier
from tests.run_helpers import BUDGET, PAIRS_PER_STEP, ROOT, VENV_BIN, free_port, launch


def _naive_step_gradient(assets, policy_state: dict, step: int, *, beta: float, alpha: float):
    """The gradient of H-DPO's mean loss over the pairs of `step`, written out (Omura et al. 2024, Sec. 3:
    -log sigmoid(beta * (alpha * (lp_w - lp_l) - (ref_w - ref_l)))), one unpacked sequence at a time in
    float64 log-softmax, with the policy at `policy_state` and the reference at the initial weights."""
    from transformers import AutoModelForCausalLM

    def load(state=None):
        model = AutoModelForCausalLM.from_pretrained(
            assets["model"], dtype=torch.float32, attn_implementation="sdpa"
        )
        if state is not None:
            model.load_state_dict(state, strict=False)
        return model

    policy, reference = load(policy_state), load().eval()
    pairs = assets["pairs"]
    sampler = PairSampler(
        pairs.lengths,
        pairs_per_step=PAIRS_PER_STEP,
        world_size=1,
        rank=0,
        seed=assets["seed"],
        max_tokens_per_micro_batch=BUDGET,
    )
    indices = sampler.assignment(step // len(sampler), step % len(sampler)).pair_indices

    def logp(model, prompt, response):
        ids = torch.tensor([list(prompt) + list(response)])
        scores = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].double(), -1)
        start = len(prompt) - 1
        return scores[start:].gather(-1, ids[0, 1:][start:, None]).sum()

    losses = []
    for i in indices:
        pair = pairs[int(i)]
        with torch.no_grad():
            ref_w, ref_l = (
                logp(reference, pair.prompt_ids, pair.chosen_ids),
                logp(reference, pair.prompt_ids, pair.rejected_ids),
            )
        lp_w, lp_l = (
            logp(policy, pair.prompt_ids, pair.chosen_ids),
            logp(policy, pair.prompt_ids, pair.rejected_ids),
        )
        losses.append(-F.logsigmoid(beta * (alpha * (lp_w - lp_l) - (ref_w - ref_l))))
    torch.stack(losses).mean().backward()
    return {n: p.grad.float() for n, p in policy.named_parameters()}


def _zero_state(run_dir, tag: str) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag)


@pytest.mark.distributed
def test_nonfinite_loss_and_gradient_steps_change_nothing(assets):
    """2 ranks, cosine schedule: rank 0's loss is NaN at step 1, and at step 2 a NaN enters the gradient
    inside the graph (the loss stays finite). Both updates are skipped on both ranks: the weights and the
    learning rate stay put, and step 3's gradient is that of the weights after step 0 on step 3's pairs."""
    run = launch(
        assets,
        "guard_nan",
        "deepspeed",
        4,
        extra=[
            "optim.schedule=cosine",
            "train.save_every=1",
            "train.keep_checkpoints=10",
            "train.dump_gradients_at=[3]",
            "train.eval_every=0",
        ],
        env_extra={"HDPO_FAULT_NAN_LOSS_AT_STEPS": "1", "HDPO_FAULT_NAN_GRAD_AT_STEPS": "2"},
    )
    m = run["metrics"]
    assert [m["nonfinite/skipped_steps"][s] for s in range(4)] == [0, 1, 2, 2]
    assert np.isnan(m["loss"][1]) and np.isfinite(m["loss"][2])  # step 2: a finite loss, a NaN gradient
    assert np.isnan(m["grad_norm"][1]) and np.isnan(m["grad_norm"][2])
    assert np.isfinite(m["grad_norm"][3]) and m["grad_norm"][3] > 0
    assert "non-finite loss or gradient" in run["stderr"]
    schedule = dict(warmup_steps=0, max_steps=4, schedule="cosine", min_lr_ratio=0.0)
    expected_lr = [
        1e-3 * lr_multiplier(s, **schedule) for s in (0, 1, 1, 1)
    ]  # skipped steps do not advance it
    assert [m["lr"][s] for s in range(4)] == pytest.approx(expected_lr, rel=1e-12)
    after_step0 = _zero_state(run["dir"], "step00000001")
    for name, value in _zero_state(run["dir"], "step00000003").items():
        assert torch.equal(value, after_step0[name]), name
    expected = _naive_step_gradient(assets, after_step0, 3, beta=0.5, alpha=0.9)
    got = torch.load(run["dir"] / "diagnostics" / "grads_step3.pt")
    assert set(got) == set(expected)
    for name, g in expected.items():
        scale = g.abs().max().item()
        torch.testing.assert_close(
            got[name], g, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}"
        )
    from safetensors.torch import load_file

    assert all(
        torch.isfinite(t).all() for t in load_file(str(run["dir"] / "hf" / "model.safetensors")).values()
    )


@pytest.mark.distributed
def test_bf16_gradients_accumulate_in_fp32(assets, tmp_path):
    """The accumulated gradient of a 2-rank bf16 engine against the same sum in fp32: with the dtype
    fill_ds_config chooses the error does not grow from 2 to 16 micro-batches per rank; with bf16
    accumulation (DeepSpeed's default under bf16) it does."""
    out = tmp_path / "errors.json"
    cmd = [
        os.path.join(VENV_BIN, "deepspeed"),
        "--num_accelerators",
        "2",
        "--master_port",
        str(free_port()),
        "tests/probes/grad_accum.py",
        str(assets["root"] / "zero3.json"),
        str(out),
    ]
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    errors = json.loads(out.read_text())
    assert errors["bf16_filled/16"] < 1.1 * errors["bf16_filled/2"], errors
    assert errors["bf16_accum/16"] > 1.15 * errors["bf16_accum/2"], errors
    assert errors["bf16_accum/16"] > 1.15 * errors["bf16_filled/16"], errors


ALPHA_ARGS = [
    "loss.alpha=auto",
    "loss.alpha_update=eval",
    "loss.target_entropy=1.0",
    "train.eval_every=1",
    "train.save_every=2",
    "train.dump_gradients_at=[]",
]


@pytest.fixture(scope="module")
def alpha_full(assets):
    return launch(assets, "alpha_full", "python", 5, extra=ALPHA_ARGS)


def test_alpha_moves_after_each_evaluation(alpha_full):
    m = alpha_full["metrics"]
    assert m["alpha"][0] == 1.0  # loss.alpha_init
    for step in range(1, 5):  # evaluation k (after step k-1) sets the alpha that step k trains at
        assert m["alpha"][step] == pytest.approx(m["alpha/next"][step], rel=1e-12)
        assert m["alpha"][step] < m["alpha"][step - 1]  # the entropy is far above the 1-nat target
    assert alpha_full["info"]["final_alpha"] == pytest.approx(m["alpha/next"][5], rel=1e-12)


def test_alpha_after_a_kill_and_resume_equals_uninterrupted(assets, alpha_full):
    killed = launch(
        assets,
        "alpha_kill",
        "python",
        5,
        extra=ALPHA_ARGS,
        env_extra={"HDPO_FAULT_KILL_AT_STEP": "3"},
        expect_success=False,
    )
    assert killed["returncode"] == -9, killed["stderr"][-3000:]
    resumed = launch(assets, "alpha_kill", "python", 5, extra=ALPHA_ARGS)
    assert "at step 2" in resumed["stderr"]
    for key in ("alpha", "loss", "eval/loss"):
        for step, value in alpha_full["metrics"][key].items():
            assert resumed["metrics"][key][step] == pytest.approx(value, rel=1e-5, abs=1e-7), (key, step)
    assert resumed["info"]["final_alpha"] == pytest.approx(alpha_full["info"]["final_alpha"], rel=1e-12)


def test_dropout_is_off_so_step0_rewards_are_zero(assets, tmp_path):
    """A config with attention dropout 0.5 and loss.alpha=1 (DPO): policy and reference compute the same
    log-probs at step 0, so every reward is 0 (with dropout on, the train-mode policy would differ)."""
    model = tmp_path / "dropout_model"
    shutil.copytree(assets["model"], model)
    config = json.loads((model / "config.json").read_text())
    config["attention_dropout"] = 0.5
    (model / "config.json").write_text(json.dumps(config))
    run = launch(
        assets,
        "dropout",
        "python",
        1,
        extra=[f"model.name_or_path={model}", "loss.alpha=1.0", "train.dump_gradients_at=[]"],
    )
    m = run["metrics"]
    assert m["rewards/chosen"][0] == 0.0 and m["rewards/rejected"][0] == 0.0
    assert m["loss"][0] == pytest.approx(math.log(2), rel=1e-6)  # float32


def test_resume_refuses_a_changed_lr_and_applies_it_when_forced(assets):
    args = ["train.save_every=2", "train.dump_gradients_at=[]", "train.eval_every=0"]
    first = launch(assets, "optim", "python", 4, extra=args)
    assert [first["metrics"]["lr"][s] for s in range(4)] == [1e-3] * 4
    refused = launch(assets, "optim", "python", 6, extra=[*args, "optim.lr=5e-4"], expect_success=False)
    assert refused["returncode"] == 2
    assert "optim.lr: 0.001 in the checkpoint, 0.0005 now" in refused["stderr"]
    forced = launch(assets, "optim", "python", 6, extra=[*args, "optim.lr=5e-4", "train.resume_force=true"])
    assert "at step 4" in forced["stderr"]
    assert [forced["metrics"]["lr"][s] for s in range(6)] == [1e-3] * 4 + [5e-4] * 2
