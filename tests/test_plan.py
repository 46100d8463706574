"""The memory planner (hdpo_ds/tools/plan.py) and the dry run (launch/train.py --dry-run,
hdpo_ds/tools/dryrun.py).

Fast: models are instantiated on the meta device only, and the dry runs tokenize the small demo data.
The planner-vs-measured-RSS benchmark (a real 2-rank run) is marked slow.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from hdpo_ds.config import load_config
from hdpo_ds.runtime.engine import resolve_dtype
from hdpo_ds.tools.plan import (
    GIB,
    Hardware,
    Settings,
    activation_bytes_per_token_layer,
    analytic_param_count,
    deepspeed_model_states,
    largest_micro_batch,
    load_hf_config,
    model_shape,
    plan_memory,
    recommend,
)
from tests.run_helpers import ROOT, restored_environ

MODELS = os.path.join(ROOT, "configs/models")
SHIPPED = ["tiny-demo", "llama-7b", "llama-34b", "command-r-35b", "llama-70b"]
# Exact counts known from the model cards / the published checkpoints (sum of parameter numels).
KNOWN = {"llama-7b": 6_738_415_616, "llama-70b": 68_976_648_192}
# The same worked by hand from each config.json (V vocab, H hidden, L layers, n heads, g kv heads, d head_dim,
# I intermediate): per layer q and o (H·n·d each), k and v (H·g·d each), the gated MLP (3·H·I) and the
# norms (2·H; Cohere's parallel block has one); then the embedding V·H (twice when lm_head is untied) and
# the final norm H.
BY_HAND = {
    # V 512, H 128, L 4, n 4, g 2, d 32, I 384, tied
    "tiny-demo": (512 * 128 + 4 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 384 + 2 * 128) + 128, 853_120),
    # V 32000, H 4096, L 32, n = g = 32, d 128, I 11008, untied
    "llama-7b": (
        2 * 32000 * 4096 + 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) + 4096,
        6_738_415_616,
    ),
    # V 32000, H 8192, L 48, n 64, g 8, d 128, I 22016, untied
    "llama-34b": (
        2 * 32000 * 8192 + 48 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 22016 + 2 * 8192) + 8192,
        33_743_970_304,
    ),
    # V 256000, H 8192, L 40, n = g = 64, d 128, I 22528, tied, one norm per layer
    "command-r-35b": (
        256000 * 8192 + 40 * (4 * 8192 * 8192 + 3 * 8192 * 22528 + 8192) + 8192,
        34_980_831_232,
    ),
    # V 32000, H 8192, L 80, n 64, g 8, d 128, I 28672, untied
    "llama-70b": (
        2 * 32000 * 8192 + 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192) + 8192,
        68_976_648_192,
    ),
}

DEMO_TRAIN = os.path.join(ROOT, "configs/data/demo/train.jsonl")
# the dry run of the shipped 35B config at 16 ranks
BIG_35B_16 = [
    "--world-size",
    "16",
    "--ds",
    "ds_configs/zero3_35b.json",
    "--config",
    "configs/command-r-35b.yaml",
]
BIG_PATHS = [
    "model.from_scratch=true",
    f"model.tokenizer={MODELS}/tiny-demo",
    f"data.train_files=[{DEMO_TRAIN}]",
]


@pytest.fixture(scope="module")
def shapes():
    return {name: model_shape(load_hf_config(os.path.join(MODELS, name))) for name in SHIPPED}


@pytest.mark.parametrize("name", SHIPPED)
def test_parameter_counts_by_hand_and_known(name, shapes):
    """The meta-device count and the planner's analytic count both equal the count worked by hand."""
    formula, count = BY_HAND[name]
    assert formula == count
    assert shapes[name].num_params == count
    assert analytic_param_count(load_hf_config(os.path.join(MODELS, name))) == count
    if name in KNOWN:
        assert count == KNOWN[name]


def test_command_r_shape(shapes):
    """Worked by hand: embedding 256000·8192 = 2,097,152,000 (tied, the largest module); per layer
    4·8192² + 3·8192·22528 + 8192 = 822,091,776; 40 layers + final norm + embedding = 34,980,831,232."""
    s = shapes["command-r-35b"]
    assert s.tied_embeddings and s.parallel_block and s.logit_scale
    assert s.largest_layer_params == 256_000 * 8192 == 2_097_152_000
    assert (
        s.num_params == 40 * (4 * 8192**2 + 3 * 8192 * 22528 + 8192) + 8192 + 2_097_152_000 == 34_980_831_232
    )
    assert 30e9 < shapes["llama-34b"].num_params < 35e9 and not shapes["llama-34b"].tied_embeddings


def test_plan_rows_by_hand(shapes):
    """Llama-7B on 8 GPUs, bf16: shard x = 6,738,415,616 / 8 = 842,301,952 parameters; bytes per rank:
    parameters 2x, gradients 2x, master 4x, Adam 8x; step transient 4·min(x, 1e9) = 4x; gathered layer
    2·2·131,072,000 (the 32000×4096 embedding); buckets 2·(4096² + int(0.9·4096²))."""
    s = shapes["llama-7b"]
    plan = plan_memory(s, Hardware(1, 8, 80), Settings(4096))
    rows = {r.name: r.bytes for r in plan.rows}
    x = 842_301_952
    assert rows["parameters (bf16 shard)"] == 2 * x
    assert rows["gradients (shard)"] == 2 * x
    assert rows["fp32 master weights (shard)"] == 4 * x
    assert rows["Adam moments m, v (fp32 shard)"] == 8 * x
    assert rows["optimizer step: fp32 gradient of one sub-group"] == 4 * x
    assert rows["largest layer gathered (parameters + gradient)"] == 4 * 131_072_000
    assert rows["ZeRO-3 reduce + prefetch buckets"] == 2 * (4096**2 + int(0.9 * 4096**2))
    assert plan.model_states_bytes == 16 * x + 2 * (4096**2 + int(0.9 * 4096**2)) + 4 * x
    # Activations per token and layer: 2 norms × (4 + 2·2)·4096 + (3·4096 + 2·4096 + 4·11008)·2 bytes.
    assert activation_bytes_per_token_layer(s, 2) == 2 * 8 * 4096 + (5 * 4096 + 4 * 11008) * 2 == 194_560
    logits = 2 * 4096 * 32000 * 2 + 1024 * 32000 * 4
    assert rows["logits + gradient + token-stats chunk"] == logits
    assert plan.peak_phase == "backward"
    persistent = 16 * x + rows["ZeRO-3 reduce + prefetch buckets"] + rows["reference model (shard)"]
    # stage3_max_live_parameters = 1e9 (DeepSpeed's default): up to 1e9 parameters stay gathered.
    assert rows["parameters kept gathered beyond it"] == 2 * (1_000_000_000 - 131_072_000)
    activations = rows[next(k for k in rows if k.startswith("activations"))]
    expected_peak = persistent + 4 * 131_072_000 + 2 * (1_000_000_000 - 131_072_000) + activations + logits
    assert plan.peak_bytes == expected_peak
    assert plan.required_bytes == int(expected_peak * 1.10 + 3 * GIB)


@pytest.mark.parametrize("name", ["llama-7b", "command-r-35b", "llama-70b"])
@pytest.mark.parametrize("gpus", [8, 16, 32])
@pytest.mark.parametrize("offload", [False, True])
def test_model_states_agree_with_deepspeed(name, gpus, offload, shapes):
    """DeepSpeed's estimate_zero3_model_states_mem_needs (18 bytes/parameter/rank + 4 × largest layer
    without offload; 2 + 4 × largest layer with optimizer offload) against the planner's model states
    (16 bytes + buckets + the larger of the gathered layer and the step's fp32 gradient): within 10%."""
    shape = shapes[name]
    hardware = Hardware(gpus // 8, 8, 80)
    plan = plan_memory(shape, hardware, Settings(4096, offload_optimizer=offload))
    ds_gpu, _ = deepspeed_model_states(shape, hardware, offload_optimizer=offload, offload_param=False)
    assert abs(plan.model_states_bytes / ds_gpu - 1) < 0.10, (plan.model_states_bytes / GIB, ds_gpu / GIB)


def test_offload_moves_optimizer_state_to_host(shapes):
    shape = shapes["command-r-35b"]
    on = plan_memory(shape, Hardware(2, 8, 80), Settings(8192, offload_optimizer=True))
    off = plan_memory(shape, Hardware(2, 8, 80), Settings(8192))
    x = 34_980_831_232 // 16  # parameters per rank, by hand (test_command_r_shape); 16 ranks divide it
    assert x * 16 == 34_980_831_232 and x == 2_186_301_952
    # GPU keeps the bf16 parameter shard; host gets the bf16 gradients (2 bytes per parameter), the fp32
    # master (4) and Adam's fp32 m and v (8), and the fp32 gradient partition CPU Adam steps on (4).
    assert off.peak_bytes - on.peak_bytes == (2 + 4 + 8) * x
    assert on.host_bytes_per_node == 8 * (2 + 4 + 8 + 4) * x


def test_recommendation_for_35b_on_16_gpus(shapes):
    """Without checkpointing 8192 tokens of activations do not fit; the least intrusive fix keeps the
    micro-batch and turns checkpointing on (no offload needed)."""
    shape = shapes["command-r-35b"]
    settings = Settings(8192, reference="cached")
    plan = plan_memory(shape, Hardware(2, 8, 80), settings)
    assert not plan.fits
    advice = recommend(shape, Hardware(2, 8, 80), settings, min_tokens=8192)
    assert advice == {
        **advice,
        "offload_optimizer": False,
        "offload_param": False,
        "micro_batch_tokens": 8192,
        "grad_checkpointing": True,
    }
    fitting = Settings(8192, reference="cached", grad_checkpointing=True)
    assert plan_memory(shape, Hardware(2, 8, 80), fitting).fits
    # 16384 tokens add 10.5 GiB of checkpointed activations and 12.7 GiB of logits: over 80 GiB at 16 ranks.
    assert largest_micro_batch(shape, Hardware(2, 8, 80), fitting) == 8192
    assert largest_micro_batch(shape, Hardware(2, 8, 80), Settings(8192, reference="cached")) == 0


def test_plan_cli_json(capsys):
    from hdpo_ds.tools.plan import main

    code = main(
        [
            "--model",
            f"{MODELS}/llama-70b",
            "--nodes",
            "4",
            "--gpus-per-node",
            "8",
            "--gpu-mem-gib",
            "80",
            "--micro-batch-tokens",
            "8192",
            "--ds",
            f"{ROOT}/ds_configs/zero3_35b_offload.json",
            "--reference",
            "cached",
            "--grad-checkpointing",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["num_params"] == KNOWN["llama-70b"]
    assert out["settings"]["offload_optimizer"] is True and out["settings"]["grad_checkpointing"] is True
    assert out["hardware"]["world_size"] == 32
    assert out["deepspeed_estimate"]["gpu_bytes_per_gpu"] > 0
    assert any("MFU" in a for a in out["assumptions"])
    # By hand. Llama-70B (H 8192, L 80, 8 kv heads of 128, I 28672, V 32000) on 32 GPUs: x = 68,976,648,192
    # / 32 parameters per rank. On the GPU: the bf16 shard 2x; the buckets 2·(H² + int(0.9·H²)) bytes; during
    # the backward the largest module (the 32000×8192 embedding) gathered with its gradient, 2·2·262,144,000,
    # and 2·(1e9 - 262,144,000) more kept gathered (stage3_max_live_parameters 1e9).
    x = 68_976_648_192 // 32
    assert x * 32 == 68_976_648_192
    persistent = 2 * x + 2 * (8192**2 + int(0.9 * 8192**2))
    gathered = 2 * 2 * 262_144_000 + 2 * (1_000_000_000 - 262_144_000)
    # Checkpointed activations per token: each layer's bf16 input (L·H·2) + two layers' worth (recomputed
    # layer and its gradient) of 2 norms·(4 + 2·2)·H + (3·H + 2·1024 + 4·I)·2, + the final norm (4 + 2·2)·H.
    per_layer = 2 * (4 + 2 * 2) * 8192 + (3 * 8192 + 2 * 1024 + 4 * 28672) * 2
    assert per_layer == 413_696
    activations = 8192 * (80 * 8192 * 2 + 2 * per_layer + (4 + 2 * 2) * 8192)
    # logits and their gradient in bf16 (T·V·2 each) + token_stats' fp32 chunk of 1024×V
    logits = 2 * 8192 * 32000 * 2 + 1024 * 32000 * 4
    peak = persistent + gathered + activations + logits  # the cached reference holds no model
    assert out["peak_bytes"] == peak == 26_322_274_610 and out["peak_phase"] == "backward"
    required = int(peak * 1.10 + 3 * GIB)  # +10% fragmentation, 3 GiB runtime reserve (assumptions)
    assert out["required_bytes"] == required and out["headroom_bytes"] == 80 * GIB - required > 0
    assert out["fits"] is True
    # host, per node of 8 GPUs: bf16 gradients 2x, fp32 master 4x, Adam m and v 8x, CPU Adam's fp32 grad 4x
    assert out["host_bytes_per_node"] == 8 * (2 + 4 + 8 + 4) * x

    # Doubling the micro-batch: at T tokens the peak grows by T·(activations per token + 2·V·2) bytes.
    # 16384 tokens fit (49.5 GiB required), 32768 do not (88.7 GiB).
    def required_at(t):
        grown = peak + (t - 8192) * (activations // 8192 + 2 * 32000 * 2)
        return int(grown * 1.10 + 3 * GIB)

    assert required_at(16384) <= 80 * GIB < required_at(32768)
    assert out["largest_micro_batch_tokens"] == 16384


def test_plan_cli_json_is_all_of_stdout_in_a_fresh_process():
    """`python -m hdpo_ds.tools.plan --json | jq` works: DeepSpeed's import-time log lines (the accelerator
    warning) go to stderr, not into the JSON."""
    cmd = [sys.executable, "-m", "hdpo_ds.tools.plan", "--model", f"{MODELS}/llama-7b", "--nodes", "1"]
    cmd += ["--gpus-per-node", "8", "--gpu-mem-gib", "80", "--micro-batch-tokens", "8192", "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["deepspeed_estimate"]["gpu_bytes_per_gpu"] > 0


def test_plan_cli_unknown_model(capsys, tmp_path):
    from hdpo_ds.tools.plan import main

    assert (
        main(
            [
                "--model",
                str(tmp_path / "nope"),
                "--nodes",
                "1",
                "--gpus-per-node",
                "8",
                "--gpu-mem-gib",
                "80",
                "--micro-batch-tokens",
                "4096",
            ]
        )
        == 2
    )
    assert "--model" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- dry run


def _train_main():
    spec = importlib.util.spec_from_file_location("launch_train", os.path.join(ROOT, "launch/train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def dry_run(capsys, *args: str) -> tuple[int, str, str]:
    with restored_environ():  # an in-process run of the entry point (tests/conftest.py)
        code = _train_main()(["--dry-run", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def demo_args(*extra: str, world_size: int = 2) -> list[str]:
    return [
        "--world-size",
        str(world_size),
        "--ds",
        f"{ROOT}/ds_configs/zero3.json",
        "--config",
        f"{ROOT}/configs/demo.yaml",
        f"data.train_files=[{DEMO_TRAIN}]",
        f"data.eval_files=[{ROOT}/configs/data/demo/eval.jsonl]",
        f"model.name_or_path={MODELS}/tiny-demo",
        *extra,
    ]


def test_dry_run_plans_lora_with_the_adapters_off_reference(capsys, monkeypatch):
    """Under model.lora the dry run counts peft's wrap (the trainable count a real wrap gives), plans the
    adapters-off reference (no reference shard), and needs less memory than full fine-tuning."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from hdpo_ds.config import load_config
    from hdpo_ds.runtime.lora import _peft_config
    from hdpo_ds.tools.dryrun import dry_run as run_dry

    monkeypatch.chdir(ROOT)
    lora = ["model.lora.r=8", "model.lora.alpha=16", "model.lora.target_modules=[q_proj,v_proj]"]
    code, out, err = dry_run(capsys, *demo_args(*lora))
    assert code == 0, err
    with torch.device("meta"):
        wrapped = get_peft_model(
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(f"{MODELS}/tiny-demo")),
            _peft_config(
                load_config(None, ["model.name_or_path=m", "data.train_files=[t]", *lora]).model.lora
            ),
        )
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert trainable == 4 * 8 * ((128 + 128) + (128 + 64))  # 4 layers: q (128 -> 128), v (128 -> 64)
    assert f"model.lora: r=8 on 8 layers, {trainable:,} trainable parameters" in out
    assert "the policy's own engine with its LoRA adapters disabled" in out
    args = demo_args(*lora)
    cfg = load_config(args[args.index("--config") + 1], args[args.index("--config") + 2 :])
    plan = run_dry(cfg, f"{ROOT}/ds_configs/zero3.json", world_size=2).plan
    plain = demo_args()
    full = run_dry(load_config(plain[5], plain[6:]), f"{ROOT}/ds_configs/zero3.json", world_size=2).plan
    assert plan.settings.reference == "adapters_off" and plan.settings.lora.trainable_params == trainable
    assert not [r for r in plan.rows if r.name.startswith("reference") and r.where == "gpu" and r.bytes]
    assert plan.peak_bytes < full.peak_bytes


def test_dry_run_demo_passes(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, err = dry_run(capsys, *demo_args())
    assert code == 0, err
    assert "every check passed" in out and "853,120 parameters" in out
    assert "64 pairs per step over 2 ranks" in out and "verdict: FITS" in out


def test_dry_run_35b_passes_at_16_and_fails_without_checkpointing(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = BIG_35B_16
    code, out, err = dry_run(capsys, *args, *BIG_PATHS)
    assert code == 0, err
    assert "34,980,831,232 parameters" in out and "16 ranks" in out and "verdict: FITS" in out
    code, out, err = dry_run(capsys, *args, *BIG_PATHS, "model.gradient_checkpointing=false")
    assert code == 2
    assert "model.gradient_checkpointing=true" in err and "DOES NOT FIT" in err


def test_dry_run_35b_refuses_a_config_without_weights(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, _, err = dry_run(
        capsys,
        "--world-size",
        "32",
        "--ds",
        "ds_configs/zero3_35b.json",
        "--config",
        "configs/command-r-35b.yaml",
        f"data.train_files=[{DEMO_TRAIN}]",
        f"model.tokenizer={MODELS}/tiny-demo",
    )
    assert code == 2 and "model.name_or_path" in err and "no weight files" in err


def test_dry_run_batch_not_divisible(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    code, _, err = dry_run(capsys, *demo_args("train.pairs_per_step=60", world_size=16))
    assert code == 2
    assert "train.pairs_per_step: 60 is not divisible by the world size 16" in err
    # DeepSpeed's own batch keys, set by hand, must agree with one micro-batch per rank and step.
    with open(f"{ROOT}/ds_configs/zero3.json") as f:
        ds = json.load(f)
    ds.update(train_batch_size=64, train_micro_batch_size_per_gpu=4)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    args = demo_args(world_size=16)
    args[args.index("--ds") + 1] = str(tmp_path / "ds.json")
    code, _, err = dry_run(capsys, *args)
    assert code == 2 and "ds_config.train_micro_batch_size_per_gpu" in err


def test_dry_run_missing_data_file(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    missing = tmp_path / "nope.jsonl"
    code, _, err = dry_run(capsys, *demo_args(f"data.train_files=[{missing}]"))
    assert code == 2
    assert "data.train_files" in err and str(missing) in err


def test_dry_run_unknown_model_config(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "no-such-architecture", "hidden_size": 8})
    )
    code, _, err = dry_run(capsys, *demo_args(f"model.name_or_path={tmp_path}"))
    assert code == 2 and "model.name_or_path" in err and "no-such-architecture" in err
    code, _, err = dry_run(capsys, *demo_args(f"model.name_or_path={tmp_path / 'absent'}"))
    assert code == 2 and "model.name_or_path" in err


def _write_cache(cfg, cache_root: str, *, stale: bool) -> None:
    """A complete cache for the demo train split, by the real fingerprint (or one entry off)."""
    import torch

    from hdpo_ds.data import tokenize_pairs, tokenizer_fingerprint
    from hdpo_ds.recipes.splits import load_split_records, tokenize_options
    from hdpo_ds.reference.cache import write_manifest, write_shard
    from hdpo_ds.reference.sources import reference_fingerprint, versions_of_interest
    from hdpo_ds.runtime.engine import load_ds_config
    from hdpo_ds.runtime.models import load_tokenizer

    records = load_split_records(cfg)["train"]
    tokenizer = load_tokenizer(cfg.model)
    ids = tokenize_pairs(records, tokenizer, **{**tokenize_options(cfg), "cache_dir": None}).pairs.ids
    dtype = resolve_dtype(cfg, load_ds_config(f"{ROOT}/ds_configs/zero3.json"), bf16_capable=True)
    assert dtype == torch.bfloat16
    fingerprint = reference_fingerprint(
        cfg,
        data_fingerprint=records.fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer, None),
        dtype=dtype,
    )
    if stale:
        fingerprint = {**fingerprint, "data.max_length": cfg.data.max_length + 1}
    where = os.path.join(cache_root, "train")
    os.makedirs(where)
    n = len(ids)
    sha = write_shard(
        where,
        0,
        {
            "id": ids,
            "ref_chosen_logps": [-1.0] * n,
            "ref_rejected_logps": [-2.0] * n,
            "chosen_tokens": [1] * n,
            "rejected_tokens": [1] * n,
        },
        fingerprint,
    )
    write_manifest(
        where,
        fingerprint,
        versions_of_interest(),
        [{"file": "shard-00000.arrow", "sha256": sha, "rows": n}],
        n,
    )


@pytest.mark.parametrize("stale", [False, True])
def test_dry_run_reference_cache_fingerprint(capsys, monkeypatch, tmp_path, stale):
    monkeypatch.chdir(ROOT)
    cache = str(tmp_path / "refcache")
    extra = ["data.eval_files=[]", "reference.mode=cached", f"reference.cache_path={cache}"]
    args = demo_args(*extra)
    cfg = load_config(f"{ROOT}/configs/demo.yaml", args[6:])
    _write_cache(cfg, cache, stale=stale)
    code, out, err = dry_run(capsys, *args)
    if stale:
        assert code == 2
        assert "reference.cache_path" in err and "stale" in err and "data.max_length" in err
    else:
        assert code == 0, err
        assert "matches this run and covers every pair" in out


def test_dry_run_validates_and_tokenizes_a_sample_only(capsys, monkeypatch, tmp_path):
    """5,000 rows: every row is read, DRY_RUN_SAMPLE (2,000) evenly spaced ones are validated and
    tokenized; a bad row outside the sample passes, one inside names its source, index and field."""
    import hdpo_ds.tools.dryrun as dryrun_module
    from tests.run_helpers import records

    monkeypatch.chdir(ROOT)
    rows = records(5000, seed=3)
    rows[1] = {
        "prompt": "x",
        "chosen": "y",
    }  # not sampled: the positions are round(i * 4999 / 1999) = 0, 3, 5, ...
    train = tmp_path / "big.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    real = dryrun_module.tokenize_pairs
    monkeypatch.setattr(
        dryrun_module,
        "tokenize_pairs",
        lambda recs, *a, **k: seen.append(len(recs.records)) or real(recs, *a, **k),
    )
    code, out, err = dry_run(capsys, *demo_args(f"data.train_files=[{train}]", "data.eval_files=[]"))
    assert code == 0, err
    assert seen == [2000]
    assert "5,000 rows read; 2,000 of them (evenly spaced) validated and tokenized: 2,000 pairs" in out
    assert "about 5,000 pairs in all" in out and "78 steps per epoch" in out  # 5,000 // 64

    rows[2501] = {"prompt": "x", "chosen": "y"}  # row 2501 = round(1000 * 4999 / 1999) is sampled
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = dry_run(capsys, *demo_args(f"data.train_files=[{train}]", "data.eval_files=[]"))
    assert code == 2 and "big.jsonl: record 2501: field 'rejected': missing field" in err


def test_dry_run_exit_code_from_the_command_line(tmp_path):
    """The real entry point, as a user runs it: exit code 2 and the key on stderr."""
    proc = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            *["--dry-run", *demo_args(f"data.train_files=[{tmp_path}/x.jsonl]")],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "data.train_files" in proc.stderr


# ------------------------------------------------------------------------------------ slow benchmark


@pytest.mark.slow
def test_planner_predicts_rss_of_a_2_rank_run():
    """bench/plan_rss.py: a ~61M-parameter Llama, 2 ZeRO-3 ranks on CPU, 3 steps; the planner's peak
    per rank within 25% of each rank's measured peak-RSS growth above its post-import baseline."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import plan_rss

    result = plan_rss.run(steps=3, hidden=640, layers=8, vocab=32000)
    assert result["prediction"]["params"] >= 50_000_000
    for ratio in result["ratio"]:
        assert 0.75 <= ratio <= 1.25, result


def test_dry_run_checks_the_attention_implementation(capsys, monkeypatch, tmp_path):
    """The run's attention rule (hdpo_ds.runtime.attention.check_attention) in the dry run: a Gemma-2 config
    asks for logit softcapping, which sdpa_packed does not apply; auto picks eager_packed, which does."""
    from transformers import Gemma2Config

    monkeypatch.chdir(ROOT)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=8)
    Gemma2Config(vocab_size=512, num_key_value_heads=2, attn_logit_softcapping=50.0, **shape).save_pretrained(
        tmp_path
    )
    model = [
        f"model.name_or_path={tmp_path}",
        "model.from_scratch=true",
        f"model.tokenizer={MODELS}/tiny-demo",
    ]
    code, _, err = dry_run(capsys, *demo_args(*model, "model.attn_implementation=sdpa_packed"))
    assert code == 2, err
    assert "model.attn_implementation: sdpa_packed does not apply attn_logit_softcapping=50.0" in err
    code, out, err = dry_run(capsys, *demo_args(*model))
    assert code == 0, err
    assert f"model.attn_implementation: eager_packed for {tmp_path} (applies" in out


def test_fused_head_replaces_the_logits_row(shapes):
    """train.fused_head: the logits, their gradient and token_stats' chunk (2·T·V·2 + chunk·V·4 at bf16)
    give way to the fused head's backward chunk, chunk·V·(4 + 2); no other row changes, and the
    (backward) peak drops by the difference."""
    s = shapes["llama-7b"]
    plain = plan_memory(s, Hardware(1, 8, 80), Settings(4096))
    fused = plan_memory(s, Hardware(1, 8, 80), Settings(4096, fused_head=True))
    rows_plain = {r.name: r.bytes for r in plain.rows}
    rows_fused = {r.name: r.bytes for r in fused.rows}
    logits = rows_plain.pop("logits + gradient + token-stats chunk")
    chunk = rows_fused.pop("logits: the fused head's chunk only")
    assert logits == 2 * 4096 * 32000 * 2 + 1024 * 32000 * 4 and chunk == 1024 * 32000 * 6
    assert rows_plain == rows_fused
    assert fused.peak_phase == plain.peak_phase == "backward"
    assert plain.peak_bytes - fused.peak_bytes == logits - chunk


def test_mixture_of_experts_counts_active_parameters():
    """Qwen3-30B-A3B's shape (configs/models/qwen3-moe-30b-a3b): 128 experts of 3·2048·768 parameters per
    layer, 48 layers, top-8. Active = total - 48·128·3·2048·768·(120/128); the largest layer ZeRO-3
    gathers is one layer's stacked experts; FLOPs count the active parameters only."""
    from hdpo_ds.tools.plan import micro_batch_flops

    moe = model_shape(load_hf_config(os.path.join(ROOT, "configs/models/qwen3-moe-30b-a3b")))
    per_layer = 128 * 3 * 2048 * 768
    assert moe.num_params == 30_532_122_624 and (moe.num_experts, moe.experts_per_token) == (128, 8)
    assert moe.active_params == moe.num_params - 48 * per_layer * 120 // 128 == 3_353_032_704
    assert moe.largest_layer_params == per_layer
    settings = Settings(4096, reference="cached")
    dense = dataclasses.replace(moe, active_params=moe.num_params, num_experts=0, experts_per_token=0)
    attention = micro_batch_flops(dataclasses.replace(moe, active_params=moe.embedding_params), settings)
    ratio = (micro_batch_flops(moe, settings) - attention) / (micro_batch_flops(dense, settings) - attention)
    assert ratio == pytest.approx(
        (moe.active_params - moe.embedding_params) / (moe.num_params - moe.embedding_params)
    )
    tiny = model_shape(load_hf_config(os.path.join(ROOT, "configs/models/tiny-moe")))
    assert (tiny.num_experts, tiny.experts_per_token) == (4, 2)
    assert tiny.num_params - tiny.active_params == 2 * 4 * 3 * 64 * 128 // 2


def test_lora_counts_and_rows_by_hand(shapes):
    """model.lora r=16 all-linear on Llama-7B: per layer q, k, v, o 4·16·(4096 + 4096), gate and up
    2·16·(4096 + 11008), down 16·(11008 + 4096): 1,249,280; 32 layers: 39,976,960 (peft on the meta
    model). On 8 ranks the frozen base keeps its bf16 shard 2x only; the trainable shard xt carries
    parameters 2, gradient 2, master 4 and Adam 8 bytes; the adapters-off reference holds no shard."""
    from hdpo_ds.tools.plan import lora_shape

    per_layer = 4 * 16 * (4096 + 4096) + 2 * 16 * (4096 + 11008) + 16 * (11008 + 4096)
    assert per_layer == 1_249_280
    lora = lora_shape(load_hf_config(os.path.join(MODELS, "llama-7b")), 16)
    assert (lora.adapter_params, lora.saved_params, lora.adapted_layers) == (32 * per_layer, 0, 7 * 32)
    s = shapes["llama-7b"]
    full = plan_memory(s, Hardware(1, 8, 80), Settings(4096))
    plan = plan_memory(s, Hardware(1, 8, 80), Settings(4096, reference="adapters_off", lora=lora))
    rows = {r.name: r.bytes for r in plan.rows}
    x, xt = 842_301_952, 32 * per_layer // 8
    assert rows["frozen base parameters (bf16 shard)"] == 2 * x
    assert rows["LoRA adapters + modules_to_save (shard)"] == 2 * xt
    assert rows["gradients (shard)"] == 2 * xt and rows["fp32 master weights (shard)"] == 4 * xt
    assert rows["Adam moments m, v (fp32 shard)"] == 8 * xt
    assert rows["reference model (shard)"] == 0
    # the frozen embedding (the largest module) is gathered without a gradient
    assert rows["largest layer gathered (parameters + gradient)"] == 2 * 131_072_000
    buckets = 2 * (4096**2 + int(0.9 * 4096**2))
    assert plan.model_states_bytes == 2 * x + 16 * xt + buckets + 2 * 131_072_000
    # full fine-tuning: 16x + buckets + the step's fp32 gradient 4x (larger than the gathered 4·131,072,000)
    assert full.model_states_bytes == 16 * x + buckets + 4 * x
    assert full.model_states_bytes - plan.model_states_bytes == 18 * x - 16 * xt - 2 * 131_072_000


def test_sequence_parallel_rows_and_flops_by_hand(shapes):
    """Sequence parallel S at T tokens per rank: the rows of S = 1 at T, plus Ulysses' copies per local
    token and layer (2·q + 2·max(kv, S)·d)·b, kept for every layer without checkpointing; attention FLOPs
    over sequences of up to S·T tokens (2·layers·T·min(seq, S·T)·q per forward)."""
    from hdpo_ds.tools.plan import micro_batch_flops, ulysses_bytes_per_token_layer

    shape = shapes["llama-7b"]  # 32 heads of 128, no GQA, 32 layers
    hardware = Hardware(1, 8, 80.0)
    one = Settings(4096, reference="cached", seq_tokens=8192)
    two = dataclasses.replace(one, sequence_parallel=2)
    per = ulysses_bytes_per_token_layer(shape, 2, 2)
    assert per == (2 * 4096 + 2 * 32 * 128) * 2 and ulysses_bytes_per_token_layer(shape, 2, 1) == 0
    plain, split = plan_memory(shape, hardware, one), plan_memory(shape, hardware, two)
    assert split.peak_bytes - plain.peak_bytes == per * 4096 * (32 + 1)
    ulysses = [r for r in split.rows if "Ulysses" in r.name]
    assert len(ulysses) == 1 and ulysses[0].bytes == per * 4096 * 33 and ulysses[0].where == "-"
    attention = lambda seq: 6 * 32 * 4096 * seq * 4096  # noqa: E731  3 x the forward 2·layers·T·seq·q
    assert micro_batch_flops(shape, two) - micro_batch_flops(shape, one) == attention(8192) - attention(4096)


def test_dry_run_35b_plans_128k_pairs_with_sequence_parallel(capsys, monkeypatch):
    """128k-token pairs on 16 ranks: refused without sequence parallelism (a pair cannot fit 16k tokens),
    planned and fitting with train.sequence_parallel=8 (2 groups); eager attention is refused by key, and
    so is model.moe_leaf_modules for the dense 35B."""
    monkeypatch.chdir(ROOT)
    args = BIG_35B_16
    long = [
        *BIG_PATHS,
        "data.max_length=65536",
        "data.max_tokens_per_micro_batch=16384",
        "train.fused_head=true",
    ]
    code, out, err = dry_run(capsys, *args, *long, "train.sequence_parallel=8")
    assert code == 0, err
    assert "train.sequence_parallel: 2 group(s) of 8 ranks, each sharing rows of up to 131,072 tokens" in out
    assert "rows of 131,072 tokens" in out and "verdict: FITS" in out
    code, _, err = dry_run(capsys, *args, *long)
    assert code == 2 and "data.max_tokens_per_micro_batch" in err
    code, _, err = dry_run(
        capsys, *args, *long, "train.sequence_parallel=8", "model.attn_implementation=eager"
    )
    assert code == 2 and "model.attn_implementation: eager cannot run under train.sequence_parallel" in err
    code, _, err = dry_run(capsys, *args, *BIG_PATHS, "model.moe_leaf_modules=true")
    assert code == 2 and "model.moe_leaf_modules: true, but" in err
