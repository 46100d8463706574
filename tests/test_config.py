"""Config loading and validation, the ds_config filling, and the learning-rate schedule."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hdpo_ds.config import ConfigError, flatten, load_config, to_dict
from hdpo_ds.recipes.session import lr_multiplier
from hdpo_ds.runtime.engine import fill_ds_config, load_ds_config

BASE = ["model.name_or_path=configs/models/tiny-demo", "data.train_files=[a.jsonl]"]


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "loss:\n  type: hdpo\n  alpha: 0.8\ntrain:\n  max_steps: 7\ndata:\n  train_files: x.jsonl\n"
    )
    cfg = load_config(path, ["model.name_or_path=m", "loss.alpha=0.95", "optim.betas=[0.8, 0.9]"])
    assert cfg.loss.alpha == 0.95  # the override wins over the file
    assert cfg.train.max_steps == 7
    assert cfg.data.train_files == ["x.jsonl"]  # a single file becomes a list
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.loss.beta == 0.1  # a default
    assert flatten(to_dict(cfg))["loss.alpha"] == 0.95


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("loss.alpah=0.9", "loss.alpah: unknown key"),
        ("bogus=1", "bogus: unknown key"),
        ("loss.alpha=high", "loss.alpha: expected a number"),
        ("train.max_steps=1.5", "train.max_steps: expected an integer"),
        ("data.packing=maybe", "data.packing: expected true or false"),
        ("loss.type=kto", "loss.type: unknown loss_type 'kto'"),
        ("loss.beta=0", "loss.beta: must be > 0"),
        ("loss.alpha=-1", "loss.alpha: must be > 0"),
        ("loss.f_alpha=1.5", "loss.f_alpha"),
        ("loss.label_smoothing=0.6", "loss.label_smoothing"),
        ("data.truncation=middle", "data.truncation: 'middle' is not one of"),
        ("reference.mode=cached", "reference.cache_path: required with reference.mode=cached"),
        (
            "data.max_tokens_per_micro_batch=100",
            "data.max_tokens_per_micro_batch: must be >= 2 * data.max_length",
        ),
        ("data.max_prompt_length=5000", "data.max_prompt_length: must be < data.max_length"),
        ("optim.warmup_steps=1000", "optim.warmup_steps"),
        ("model=3", "model: expected a mapping"),
        ("loss.alpha", "expected dotted.key=value"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace("*", r"\*")):
        load_config(None, [*BASE, override])


def test_required_keys():
    with pytest.raises(ConfigError, match="model.name_or_path: required"):
        load_config(None, ["data.train_files=[a.jsonl]"])
    with pytest.raises(ConfigError, match="data.train_files: required"):
        load_config(None, ["model.name_or_path=m"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="--config: no such file"):
        load_config("/nonexistent/run.yaml")


def _cfg(*overrides):
    return load_config(None, [*BASE, *overrides])


def test_fill_ds_config_fills_every_auto_key():
    ds = load_ds_config("ds_configs/zero3.json")
    cfg = _cfg("optim.lr=3e-4", "optim.max_grad_norm=0.5", "train.pairs_per_step=8")
    filled = fill_ds_config(ds, cfg, world_size=4, device_type="cpu", hidden_size=64)
    assert filled["train_micro_batch_size_per_gpu"] == 1
    assert filled["gradient_accumulation_steps"] == 1
    assert filled["train_batch_size"] == 4  # micro-batch 1 x accumulation 1 x world 4
    assert filled["optimizer"]["params"]["lr"] == 3e-4
    assert filled["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert filled["optimizer"]["params"]["torch_adam"] is True  # CPU: no compiled fused Adam
    assert filled["gradient_clipping"] == 0.5
    assert filled["bf16"]["enabled"] is False and filled["fp16"]["enabled"] is False  # float32 on CPU
    zero = filled["zero_optimization"]
    assert zero["reduce_bucket_size"] == 64 * 64
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert zero["stage3_param_persistence_threshold"] == 640
    assert "auto" not in json.dumps(filled)
    assert ds["optimizer"]["params"]["lr"] == "auto"  # the input is not modified


def test_fill_ds_config_bf16_and_reference():
    ds = load_ds_config("ds_configs/zero3_infer.json")
    filled = fill_ds_config(
        ds,
        _cfg("model.dtype=bfloat16"),
        world_size=2,
        device_type="cuda",
        hidden_size=32,
        training=False,
        dtype=torch.bfloat16,
    )
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert "optimizer" not in filled and "gradient_clipping" not in filled


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(gradient_accumulation_steps=4), "ds_config.gradient_accumulation_steps"),
        (lambda d: d.update(scheduler={"type": "WarmupLR"}), "ds_config.scheduler"),
        (
            lambda d: d["zero_optimization"].update(sub_group_size="auto"),
            "ds_config.zero_optimization.sub_group_size",
        ),
        (lambda d: d["bf16"].update(enabled=True), "ds_config.bf16.enabled"),
    ],
)
def test_fill_ds_config_conflicts_name_the_key(mutate, message):
    ds = load_ds_config("ds_configs/zero3.json")
    mutate(ds)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        fill_ds_config(ds, _cfg("model.dtype=float32"), world_size=2, device_type="cpu", hidden_size=64)


def test_pairs_per_step_must_divide_by_world_size():
    ds = load_ds_config("ds_configs/zero3.json")
    with pytest.raises(ConfigError, match="train.pairs_per_step: 10 is not divisible by the world size 4"):
        fill_ds_config(ds, _cfg("train.pairs_per_step=10"), world_size=4, device_type="cpu", hidden_size=64)


def test_lr_multiplier_hand_worked():
    """warmup 2 of 10 steps: 1/2, 2/2; then cosine over the 8 remaining steps to min ratio 0.1:
    step 6 is halfway (progress 4/8): 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55."""
    kw = {"warmup_steps": 2, "max_steps": 10, "min_lr_ratio": 0.1}
    assert lr_multiplier(0, schedule="cosine", **kw) == 0.5
    assert lr_multiplier(1, schedule="cosine", **kw) == 1.0
    assert lr_multiplier(2, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_multiplier(6, schedule="cosine", **kw) == pytest.approx(0.55)
    assert lr_multiplier(10, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_multiplier(6, schedule="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(6, schedule="constant", **kw) == 1.0
    assert math.isclose(
        lr_multiplier(4, schedule="cosine", **kw), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))
    )


def test_reference_offload_is_filled_for_training_and_precompute_alike():
    ds = load_ds_config("ds_configs/zero3_infer.json")
    filled = fill_ds_config(
        ds,
        _cfg("reference.offload=true"),
        world_size=2,
        device_type="cpu",
        hidden_size=64,
        training=False,
        dtype=torch.float32,
    )
    assert filled["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}
    plain = fill_ds_config(
        ds, _cfg(), world_size=2, device_type="cpu", hidden_size=64, training=False, dtype=torch.float32
    )
    assert "offload_param" not in plain["zero_optimization"]


def test_reference_ds_config_takes_the_policy_dtype():
    """model.dtype auto with a bf16 policy config and an "auto" reference config: on CPU the reference's
    own resolution would be float32; the reference engine runs in the policy's dtype instead, and a
    reference config that says otherwise is refused naming its key."""
    from hdpo_ds.runtime.engine import resolve_dtype

    cfg = _cfg()
    dtype = resolve_dtype(cfg, load_ds_config("ds_configs/zero3_35b.json"))
    assert dtype == torch.bfloat16
    infer = load_ds_config("ds_configs/zero3_infer.json")
    assert (
        infer["bf16"]["enabled"] == "auto" and resolve_dtype(cfg, infer, bf16_capable=False) == torch.float32
    )
    ref = fill_ds_config(
        infer, cfg, world_size=2, device_type="cpu", hidden_size=64, training=False, dtype=dtype
    )
    assert ref["bf16"]["enabled"] is True and ref["fp16"]["enabled"] is False
    infer["bf16"]["enabled"] = False
    with pytest.raises(
        ConfigError, match=r"reference.ds_config: bf16.enabled=False conflicts with the policy's dtype"
    ):
        fill_ds_config(
            infer, cfg, world_size=2, device_type="cpu", hidden_size=64, training=False, dtype=dtype
        )
    with pytest.raises(ValueError, match="the policy's dtype"):
        fill_ds_config(infer, cfg, world_size=2, device_type="cpu", hidden_size=64, training=False)


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_torch_adamw_unless_the_ds_config_asks_for_deepspeeds_own(device_type):
    """FusedAdam JIT-compiles with nvcc on first use: torch's AdamW is filled in on CUDA as on CPU; an
    explicit torch_adam is kept, and an offloaded optimizer keeps DeepSpeed's CPU Adam."""
    cfg = _cfg()
    ds = load_ds_config("ds_configs/zero3.json")
    filled = fill_ds_config(ds, cfg, world_size=2, device_type=device_type, hidden_size=64)
    assert filled["optimizer"]["params"]["torch_adam"] is True
    ds["optimizer"]["params"]["torch_adam"] = False
    filled = fill_ds_config(ds, cfg, world_size=2, device_type=device_type, hidden_size=64)
    assert filled["optimizer"]["params"]["torch_adam"] is False
    offload_ds = load_ds_config("ds_configs/zero3_offload.json")
    offload = fill_ds_config(offload_ds, cfg, world_size=2, device_type=device_type, hidden_size=64)
    assert "torch_adam" not in offload["optimizer"]["params"]


# ---------------------------------------------------------------- the loss types and the keys each reads

# Which loss.* hyper-parameters each sequence-level type reads (beyond beta and nll_weight), written out
# here rather than read from the package, so that a wrong table there fails here.
LOSS_KEYS_READ = {
    "hdpo": {"alpha", "label_smoothing"},
    "ipo": set(),
    "hinge": set(),
    "fdpo_js": {"label_smoothing"},
    "fdpo_alpha": {"label_smoothing", "f_alpha"},
    "robust": {"alpha", "label_smoothing"},
    "exo_pair": {"label_smoothing"},
    "nca_pair": set(),
    "sppo_hard": set(),
    "apo_zero": set(),
    "apo_down": set(),
    "discopop": {"discopop_tau"},
    "sigmoid_norm": {"alpha", "label_smoothing"},
    "dpop": {"alpha", "dpop_lambda"},
}
NON_DEFAULT = {
    "alpha": 0.9,
    "label_smoothing": 0.1,
    "f_alpha": 0.3,
    "tdpo_alpha": 0.3,
    "discopop_tau": 0.1,
    "dpop_lambda": 5.0,
}


@pytest.mark.parametrize("loss_type", sorted(LOSS_KEYS_READ))
@pytest.mark.parametrize("key", sorted(NON_DEFAULT))
def test_each_loss_type_takes_the_keys_it_reads_and_refuses_the_others_by_name(loss_type, key):
    override = f"loss.{key}={NON_DEFAULT[key]}"
    if key in LOSS_KEYS_READ[loss_type]:
        cfg = _cfg(f"loss.type={loss_type}", override)
        assert getattr(cfg.loss, key) == NON_DEFAULT[key]
    else:
        with pytest.raises(ConfigError) as info:
            _cfg(f"loss.type={loss_type}", override)
        assert str(info.value).startswith(
            f"loss.{key}: {NON_DEFAULT[key]} has no effect with loss.type={loss_type}"
        ), str(info.value)


@pytest.mark.parametrize(
    ("loss_type", "reason"),
    [
        ("ipo", "IPO regresses the log-ratio margin"),
        ("fdpo_js", "an f-divergence does not split into entropy and cross-entropy"),
        ("exo_pair", "EXO matches the pair distribution of the plain log-ratio"),
        ("nca_pair", "NCA scores each response by its plain log-ratio"),
        ("sppo_hard", "SPPO regresses each log-ratio"),
        ("apo_zero", "APO anchors each plain log-ratio"),
        ("discopop", "DiscoPOP was discovered and tuned on the plain DPO margin"),
    ],
)
def test_alpha_where_it_has_no_meaning_is_refused_saying_why(loss_type, reason):
    with pytest.raises(ConfigError) as info:
        _cfg(f"loss.type={loss_type}", "loss.alpha=0.95")
    message = str(info.value)
    assert message.startswith(
        f"loss.alpha: 0.95 has no effect with loss.type={loss_type}: alpha is H-DPO's entropy weight, the "
        "factor on the policy's log-prob in the reward alpha*beta*lp - beta*ref that only dpop, hdpo, "
        "robust, sigmoid_norm build; "
    ), message
    assert reason in message and message.endswith("; leave it at 1.0")


@pytest.mark.parametrize("loss_type", ["hdpo", "robust", "sigmoid_norm"])
def test_adaptive_alpha_for_the_types_alpha_applies_to(loss_type):
    cfg = _cfg(f"loss.type={loss_type}", "loss.alpha=auto", "loss.target_entropy=2.5")
    assert cfg.loss.alpha == "auto"


@pytest.mark.parametrize("loss_type", ["nca_pair", "discopop", "ipo", "dpo"])
def test_adaptive_alpha_is_refused_where_alpha_does_not_apply(loss_type):
    with pytest.raises(
        ConfigError, match=r"^loss.alpha: auto steers H-DPO's alpha; it needs a loss.type where"
    ):
        _cfg(f"loss.type={loss_type}", "loss.alpha=auto", "loss.target_entropy=2.5")


def test_exo_pair_label_smoothing_defaults_to_exos_epsilon():
    """0, the key's general default, would make EXO's loss infinite: it reads as 1e-3 (and is saved so)."""
    cfg = _cfg("loss.type=exo_pair")
    assert cfg.loss.label_smoothing == 1e-3
    assert flatten(to_dict(cfg))["loss.label_smoothing"] == 1e-3
    assert _cfg("loss.type=exo_pair", "loss.label_smoothing=0.05").loss.label_smoothing == 0.05
    assert _cfg("loss.type=hdpo").loss.label_smoothing == 0.0  # the others keep 0
    with pytest.raises(ConfigError, match=r"^loss.label_smoothing: must lie in \[0, 0.5\)"):
        _cfg("loss.type=exo_pair", "loss.label_smoothing=0.5")


@pytest.mark.parametrize("value", ["-1.0", ".inf"])
def test_dpop_lambda_must_be_finite_and_not_negative(value):
    with pytest.raises(ConfigError, match=r"^loss.dpop_lambda: must be a finite number >= 0, got "):
        _cfg("loss.type=dpop", f"loss.dpop_lambda={value}")


@pytest.mark.parametrize("value", ["0", "-0.1"])
def test_discopop_tau_must_be_positive(value):
    with pytest.raises(ConfigError, match=rf"^loss.discopop_tau: must be > 0, got {value}"):
        _cfg("loss.type=discopop", f"loss.discopop_tau={value}")


def test_robust_flip_rate_must_stay_below_one_half():
    assert _cfg("loss.type=robust", "loss.label_smoothing=0.4").loss.label_smoothing == 0.4
    with pytest.raises(ConfigError, match=r"^loss.label_smoothing: must lie in \[0, 0.5\)"):
        _cfg("loss.type=robust", "loss.label_smoothing=0.5")
