"""Supervised fine-tuning (hdpo_ds/sft.py, launch/sft.py) and launch/evaluate.py on real runs:
the step loss is the naive token-mean NLL, 2 ranks follow 1 process, evaluation is rank-independent."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hdpo_ds.data import collate_sequences, plan_sequences
from hdpo_ds.data.tokenize import encode_prompt
from tests.run_helpers import ROOT, VENV_BIN, free_port, mlflow_run

STEPS, PER_STEP = 4, 8


# ---------------------------------------------------------------------------------------------- units


def test_plan_sequences_places_each_sequence_once_on_every_layout():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 40, size=37)
    for packing in (True, False):
        for world in (1, 2, 3):
            plan = plan_sequences(lengths, world_size=world, max_tokens_per_micro_batch=80, packing=packing)
            counts = {len(r) for r in plan.ranks}
            assert len(counts) == 1  # the same number of micro-batches on every rank
            real = sorted(i for r in plan.ranks for mb in r if not mb.filler for i in mb.pairs)
            assert real == list(range(len(lengths)))
            for r in plan.ranks:
                assert all(mb.tensor_tokens <= 80 for mb in r)
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch"):
        plan_sequences([100], world_size=1, max_tokens_per_micro_batch=80)


def test_collate_sequences_labels_only_the_completion():
    for packing in (True, False):
        batch = collate_sequences(
            [([1, 5], [6, 7, 2]), ([1], [9, 2])], ["a", "b"], pad_token_id=0, packing=packing
        )
        labels = batch.labels.reshape(-1)[batch.labels.reshape(-1) != -100].tolist()
        assert labels == [6, 7, 2, 9, 2]
        assert batch.num_seqs == 2 and batch.is_chosen.all() and batch.pair_index.tolist() == [0, 1]
    packed = collate_sequences([([1, 5], [6, 7, 2]), ([1], [9, 2])], ["a", "b"], pad_token_id=0, packing=True)
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert packed.labels.tolist() == [[-100, 6, 7, 2, -100, 9, 2, -100]]


# ---------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def sft_assets(tmp_path_factory):
    from hdpo_ds.toy.arith import build_tokenizer, write_task

    root = tmp_path_factory.mktemp("sft")
    task = root / "task"
    write_task(str(task), 3, sft_train=64, sft_eval=16, pair_prompts=8, eval_prompts=6)
    cfg = json.loads((task / "config.json").read_text())
    cfg.update(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    (task / "config.json").write_text(json.dumps(cfg))
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)  # saved initial weights, so that a test can recompute step 0 with the same model
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(task))).save_pretrained(str(task))
    with open(os.path.join(ROOT, "ds_configs", "zero3.json")) as f:
        ds = json.load(f)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # really partitioned
    (root / "zero3.json").write_text(json.dumps(ds))
    return {"root": root, "task": task, "tokenizer": build_tokenizer()}


def _sft(assets, name: str, launcher: str, extra=(), steps: int = STEPS) -> subprocess.CompletedProcess:
    root, task = assets["root"], assets["task"]
    cmd = {"python": [sys.executable],
           "deepspeed": [os.path.join(VENV_BIN, "deepspeed"), "--num_accelerators", "2", "--master_port", str(free_port())]}[launcher]  # fmt: skip
    cmd += ["launch/sft.py", "--ds", str(root / "zero3.json"), "--config", "configs/toy/sft.yaml",
            f"output_dir={root / name}", f"model.name_or_path={task}", f"data.train_files=[{task}/sft_train.jsonl]",
            f"data.eval_files=[{task}/sft_eval.jsonl]", f"train.max_steps={steps}", f"train.pairs_per_step={PER_STEP}", "optim.schedule=constant",
            "data.max_tokens_per_micro_batch=128", "optim.warmup_steps=0", "train.seed=5", "model.from_scratch=false",
            f"logging.tracking_uri=sqlite:///{root / 'mlflow.db'}", "logging.progress_bar=false", *extra]  # fmt: skip
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def sft_one(sft_assets):
    _sft(sft_assets, "one", "python", ["data.packing=true"])
    return mlflow_run(sft_assets["root"] / "one")


@pytest.mark.distributed
def test_sft_two_ranks_padded_follow_one_packed_process(sft_assets, sft_one):
    _sft(sft_assets, "two", "deepspeed", ["data.packing=false"])
    two = mlflow_run(sft_assets["root"] / "two")
    one_losses = [sft_one["metrics"]["loss"][s] for s in range(STEPS)]
    two_losses = [two["metrics"]["loss"][s] for s in range(STEPS)]
    assert one_losses[-1] < one_losses[0] - 0.05  # it trained: equal trajectories are not trivially equal
    np.testing.assert_allclose(two_losses, one_losses, rtol=2e-4)
    assert sft_one["metrics"]["eval/loss"][STEPS] == pytest.approx(
        two["metrics"]["eval/loss"][STEPS], rel=2e-4
    )
    assert two["params"]["run.world_size"] == "2"


def test_sft_step0_loss_is_the_naive_token_mean_nll(sft_assets, sft_one):
    """Step 0's logged loss = mean NLL per completion token of that step's sequences under the initial
    model (saved by the fixture), computed here one sequence at a time with plain transformers."""
    from transformers import AutoModelForCausalLM

    from hdpo_ds.sft import _step_indices

    task, tok = sft_assets["task"], sft_assets["tokenizer"]
    rows = [json.loads(x) for x in (task / "sft_train.jsonl").read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(str(task), attn_implementation="sdpa").eval()
    nll, tokens = 0.0, 0
    for i in _step_indices(len(rows), PER_STEP, 5, 0):
        prompt = encode_prompt(tok, rows[i]["prompt"])
        # the prompt's ids are BOS + its characters; the rest of prompt + completion is the completion
        completion = tok(rows[i]["prompt"] + rows[i]["completion"], add_special_tokens=False)["input_ids"][
            len(prompt) - 1 :
        ]
        completion = [*completion, tok.eos_token_id]
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        targets = ids[0, 1:]
        nll -= float(logp[torch.arange(len(targets)), targets][len(prompt) - 1 :].sum())
        tokens += len(completion)
    assert sft_one["metrics"]["loss"][0] == pytest.approx(nll / tokens, rel=1e-4)
    assert sft_one["metrics"]["tokens"][0] == tokens


def test_sft_resumed_equals_uninterrupted(sft_assets, sft_one):
    """2 steps, then the same command with 4 steps resumes from the step-2 checkpoint and continues
    the same MLflow run along the uninterrupted trajectory (the sampler is a function of the step)."""
    _sft(sft_assets, "resumed", "python", ["data.packing=true"], steps=2)
    first_run_id = json.loads((sft_assets["root"] / "resumed" / "run_info.json").read_text())["run_id"]
    proc = _sft(sft_assets, "resumed", "python", ["data.packing=true"], steps=STEPS)
    assert "resumed from" in proc.stderr
    resumed = mlflow_run(sft_assets["root"] / "resumed")
    assert resumed["info"]["run_id"] == first_run_id and resumed["info"]["steps"] == STEPS
    for step in range(STEPS):
        assert resumed["metrics"]["loss"][step] == pytest.approx(
            sft_one["metrics"]["loss"][step], rel=1e-5
        ), step
    assert resumed["metrics"]["_counts"]["loss"] == STEPS  # no step logged twice


def test_sft_rejects_bad_records_by_file_record_and_field(sft_assets, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "Q:1+2=\n", "completion": "1+2=3 A:3"})
        + "\n"
        + json.dumps({"prompt": "Q:1=\n"})
        + "\n"
    )
    cmd = [sys.executable, "launch/sft.py", "--ds", str(sft_assets["root"] / "zero3.json"), "--config", "configs/toy/sft.yaml",
           f"model.name_or_path={sft_assets['task']}", f"data.train_files=[{bad}]", "data.eval_files=[]",
           f"output_dir={tmp_path / 'out'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "bad.jsonl: record 1: field 'completion'" in proc.stderr


# ---------------------------------------------------------------------------------------------- evaluation runs


def _evaluate(assets, launcher: str, out: str, extra=()) -> dict:
    cmd = {"python": [sys.executable],
           "deepspeed": [os.path.join(VENV_BIN, "deepspeed"), "--num_accelerators", "2", "--master_port", str(free_port())]}[launcher]  # fmt: skip
    cmd += ["launch/evaluate.py", "--model", str(assets["root"] / "one" / "hf"), "--prompts",
            str(assets["task"] / "eval_prompts.jsonl"), "--checker", "arith", "--temperatures", "0.5", "1.0",
            "--num-samples", "8", "--k", "1", "2", "8", "--max-new-tokens", "24", "--prompts-per-batch", "2", "--seed", "3",
            "--out", out, "--tracking-uri", f"sqlite:///{assets['root'] / 'mlflow.db'}", "--no-progress", *extra]  # fmt: skip
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(out) as f:
        return json.load(f)


@pytest.mark.distributed
def test_evaluation_two_ranks_equal_one_process(sft_assets, sft_one, tmp_path):
    one = _evaluate(
        sft_assets, "python", str(tmp_path / "one.json"), ["--samples", str(tmp_path / "one.jsonl")]
    )
    two = _evaluate(
        sft_assets, "deepspeed", str(tmp_path / "two.json"), ["--samples", str(tmp_path / "two.jsonl")]
    )
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["per_prompt"] == two["per_prompt"]
    for t in ("0.5", "1"):
        for key, value in one["temperatures"][t].items():
            assert two["temperatures"][t][key] == pytest.approx(value, rel=1e-6), (t, key)
    assert sorted((tmp_path / "one.jsonl").read_text().splitlines()) == sorted(
        (tmp_path / "two.jsonl").read_text().splitlines()
    )
    # pass@k from the samples themselves: per prompt, c correct of n, 1 - C(n - c, k) / C(n, k) (Chen et al.)
    from math import comb

    samples = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    for t in one["temperatures"]:
        n, c = {}, {}
        for x in samples:
            if f"{x['temperature']:g}" == t:
                n[x["id"]] = n.get(x["id"], 0) + 1
                c[x["id"]] = c.get(x["id"], 0) + x["correct"]
        assert one["per_prompt"][t] == {i: {"correct": c[i], "n": n[i]} for i in n}
        for k in (1, 2, 8):
            expected = np.mean([1 - comb(n[i] - c[i], k) / comb(n[i], k) for i in n])
            assert one["temperatures"][t][f"pass_at_{k}"] == pytest.approx(expected, rel=1e-12)
    # MLflow got the same numbers
    from mlflow.tracking import MlflowClient

    run = MlflowClient(one["tracking_uri"]).get_run(one["mlflow_run_id"])
    assert run.data.metrics["t1/pass_at_2"] == pytest.approx(one["temperatures"]["1"]["pass_at_2"])
    assert run.data.params["eval.n"] == "8"


def test_evaluation_reads_a_checkpoint_folder(sft_assets, sft_one, tmp_path):
    """--model may name the run's output_dir: its newest complete checkpoint is exported, then sampled;
    the samples equal those of the run's own HF export (same weights)."""
    from_hf = _evaluate(sft_assets, "python", str(tmp_path / "hf.json"), ["--no-mlflow", "--limit", "3"])
    cmd_model = str(sft_assets["root"] / "one")
    out = tmp_path / "ckpt.json"
    proc = subprocess.run([sys.executable, "launch/evaluate.py", "--model", cmd_model, "--prompts",
                           str(sft_assets["task"] / "eval_prompts.jsonl"), "--checker", "arith", "--temperatures", "0.5", "1.0",
                           "--num-samples", "8", "--k", "1", "2", "8", "--max-new-tokens", "24", "--prompts-per-batch", "2",
                           "--seed", "3", "--out", str(out), "--no-mlflow", "--no-progress", "--limit", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    from_ckpt = json.loads(out.read_text())
    assert os.path.basename(from_ckpt["model_dir"]).startswith("model-step")
    assert from_ckpt["per_prompt"] == from_hf["per_prompt"]
    assert from_ckpt["temperatures"]["1"]["token_entropy"] == pytest.approx(
        from_hf["temperatures"]["1"]["token_entropy"], rel=1e-5
    )
