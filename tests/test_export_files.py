"""export_hf's files in one process, on a plain (not ZeRO) tiny Llama, where DeepSpeed's gather is a no-op.

A tied model's export holds each parameter once, in exactly the bytes safetensors writes for them; a
re-export leaves none of an earlier export's weight files; and an export that fails, or is killed,
half-way leaves nothing that looks like a complete export (no config.json, nothing from_pretrained
loads). The split itself is checked against huggingface_hub's on ZeRO-3 in test_export.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch

from tests.run_helpers import ROOT


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(ROOT, "configs/models/tiny-demo"))


def _model(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _export(model, out_dir, **kwargs) -> None:
    from hdpo_ds.runtime import export

    export.export_hf(types.SimpleNamespace(module=model, device="cpu"), _tokenizer(), str(out_dir), **kwargs)


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_tied_model_is_one_file_holding_each_parameter_once(tmp_path):
    from safetensors.torch import save
    from transformers import AutoModelForCausalLM

    model = _model(tied=True)
    _export(model, tmp_path / "hf")
    params = {name: p.detach() for name, p in model.named_parameters()}
    assert "lm_head.weight" not in params and len(params) == 2 * 9 + 2  # lm_head is embed_tokens
    # the bytes safetensors writes for the parameters in named_parameters order, as before hf_hub's split
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == save(params, metadata={"format": "pt"})
    names = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert "model.safetensors.index.json" not in names and not [n for n in names if n.startswith(".")]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert torch.equal(loaded.lm_head.weight, params["model.embed_tokens.weight"])


def test_a_reexport_leaves_none_of_the_earlier_weight_files(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model(tied=False)
    _export(model, tmp_path / "hf", max_shard_bytes=16384)
    assert len(list((tmp_path / "hf").glob("model-*-of-00008.safetensors"))) == 8
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    _export(model, tmp_path / "hf")  # one shard now: a stale index would point at files that are gone
    assert sorted(p.name for p in (tmp_path / "hf").glob("model*")) == ["model.safetensors"]
    assert (tmp_path / "hf" / "notes.txt").read_text() == "mine"  # what is not an export's is kept
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in model.state_dict().items())


def test_a_failed_export_removes_its_files_and_keeps_an_earlier_export(tmp_path, monkeypatch):
    import safetensors.torch

    from hdpo_ds.runtime.checkpoint import CheckpointError

    _export(_model(tied=False), tmp_path / "hf", max_shard_bytes=16384)
    before = _files(tmp_path / "hf")
    real, written = safetensors.torch.save_file, []

    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)  # written in full, and still not part of an export
        written.append(os.path.basename(filename))
        if len(written) == 3:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    model = _model(tied=False)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # another model: a mix of the two exports would show
    with pytest.raises(CheckpointError, match=r"rank 0: OSError: \[Errno 28\] No space left on device"):
        _export(model, tmp_path / "hf", max_shard_bytes=16384)
    assert written == [f"model-0000{i}-of-00008.safetensors" for i in (1, 2, 3)]
    assert _files(tmp_path / "hf") == before  # the earlier export, byte for byte, and no staging folder


KILLED = r"""
import os, sys
import safetensors.torch
from tests.test_export_files import _export, _model

where, out = sys.argv[1], sys.argv[2]
real_save_file, real_replace, saved = safetensors.torch.save_file, os.replace, []

def save_file(tensors, filename, metadata=None):
    real_save_file(tensors, filename, metadata=metadata)
    saved.append(filename)
    if where == "after_two_shards" and len(saved) == 2:
        os._exit(9)  # like a SIGKILL: no cleanup runs

def replace(src, dst):
    if where == "before_config" and os.path.basename(dst) == "config.json":
        os._exit(9)  # every other file is in place already
    real_replace(src, dst)

safetensors.torch.save_file, os.replace = save_file, replace
_export(_model(tied=False), out, max_shard_bytes=16384)
"""


@pytest.mark.parametrize("where", ["after_two_shards", "before_config"])
def test_a_killed_export_leaves_nothing_that_loads(tmp_path, where):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED, where, str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert killed.returncode == 9, killed.stderr[-3000:]
    top = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if where == "after_two_shards":
        assert top == []  # two whole shards, both still in the hidden staging folder
    else:
        assert "model.safetensors.index.json" in top and len([n for n in top if n.startswith("model-")]) == 8
    assert "config.json" not in top
    assert (
        len([p for p in out.iterdir() if p.name.startswith(".export-")]) == 1
    )  # the staging, left as it was
    with pytest.raises((OSError, ValueError), match="config.json"):  # transformers: no model here
        AutoModelForCausalLM.from_pretrained(out)
    model = _model(tied=False)
    _export(model, out, max_shard_bytes=16384)  # the next export also clears the killed one's staging
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in model.state_dict().items())
