"""The trainer end to end: 2 ranks of ZeRO-3 on CPU against one process and against plain math.

Runs shared by the tests of this module (each launch costs 15-40 s here):
- `ds2`: the deepspeed launcher, 2 ranks, 5 steps, full gradient dumped at step 0;
- `py1`: plain `python launch/train.py`, one process, the same 5 steps;
- `tr2`: torchrun, 2 ranks, 2 steps.
All use stage3_param_persistence_threshold 0 (so the tiny model is really partitioned), one thread per
process, and a data seed chosen so that step 0 gives the two ranks unequal pair counts and one rank a
zero-weight filler micro-batch.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from hdpo_ds.data import PairSampler, load_records, tokenize_pairs
from hdpo_ds.losses import preference_loss
from hdpo_ds.metrics import STEP_METRICS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)
MAX_LENGTH, BUDGET, PAIRS_PER_STEP, STEPS = 96, 192, 4, 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(count: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    words = (
        "apple banana cherry date fig grape kiwi lemon mango olive peach pear plum sage thyme mint".split()
    )
    out = []
    for i in range(count):
        n = max(2, min(30, round(rng.lognormvariate(1.5, 0.8))))
        items = [rng.choice(words) for _ in range(n)]
        good = ", ".join(sorted(items)) + "."
        bad = ", ".join(reversed(sorted(items))) + ". " + rng.choice(words)
        out.append({"id": f"p{i}", "prompt": f"Sort: {' '.join(items)}\n", "chosen": good, "rejected": bad})
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny saved Llama (untied, hidden 32), the demo tokenizer, data, and ZeRO-3 configs with
    persistence threshold 0; plus a training seed whose step 0 has unequal pairs and a filler."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("trainer")
    model_dir = root / "model"
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, "configs/models/tiny-demo"))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    train_file, eval_file = root / "train.jsonl", root / "eval.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in _records(40, seed=1)))
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in _records(6, seed=2)))

    for name in ("zero3.json", "zero3_infer.json"):
        with open(os.path.join(ROOT, "ds_configs", name)) as f:
            ds = json.load(f)
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (root / name).write_text(json.dumps(ds))

    pairs = tokenize_pairs(load_records([str(train_file)]), tokenizer, max_length=MAX_LENGTH,
                           max_prompt_length=64).pairs  # fmt: skip
    for seed in range(200):
        plan = PairSampler(pairs.lengths, pairs_per_step=PAIRS_PER_STEP, world_size=2, rank=0, seed=seed,
                           max_tokens_per_micro_batch=BUDGET).assignment(0, 0).plan  # fmt: skip
        counts = [sum(len(mb.pairs) for mb in rank if not mb.filler) for rank in plan.ranks]
        if counts[0] != counts[1] and any(mb.filler for rank in plan.ranks for mb in rank):
            break
    else:
        raise AssertionError("no seed gives step 0 a filler and unequal pair counts")
    return {"root": root, "model": str(model_dir), "train": str(train_file), "eval": str(eval_file),
            "seed": seed, "pairs": pairs, "tokenizer": tokenizer}  # fmt: skip


def _overrides(assets, name: str, steps: int) -> list[str]:
    root = assets["root"]
    return [
        f"model.name_or_path={assets['model']}",
        f"data.train_files=[{assets['train']}]",
        f"data.eval_files=[{assets['eval']}]",
        f"data.max_length={MAX_LENGTH}", "data.max_prompt_length=64",
        f"data.max_tokens_per_micro_batch={BUDGET}",
        f"train.pairs_per_step={PAIRS_PER_STEP}", f"train.max_steps={steps}", f"train.seed={assets['seed']}",
        "train.eval_every=2", "train.dump_gradients_at=[0]",
        "loss.type=hdpo", "loss.alpha=0.9", "loss.beta=0.5",
        "optim.lr=1e-3", "optim.warmup_steps=0", "optim.schedule=constant",
        f"reference.ds_config={root / 'zero3_infer.json'}",
        f"output_dir={root / name}",
        f"logging.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        "logging.progress_bar=false",
    ]  # fmt: skip


def _launch(assets, name: str, launcher: str, steps: int) -> dict:
    cmd = {
        "deepspeed": [os.path.join(VENV_BIN, "deepspeed"), "--num_accelerators", "2",
                      "--master_port", str(_free_port())],
        "torchrun": [os.path.join(VENV_BIN, "torchrun"), "--nproc-per-node", "2",
                     "--master-port", str(_free_port())],
        "python": [sys.executable],
    }[launcher]  # fmt: skip
    cmd += ["launch/train.py", "--ds", str(assets["root"] / "zero3.json"), *_overrides(assets, name, steps)]
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"  # compared runs use the same thread count
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{launcher} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    with open(assets["root"] / name / "run_info.json") as f:
        info = json.load(f)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(info["tracking_uri"])
    run = client.get_run(info["run_id"])
    history = {
        k: {m.step: m.value for m in client.get_metric_history(info["run_id"], k)} for k in run.data.metrics
    }
    return {"info": info, "params": run.data.params, "metrics": history, "dir": assets["root"] / name}


@pytest.fixture(scope="module")
def ds2(assets):
    return _launch(assets, "ds2", "deepspeed", STEPS)


@pytest.fixture(scope="module")
def py1(assets):
    return _launch(assets, "py1", "python", STEPS)


def _single_process_step0(assets):
    """The step-0 global batch computed with plain transformers, one sequence at a time, no packing."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        assets["model"], dtype=torch.float32, attn_implementation="sdpa"
    )
    pairs = assets["pairs"]
    sampler = PairSampler(pairs.lengths, pairs_per_step=PAIRS_PER_STEP, world_size=1, rank=0,
                          seed=assets["seed"], max_tokens_per_micro_batch=BUDGET)  # fmt: skip
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
    lp_w, lp_l = torch.stack(lp_w), torch.stack(lp_l)
    # At step 0 the reference is the policy's initial copy: same values, no gradient.
    out = preference_loss(lp_w, lp_l, lp_w.detach(), lp_l.detach(), loss_type="hdpo", beta=0.5, alpha=0.9)
    loss = out.losses.mean()
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters()}


def _assert_grads_close(got: dict, expected: dict):
    """rtol 1e-5 per element, with an absolute floor of 1e-5 x the tensor's largest entry: float32 sums
    in another order leave ~1e-8 noise on entries near zero, where a relative test means nothing."""
    assert set(got) == set(expected), set(got) ^ set(expected)
    for name, g in expected.items():
        scale = g.abs().max().item()
        assert scale > 0, f"{name}: an all-zero gradient would match anything"
        torch.testing.assert_close(
            got[name], g, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.distributed
def test_two_rank_step0_matches_single_process_math(assets, ds2):
    assert ds2["params"]["run.world_size"] == "2"
    expected_loss, expected_grads = _single_process_step0(assets)
    assert ds2["metrics"]["loss"][0] == pytest.approx(expected_loss, rel=1e-5)
    grads = torch.load(ds2["dir"] / "diagnostics" / "grads_step0.pt")
    _assert_grads_close(grads, expected_grads)


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
def test_torchrun_launch(assets, py1):
    tr2 = _launch(assets, "tr2", "torchrun", 2)
    assert tr2["params"]["run.world_size"] == "2"
    for step in range(2):
        assert tr2["metrics"]["loss"][step] == pytest.approx(py1["metrics"]["loss"][step], rel=1e-4, abs=1e-6)


def test_mlflow_holds_every_metric_for_every_step(py1):
    metrics = py1["metrics"]
    for key in STEP_METRICS:
        assert sorted(metrics[key]) == list(range(STEPS)), key
    eval_keys = [k for k in metrics if k.startswith("eval/")]
    assert len(eval_keys) == 17
    for key in eval_keys:
        assert sorted(metrics[key]) == [2, 4, STEPS], key
    params = py1["params"]
    assert params["config.loss.alpha"] == "0.9" and params["run.attn_implementation"] == "sdpa"
    assert params["ds_config.train_batch_size"] == "1" and "versions.deepspeed" in params
    # step 0: policy == reference, so the log-ratios are exactly 0
    assert metrics["logratio/chosen"][0] == 0.0 and metrics["logratio/rejected"][0] == 0.0
    assert all(0 <= metrics["rewards/accuracies"][s] <= 1 for s in range(STEPS))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.type=kto", "loss.type: unknown loss_type 'kto'"),
        ("loss.beta=-1", "loss.beta: must be > 0"),
        ("model.name_or_path=/nonexistent/model", "model.name_or_path: no such model directory"),
        ("data.train_files=[/nonexistent/train.jsonl]", "/nonexistent/train.jsonl"),
    ],
)
def test_bad_input_fails_before_any_engine(assets, monkeypatch, capsys, override, message):
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import train as launch_train

    from hdpo_ds import engine

    def forbidden(*args, **kwargs):
        raise AssertionError("an engine was built before the bad input was reported")

    monkeypatch.setattr(engine, "build_policy_engine", forbidden)
    monkeypatch.setattr(engine, "init_distributed", forbidden)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    args = ["--ds", "ds_configs/zero3.json", *_overrides(assets, "bad", 1), override]
    assert launch_train.main(args) == 2
    assert message in capsys.readouterr().err


def test_demo_assets_are_reproducible(tmp_path):
    """`python -m hdpo_ds.demo` regenerates the committed demo data byte for byte."""
    out = tmp_path / "model"
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "hdpo_ds.demo", "--out", str(out), "--data", str(data)],
                   cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    for name in ("train.jsonl", "eval.jsonl"):
        with open(data / name, "rb") as a, open(os.path.join(ROOT, "configs/data/demo", name), "rb") as b:
            assert a.read() == b.read(), name
    with (
        open(out / "config.json") as a,
        open(os.path.join(ROOT, "configs/models/tiny-demo/config.json")) as b,
    ):
        assert json.load(a) == json.load(b)
    shutil.rmtree(tmp_path)
