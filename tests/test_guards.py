"""Guards that need no launcher: options refused where they would be ignored, resume refusals, the DeepSpeed
config's accumulation dtype, the process-group timeout, exit codes, weight hashing, dropout."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from hdpo_ds.config import Config, ConfigError, flatten, load_config, to_dict
from hdpo_ds.runtime import checkpoint
from hdpo_ds.runtime.engine import fill_ds_config, load_ds_config
from tests.data_helpers import tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["model.name_or_path=configs/models/tiny-demo", "data.train_files=[a.jsonl]"]


# ---------------------------------------------------------------- loss keys a loss type never reads


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.type=ipo", "loss.alpha=0.5"], "loss.alpha: 0.5 has no effect with loss.type=ipo"),
        (["loss.type=hinge", "loss.alpha=1.2"], "loss.alpha: 1.2 has no effect with loss.type=hinge"),
        (["loss.type=fdpo_js", "loss.alpha=0.9"], "loss.alpha: 0.9 has no effect with loss.type=fdpo_js"),
        (["loss.type=fdpo_js", "loss.f_alpha=0.3"], "loss.f_alpha: 0.3 has no effect with loss.type=fdpo_js"),
        (["loss.type=hdpo", "loss.f_alpha=0.3"], "loss.f_alpha: 0.3 has no effect with loss.type=hdpo"),
        (
            ["loss.type=tdpo1", "loss.tdpo_alpha=0.3"],
            "loss.tdpo_alpha: 0.3 has no effect with loss.type=tdpo1",
        ),
        (["loss.type=ipo", "loss.tdpo_alpha=0.3"], "loss.tdpo_alpha: 0.3 has no effect with loss.type=ipo"),
    ],
)
def test_a_loss_key_without_effect_is_refused_by_name(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [*BASE, *overrides])
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss.type=hdpo", "loss.alpha=0.5"],
        ["loss.type=fdpo_alpha", "loss.f_alpha=0.3"],
        ["loss.type=tdpo2", "loss.tdpo_alpha=0.3"],
        ["loss.type=ipo"],
    ],
)
def test_keys_that_apply_are_accepted(overrides):
    load_config(None, [*BASE, *overrides])


@pytest.mark.parametrize(("key", "value"), [("data.rows", "ten"), ("data.eval_rows", "a:b")])
def test_a_bad_row_slice_names_its_key(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}: invalid row slice"):
        load_config(None, [*BASE, f"{key}={value}"])


# ---------------------------------------------------------------- what a resume refuses


@pytest.mark.parametrize(
    "override",
    [
        "model.tokenizer=other/tokenizer",
        "model.dtype=bfloat16",
        "model.disable_dropout=false",
        "optim.lr=1e-4",
        "optim.betas=[0.8, 0.9]",
        "optim.eps=1e-6",
        "optim.weight_decay=0.1",
    ],
)
def test_resume_refuses_keys_that_change_the_math(override):
    saved = flatten(to_dict(load_config(None, BASE)))
    now = flatten(to_dict(load_config(None, [*BASE, override])))
    key = override.split("=")[0]
    assert [line.split(":")[0] for line in checkpoint.math_differences(saved, now)] == [key]


def test_a_key_added_after_the_checkpoint_compares_against_its_default():
    """A checkpoint written before loss.label_smoothing existed behaved as its default (0): resuming at
    the default is no change, resuming at another value is one."""
    defaults = flatten(to_dict(Config()))
    saved = flatten(to_dict(load_config(None, BASE)))
    del saved["loss.label_smoothing"]
    at_default = flatten(to_dict(load_config(None, BASE)))
    assert checkpoint.math_differences(saved, at_default, defaults=defaults) == []
    changed = flatten(to_dict(load_config(None, [*BASE, "loss.label_smoothing=0.1"])))
    assert checkpoint.math_differences(saved, changed, defaults=defaults) == [
        "loss.label_smoothing: 0.0 in the checkpoint, 0.1 now"
    ]
    # without the defaults (the old rule) the missing key itself counted as a change
    assert checkpoint.math_differences(saved, at_default) == [
        "loss.label_smoothing: None in the checkpoint, 0.0 now"
    ]


@pytest.mark.parametrize("override", ["optim.schedule=linear", "optim.warmup_steps=3", "train.max_steps=500"])
def test_schedule_keys_may_change_on_resume(override):
    saved = flatten(to_dict(load_config(None, BASE)))
    assert checkpoint.math_differences(saved, flatten(to_dict(load_config(None, [*BASE, override])))) == []


# ---------------------------------------------------------------- the DeepSpeed config


def _filled(dtype: str, **sections):
    cfg = load_config(None, [*BASE, f"model.dtype={dtype}"])
    ds = load_ds_config(os.path.join(ROOT, "ds_configs/zero3.json"))
    ds.update(sections)
    return fill_ds_config(ds, cfg, world_size=1, device_type="cpu", hidden_size=64)


def test_bf16_accumulates_gradients_in_fp32():
    assert _filled("bfloat16")["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in _filled("float32")


def test_an_explicit_accumulation_dtype_is_kept_and_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="hdpo_ds.runtime.engine"):
        ds = _filled("bfloat16", data_types={"grad_accum_dtype": "bf16"})
    assert ds["data_types"] == {"grad_accum_dtype": "bf16"}
    assert "grad_accum_dtype=bf16" in caplog.text


def test_the_process_group_timeout_is_the_config_key(monkeypatch):
    import datetime

    import deepspeed

    from hdpo_ds.runtime import engine

    seen = {}
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(engine, "_unlink_shm_allreduce_buffer", lambda: None)
    cfg = load_config(None, [*BASE, "train.dist_timeout_minutes=90"])
    engine.init_distributed(cfg.train.dist_timeout_minutes)
    assert seen["timeout"] == datetime.timedelta(minutes=90)
    assert load_config(None, BASE).train.dist_timeout_minutes == 60  # a 35B checkpoint's fsync fits
    with pytest.raises(ConfigError, match=r"^train.dist_timeout_minutes: must be > 0"):
        load_config(None, [*BASE, "train.dist_timeout_minutes=0"])


# ---------------------------------------------------------------- exit codes


def _entry(body):
    from hdpo_ds.cli import run_entry_point

    return run_entry_point("doc", "ds", body, ["--ds", "x.json", *BASE])


def test_input_errors_exit_2_and_bugs_surface_as_bugs(isolated_environ, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        isolated_environ.pop(name, None)

    def bad_input(cfg, ds, rank):
        raise ConfigError("train.max_steps: must be >= 1, got 0")

    def bug(cfg, ds, rank):
        raise ValueError("an internal invariant broke")

    def missing(cfg, ds, rank):
        raise FileNotFoundError("/internal/path")

    assert _entry(bad_input) == 2
    assert "train.max_steps: must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="internal invariant"):
        _entry(bug)
    with pytest.raises(FileNotFoundError):
        _entry(missing)


def test_a_missing_chat_template_file_names_the_key(tmp_path):
    from hdpo_ds.recipes.splits import load_split_records

    cfg = load_config(None, [*BASE, f"data.chat_template={tmp_path / 'chat.jinja'}"])
    with pytest.raises(ConfigError, match=r"^data.chat_template: no such file"):
        load_split_records(cfg)


# ---------------------------------------------------------------- weight files: what is loaded, hashed once


def _save_tiny(path, both_formats: bool = False):
    model = tiny_llama(64)
    model.save_pretrained(path)
    if both_formats:  # a hub snapshot with a pickled copy beside the safetensors one
        torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))
    return model


def test_only_the_weight_files_transformers_loads_are_hashed(tmp_path):
    from hdpo_ds.reference.sources import loaded_weight_files

    _save_tiny(tmp_path / "both", both_formats=True)
    assert [os.path.basename(f) for f in loaded_weight_files(str(tmp_path / "both"))] == ["model.safetensors"]
    from safetensors.torch import save_file

    sharded = tmp_path / "sharded"
    state = _save_tiny(sharded).state_dict()
    os.remove(sharded / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    for shard, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, sharded / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.save(state, sharded / "pytorch_model.bin")
    found = [os.path.basename(f) for f in loaded_weight_files(str(sharded))]
    assert found == ["model.safetensors.index.json", *sorted(shards)]


def test_each_weight_file_is_hashed_once_for_all_splits(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from hdpo_ds.recipes import precompute
    from hdpo_ds.reference import sources as reference

    _save_tiny(tmp_path / "model", both_formats=True)
    hashed = []
    original = reference.file_sha256
    monkeypatch.setattr(
        reference, "file_sha256", lambda path: hashed.append(os.path.basename(path)) or original(path)
    )
    cfg = load_config(None, [f"model.name_or_path={tmp_path / 'model'}", "data.train_files=[a.jsonl]"])
    split = SimpleNamespace(records=SimpleNamespace(fingerprint="d"), tokenizer_fingerprint="t")
    fingerprints = precompute._split_fingerprints(cfg, {"train": split, "eval": split}, torch.float32)
    assert sorted(hashed) == ["config.json", "model.safetensors"]
    assert (
        fingerprints["train"]["reference.weights_sha256"] == fingerprints["eval"]["reference.weights_sha256"]
    )


# ---------------------------------------------------------------- dropout


def test_disable_dropout_makes_train_mode_compute_eval_mode():
    from hdpo_ds.runtime.models import disable_dropout

    model = tiny_llama(64, attn_implementation="eager", attention_dropout=0.5)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        assert not torch.allclose(model.train()(input_ids=ids).logits, expected)  # dropout is real here
        assert disable_dropout(model) == ["LlamaAttention.attention_dropout"]
        torch.testing.assert_close(model.train()(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert model.config.attention_dropout == 0.5  # the config (and an export of it) is left as it was


# ---------------------------------------------------------------- reference cache advice for the mode


def test_rebuild_stale_with_a_cached_reference_is_refused_at_start():
    from hdpo_ds.recipes.preference import check_before_engines

    cfg = load_config(
        None, [*BASE, "reference.mode=cached", "reference.cache_path=c", "reference.rebuild_stale=true"]
    )
    with pytest.raises(
        ConfigError, match=r"^reference.rebuild_stale: has no effect with reference.mode=cached"
    ):
        check_before_engines(cfg)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.rows=1:3", "1:3"),
        ("data.eval_rows=-1:", "-1:"),
        ("reference.mode=auto", "auto"),
        ("logging.run_name=on", "on"),
        ("data.rows='1:3'", "1:3"),
    ],
)
def test_a_string_key_takes_the_override_as_typed(override, expected):
    """YAML 1.1 reads 1:3 as the base-60 number 63 and -1: as a mapping; a string key keeps the text."""
    key = override.split("=")[0]
    assert flatten(to_dict(load_config(None, [*BASE, override])))[key] == expected
