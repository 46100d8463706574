"""Supervised fine-tuning (hdpo_ds/recipes/sft.py, launch/sft.py) and launch/evaluate.py on real runs:
the step loss is the naive token-mean NLL, 2 ranks follow 1 process, evaluation is rank-independent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hdpo_ds.data import collate_sequences, pack_sequences
from hdpo_ds.data.tokenize import encode_prompt
from hdpo_ds.runtime import stop
from tests.run_helpers import ROOT, VENV_BIN, free_port, live_processes_in_group, mlflow_run

STEPS, PER_STEP = 4, 8


# ---------------------------------------------------------------------------------------------- units


def test_pack_sequences_places_each_sequence_once_on_every_layout():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 40, size=37)
    for packing in (True, False):
        for world in (1, 2, 3):
            packed = pack_sequences(lengths, world_size=world, max_tokens_per_micro_batch=80, packing=packing)
            counts = {len(r) for r in packed.ranks}
            assert len(counts) == 1  # the same number of micro-batches on every rank
            real = sorted(i for r in packed.ranks for mb in r if not mb.filler for i in mb.pairs)
            assert real == list(range(len(lengths)))
            for r in packed.ranks:
                assert all(mb.tensor_tokens <= 80 for mb in r)
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch"):
        pack_sequences([100], world_size=1, max_tokens_per_micro_batch=80)


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
    from hdpo_ds.examples.toy.arith import build_tokenizer, write_task

    root = tmp_path_factory.mktemp("sft")
    task = root / "task"
    write_task(str(task), 3, sft_train=64, sft_eval=16, pair_prompts=8, eval_prompts=6, val_prompts=6)
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


def _sft_command(assets, name: str, launcher: str, extra=(), steps: int = STEPS) -> list[str]:
    root, task = assets["root"], assets["task"]
    cmd = {
        "python": [sys.executable],
        "deepspeed": [
            os.path.join(VENV_BIN, "deepspeed"),
            "--num_accelerators",
            "2",
            "--master_port",
            str(free_port()),
        ],
    }[launcher]
    cmd += [
        "launch/sft.py",
        "--ds",
        str(root / "zero3.json"),
        "--config",
        "configs/toy/sft.yaml",
        f"output_dir={root / name}",
        f"model.name_or_path={task}",
        f"data.train_files=[{task}/sft_train.jsonl]",
        f"data.eval_files=[{task}/sft_eval.jsonl]",
        f"train.max_steps={steps}",
        f"train.pairs_per_step={PER_STEP}",
        "optim.schedule=constant",
        "data.max_tokens_per_micro_batch=128",
        "optim.warmup_steps=0",
        "train.seed=5",
        "model.from_scratch=false",
        f"logging.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        "logging.progress_bar=false",
        *extra,
    ]
    return cmd


def _sft_env(env_extra=None) -> dict:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    env.update(env_extra or {})
    return env


def _sft(
    assets, name: str, launcher: str, extra=(), steps: int = STEPS, env_extra=None, expect: int = 0
) -> subprocess.CompletedProcess:
    cmd = _sft_command(assets, name, launcher, extra, steps)
    proc = subprocess.run(cmd, cwd=ROOT, env=_sft_env(env_extra), capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-5000:]
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

    from hdpo_ds.recipes.sft import _step_indices

    task, tok = sft_assets["task"], sft_assets["tokenizer"]
    rows = [json.loads(x) for x in (task / "sft_train.jsonl").read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(str(task), attn_implementation="sdpa").eval()
    nll, tokens, lengths = 0.0, 0, []
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
        lengths.append(len(prompt) + len(completion))
    assert sft_one["metrics"]["loss"][0] == pytest.approx(nll / tokens, rel=1e-4)
    assert sft_one["metrics"]["tokens"][0] == tokens
    # perf/mfu: 6·N per token (N: every parameter but an untied input embedding) and causal attention
    # 3 x 2·layers·heads·head_dim·n² per sequence, over step time x the logged peak
    config = model.config
    embedding = 0 if config.tie_word_embeddings else model.get_input_embeddings().weight.numel()
    n = sum(p.numel() for p in model.parameters()) - embedding
    width = config.num_attention_heads * (config.head_dim or config.hidden_size // config.num_attention_heads)
    flops = 6 * n * sum(lengths) + 3 * 2 * config.num_hidden_layers * width * sum(x * x for x in lengths)
    peak = float(sft_one["params"]["run.peak_tflops"]) * 1e12
    step_time = sum(lengths) / sft_one["metrics"]["perf/tokens_per_second_per_device"][0]
    assert int(sft_one["params"]["run.flop_params"]) == n
    assert sft_one["metrics"]["perf/mfu"][0] == pytest.approx(flops / (step_time * peak), rel=1e-9)


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
    cmd = [
        sys.executable,
        "launch/sft.py",
        "--ds",
        str(sft_assets["root"] / "zero3.json"),
        "--config",
        "configs/toy/sft.yaml",
        f"model.name_or_path={sft_assets['task']}",
        f"data.train_files=[{bad}]",
        "data.eval_files=[]",
        f"output_dir={tmp_path / 'out'}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "bad.jsonl: record 1: field 'completion'" in proc.stderr


def _metric_history(assets, run_id: str) -> dict:
    """{metric: {step: value}} of an MLflow run (a failed or stopped run writes no run_info.json)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{assets['root'] / 'mlflow.db'}")
    return {
        key: {m.step: m.value for m in client.get_metric_history(run_id, key)}
        for key in client.get_run(run_id).data.metrics
    }


def _zero_weights(run_dir, step: int) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=f"step{step:08d}")


def test_sft_nan_steps_are_skipped_counted_and_stop_the_run(sft_assets):
    """HDPO_FAULT_NAN_LOSS_AT_STEPS=1,3,4 with train.max_nonfinite_steps=2 and a cosine schedule: steps 1, 3
    and 4 change no weight and do not advance the schedule, are counted, and the second skip in a row
    stops the run (exit 3) with a checkpoint of the last good weights and no export."""
    run_dir = sft_assets["root"] / "nan"
    extra = ["data.packing=true", "train.save_every=1", "train.keep_checkpoints=10"]
    extra += ["train.max_nonfinite_steps=2", "optim.schedule=cosine"]
    faults = {"HDPO_FAULT_NAN_LOSS_AT_STEPS": "1,3,4"}
    proc = _sft(sft_assets, "nan", "python", extra, steps=8, env_extra=faults, expect=3)
    assert "2 consecutive steps had a non-finite loss (train.max_nonfinite_steps=2)" in proc.stderr
    assert (
        "step 1: non-finite loss on some rank; the update was skipped (1 in a row, 1 in all)" in proc.stderr
    )
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text() == "step00000005"
    assert not (run_dir / "hf").exists()
    state = json.loads((root / "step00000005" / "client_state.json").read_text())
    assert state["nonfinite"] == {"skipped_total": 3, "consecutive": 2}

    m = _metric_history(sft_assets, state["mlflow_run_id"])
    assert [m["nonfinite/skipped_steps"][s] for s in range(5)] == [0, 1, 1, 2, 3]
    assert [bool(np.isnan(m["loss"][s])) for s in range(5)] == [False, True, False, True, True]
    # cosine over 8 steps from 3e-3 to 0.1 x 3e-3 (configs/toy/sft.yaml), indexed by the updates done so far
    updates = [0, 1, 1, 2, 2]
    expected_lr = [3e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * k / 8))) for k in updates]
    assert [m["lr"][s] for s in range(5)] == pytest.approx(expected_lr, rel=1e-6)

    weights = {s: _zero_weights(run_dir, s) for s in (1, 2, 3, 5)}  # checkpoint s: after steps 0..s-1
    for name, value in weights[1].items():
        assert torch.equal(weights[2][name], value), name  # step 1 skipped
        assert torch.equal(weights[5][name], weights[3][name]), name  # steps 3 and 4 skipped
        assert torch.isfinite(weights[5][name]).all()
    assert any(not torch.equal(weights[3][n], v) for n, v in weights[1].items())  # step 2 trained


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (the SigCgt mask of /proc/<pid>/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


def _rank_pid(pgid: int, rank: int) -> int | None:
    """The pid of `launch/sft.py` rank `rank` in process group `pgid`, found by its RANK variable."""
    for pid in live_processes_in_group(pgid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"launch/sft.py" not in f.read():
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"RANK={rank}".encode() in f.read().split(b"\0"):
                    return pid
        except OSError:
            continue
    return None


def _signal_during_startup(assets, name: str, launcher: str, sig: int, rank: int, marker) -> dict:
    """Start an SFT run, send `sig` to rank `rank` once its handlers are in (still starting up, so the
    stop comes after step 0), and wait for the run to end. Under plain python the rank is the process
    itself (its RANK is set at run time, so /proc/<pid>/environ does not show it)."""
    proc = subprocess.Popen(
        _sft_command(assets, name, launcher, ["data.packing=true"]),
        cwd=ROOT,
        env=_sft_env({stop.MARKER_ENV: str(marker)}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        find = (lambda: proc.pid) if launcher == "python" else (lambda: _rank_pid(proc.pid, rank))
        while (pid := find()) is None or not _catches(pid, sig):
            assert proc.poll() is None and time.monotonic() < deadline, "rank never caught the stop signal"
            time.sleep(0.05)
        os.kill(pid, sig)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return {"returncode": proc.returncode, "stdout": stdout, "stderr": stderr}


def test_sft_sigterm_checkpoints_exits_75_and_resumes_like_uninterrupted(sft_assets, sft_one):
    marker = sft_assets["root"] / "stop_one.json"
    run = _signal_during_startup(sft_assets, "stop_one", "python", signal.SIGTERM, 0, marker)
    assert run["returncode"] == stop.EXIT_STOPPED, run["stderr"][-4000:]
    assert "stop requested on 1 of 1 ranks (here: SIGTERM)" in run["stderr"]
    root = sft_assets["root"] / "stop_one" / "checkpoints"
    assert (root / "latest").read_text() == "step00000001"
    assert json.loads((root / "step00000001" / "COMPLETE.json").read_text())["step"] == 1
    info = json.loads(marker.read_text())
    assert (
        info["step"] == 1 and info["exit_code"] == stop.EXIT_STOPPED and info["signals_rank0"] == ["SIGTERM"]
    )
    run_id = json.loads((root / "step00000001" / "client_state.json").read_text())["mlflow_run_id"]

    proc = _sft(sft_assets, "stop_one", "python", ["data.packing=true"])
    assert f"resumed from {root / 'step00000001'} at step 1" in proc.stderr
    resumed = mlflow_run(sft_assets["root"] / "stop_one")
    assert resumed["info"]["run_id"] == run_id and resumed["info"]["steps"] == STEPS
    for step in range(STEPS):
        assert resumed["metrics"]["loss"][step] == pytest.approx(
            sft_one["metrics"]["loss"][step], rel=1e-5
        ), step
    assert resumed["metrics"]["_counts"]["loss"] == STEPS
    assert resumed["metrics"]["eval/loss"][STEPS] == pytest.approx(
        sft_one["metrics"]["eval/loss"][STEPS], rel=1e-5
    )


@pytest.mark.distributed
def test_sft_sigusr1_to_one_rank_stops_both_at_the_same_step(sft_assets, sft_one):
    """SIGUSR1 to rank 1 alone: the step's all-reduce tells rank 0, both checkpoint after step 0 and leave
    with 75; the resumed 2-rank run follows the one-process run."""
    marker = sft_assets["root"] / "stop_two.json"
    run = _signal_during_startup(sft_assets, "stop_two", "deepspeed", signal.SIGUSR1, 1, marker)
    assert run["returncode"] == stop.EXIT_STOPPED, run["stderr"][-4000:]
    out = run["stdout"] + run["stderr"]
    assert "[rank0] WARNING hdpo_ds.recipes.session: stop requested on 1 of 2 ranks (here: none)" in out
    assert "[rank1] WARNING hdpo_ds.recipes.session: stop requested on 1 of 2 ranks (here: SIGUSR1)" in out
    folder = sft_assets["root"] / "stop_two" / "checkpoints" / "step00000001"
    complete = json.loads((folder / "COMPLETE.json").read_text())
    assert complete["world_size"] == 2 and complete["step"] == 1
    assert all(f"rng_rank{r}.pt" in complete["files"] for r in (0, 1))
    assert json.loads(marker.read_text())["ranks_signalled"] == 1

    proc = _sft(sft_assets, "stop_two", "deepspeed", ["data.packing=true"])
    assert f"resumed from {folder} at step 1" in proc.stdout + proc.stderr
    resumed = mlflow_run(sft_assets["root"] / "stop_two")
    losses = [resumed["metrics"]["loss"][s] for s in range(STEPS)]
    np.testing.assert_allclose(losses, [sft_one["metrics"]["loss"][s] for s in range(STEPS)], rtol=2e-4)
    assert resumed["metrics"]["_counts"]["loss"] == STEPS


def _completion_tokens(row: dict, max_length: int, max_prompt_length: int) -> tuple[int, bool, bool]:
    """Completion tokens of a toy record after keep_end truncation, and whether its prompt / completion
    was cut. The toy tokenizer is character-level: BOS + one id per prompt character, one id per completion
    character + EOS."""
    prompt, completion = 1 + len(row["prompt"]), len(row["completion"]) + 1
    kept_prompt = min(prompt, max_prompt_length)
    kept = min(completion, max_length - kept_prompt)
    return kept, prompt > max_prompt_length, kept < completion


def test_sft_reads_the_configured_rows_eval_rows_eval_pairs_truncation_and_cache(sft_assets):
    """data.rows=0:40, data.eval_rows=4:16, train.eval_pairs=5, keep_end truncation at max_length 40 /
    max_prompt_length 16, data.cache_dir: the run's counts and token totals are those of exactly those
    records, computed here from the files."""
    from hdpo_ds.recipes.sft import _step_indices

    task, cache = sft_assets["task"], sft_assets["root"] / "keys_cache"
    # quoted: YAML 1.1 reads 4:16 as the base-60 integer 256
    extra = ["data.rows='0:40'", "data.eval_rows='4:16'", "train.eval_pairs=5"]
    extra += ["data.max_length=40", "data.max_prompt_length=16", f"data.cache_dir={cache}"]
    _sft(sft_assets, "keys", "python", extra, steps=2)
    run = mlflow_run(sft_assets["root"] / "keys")
    train = [json.loads(x) for x in (task / "sft_train.jsonl").read_text().splitlines()][0:40]
    evals = [json.loads(x) for x in (task / "sft_eval.jsonl").read_text().splitlines()][4:16]
    counted = [_completion_tokens(r, 40, 16) for r in train]
    assert run["params"]["run.train_sequences"] == "40" and run["params"]["run.eval_sequences"] == "12"
    assert int(run["params"]["data.truncated_prompt"]) == sum(c[1] for c in counted) > 0
    assert int(run["params"]["data.truncated_completion"]) == sum(c[2] for c in counted) > 0
    assert run["metrics"]["tokens"][0] == sum(counted[i][0] for i in _step_indices(40, PER_STEP, 5, 0))
    assert run["metrics"]["eval/tokens"][2] == sum(_completion_tokens(r, 40, 16)[0] for r in evals[:5])
    caches = sorted(cache.glob("sft-tokenized-*"))
    assert len(caches) == 2 and all((c / "meta.json").is_file() for c in caches)


def test_sft_refuses_keys_it_does_not_use(sft_assets, tmp_path):
    proc = _sft(sft_assets, "refused", "python", ["loss.beta=0.5"], steps=1, expect=2)
    assert "loss.beta: does not apply to SFT" in proc.stderr
    assert not (sft_assets["root"] / "refused" / "checkpoints").exists()


def test_sft_refuses_the_preference_worker_pool():
    from hdpo_ds.config import ConfigError, load_config
    from hdpo_ds.recipes.sft import check_sft_config

    base = ["model.name_or_path=configs/models/tiny-demo", "data.train_files=[x.jsonl]"]
    check_sft_config(load_config(None, [*base, "data.num_proc=0"]))
    with pytest.raises(ConfigError, match="data.num_proc: does not apply to SFT"):
        check_sft_config(load_config(None, [*base, "data.num_proc=4"]))


# ---------------------------------------------------------------------------------------------- data units


def _raw(rows: list):
    from hdpo_ds.data.records import RawTable

    return RawTable([("mem.jsonl", i, r) for i, r in enumerate(rows)], "test-fingerprint", ["mem.jsonl"])


# ids of the toy tokenizer (character-level): BOS 1, EOS 2, '0'..'9' 4..13, '+' 14, '=' 15, ':' 16, ' ' 17,
# 'A' 18, 'Q' 19, newline 20
TRUNCATION_ROWS = [
    {"id": "long", "prompt": "Q:1+2=\n", "completion": "1+2=3 A:3"},  # 8 prompt + 10 completion ids
    {"id": "short", "prompt": "Q:\n", "completion": "A:0"},  # 4 + 4
    {"id": "bad", "prompt": "Q:\n"},
]
TRUNCATION = {"max_length": 12, "max_prompt_length": 5, "on_bad_record": "skip"}


def test_tokenize_sft_truncation_policies_by_hand():
    from hdpo_ds.data.sft import tokenize_sft
    from hdpo_ds.examples.toy.arith import build_tokenizer

    tok = build_tokenizer()
    keep_end = tokenize_sft(_raw(TRUNCATION_ROWS), tok, truncation="keep_end", **TRUNCATION)
    assert keep_end.ids == ["long", "short"]
    assert keep_end.prompts == [[1, 14, 6, 15, 20], [1, 19, 16, 20]]  # BOS + the prompt's last 4 ids
    assert keep_end.completions == [[5, 14, 6, 15, 7, 17, 18], [18, 16, 4, 2]]  # cut to 12 - 5, EOS lost
    assert keep_end.stats == {"truncated_prompt": 1, "truncated_completion": 1, "lost_eos": 1}
    assert keep_end.skipped == {"missing_field": 1}
    keep_start = tokenize_sft(_raw(TRUNCATION_ROWS), tok, truncation="keep_start", **TRUNCATION)
    assert keep_start.prompts == [[1, 19, 16, 5, 14], [1, 19, 16, 20]]
    assert keep_start.completions == keep_end.completions
    drop = tokenize_sft(_raw(TRUNCATION_ROWS), tok, truncation="drop", **TRUNCATION)
    assert drop.ids == ["short"] and drop.completions == [[18, 16, 4, 2]]
    assert drop.skipped == {"missing_field": 1, "dropped_overlength": 1}
    assert drop.stats == {"truncated_prompt": 0, "truncated_completion": 0, "lost_eos": 0}


def test_tokenize_sft_cache_is_written_once_and_read_back(tmp_path):
    from hdpo_ds.data.sft import tokenize_sft
    from hdpo_ds.examples.toy.arith import build_tokenizer

    tok = build_tokenizer()
    first = tokenize_sft(_raw(TRUNCATION_ROWS), tok, cache_dir=str(tmp_path), **TRUNCATION)
    again = tokenize_sft(_raw(TRUNCATION_ROWS), tok, cache_dir=str(tmp_path), **TRUNCATION)
    assert not first.from_cache and again.from_cache and again.cache_path == first.cache_path
    assert (again.ids, again.prompts, again.completions) == (first.ids, first.prompts, first.completions)
    assert (again.skipped, again.stats) == (first.skipped, first.stats)
    other = tokenize_sft(_raw(TRUNCATION_ROWS), tok, cache_dir=str(tmp_path), truncation="drop", **TRUNCATION)
    assert not other.from_cache and other.ids == ["short"]  # other options: another cache entry
    assert len(list(tmp_path.glob("sft-tokenized-*"))) == 2


def test_read_sft_sources_honours_split_and_row_slices(tmp_path):
    import datasets

    from hdpo_ds.config import ConfigError, load_config
    from hdpo_ds.recipes.sft import read_sft_sources

    def records(name: str, n: int) -> datasets.Dataset:
        return datasets.Dataset.from_list(
            [{"id": f"{name}{i}", "prompt": "Q:\n", "completion": f"A:{i}"} for i in range(n)]
        )

    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": records("train", 2), "test": records("test", 5)}).save_to_disk(str(folder))

    def ids(overrides: list[str]) -> dict[str, list[str]]:
        cfg = load_config("configs/toy/sft.yaml", [f"data.train_files=[{folder}]", *overrides])
        return {name: [r[2]["id"] for r in raw.rows] for name, raw in read_sft_sources(cfg).items()}

    assert ids(["data.eval_files=[]"]) == {"train": ["train0", "train1"]}
    assert ids(["data.eval_files=[]", "data.split=test"]) == {"train": [f"test{i}" for i in range(5)]}
    assert ids(
        [f"data.eval_files=[{folder}]", "data.split=test", "data.rows='1:3'", "data.eval_rows='-1:'"]
    ) == {
        "train": ["test1", "test2"],
        "eval": ["test4"],
    }
    with pytest.raises(ConfigError, match="^data.eval_rows: invalid row slice"):
        ids([f"data.eval_files=[{folder}]", "data.eval_rows=1-3"])


# -------------------------------------------------------------------------------------------- evaluation runs


def _evaluate(assets, launcher: str, out: str, extra=()) -> dict:
    cmd = {
        "python": [sys.executable],
        "deepspeed": [
            os.path.join(VENV_BIN, "deepspeed"),
            "--num_accelerators",
            "2",
            "--master_port",
            str(free_port()),
        ],
    }[launcher]
    cmd += [
        "launch/evaluate.py",
        "--model",
        str(assets["root"] / "one" / "hf"),
        "--prompts",
        str(assets["task"] / "eval_prompts.jsonl"),
        "--checker",
        "arith",
        "--temperatures",
        "0.5",
        "1.0",
        "--num-samples",
        "8",
        "--k",
        "1",
        "2",
        "8",
        "--max-new-tokens",
        "24",
        "--prompts-per-batch",
        "2",
        "--seed",
        "3",
        "--out",
        out,
        "--tracking-uri",
        f"sqlite:///{assets['root'] / 'mlflow.db'}",
        "--no-progress",
        *extra,
    ]
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
    proc = subprocess.run(
        [
            sys.executable,
            "launch/evaluate.py",
            "--model",
            cmd_model,
            "--prompts",
            str(sft_assets["task"] / "eval_prompts.jsonl"),
            "--checker",
            "arith",
            "--temperatures",
            "0.5",
            "1.0",
            "--num-samples",
            "8",
            "--k",
            "1",
            "2",
            "8",
            "--max-new-tokens",
            "24",
            "--prompts-per-batch",
            "2",
            "--seed",
            "3",
            "--out",
            str(out),
            "--no-mlflow",
            "--no-progress",
            "--limit",
            "3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    from_ckpt = json.loads(out.read_text())
    assert os.path.basename(from_ckpt["model_dir"]).startswith("model-step")
    assert from_ckpt["per_prompt"] == from_hf["per_prompt"]
    assert from_ckpt["temperatures"]["1"]["token_entropy"] == pytest.approx(
        from_hf["temperatures"]["1"]["token_entropy"], rel=1e-5
    )
