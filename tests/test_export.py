"""export_hf on 2 ranks (torchrun, gloo): a failure on one rank raises on every rank, none waits forever.

One launch runs export_hf several times in a row over a ZeRO-3 engine of a tiny Llama whose
parameters are really partitioned (persistence threshold 0): rank 0's target is a file (the folder
cannot be made), rank 0's second shard cannot be written (a folder is planted at its staged path just
before safetensors writes it, so the failure comes between the shards' gathers), a clean export (after
which the worker saves the gathered full state dict), and a parameter planted with NaN. After
its outcome each rank writes one line to results.rank<R>; rank 0 then keeps its process alive, as a
rank stuck in a collective on NCCL would see it (on gloo a peer's exit would end the wait). If a rank
sits in a gather while the other one has raised, its line never comes and the test fails on its deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.run_helpers import ROOT, VENV_BIN, free_port

WORKER = r"""
import json, os, sys, time
import deepspeed, safetensors.torch, torch
from hdpo_ds.runtime import checkpoint, dist, engine, export
from hdpo_ds.config import ModelConfig
from hdpo_ds.runtime.models import load_model, load_tokenizer

root = sys.argv[1]
engine.init_distributed()
rank = dist.rank()
ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 2,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
cfg = ModelConfig(name_or_path=os.path.join(root, "model"), from_scratch=True, attn_implementation="sdpa")
handle = engine.zero3_loading(ds)
model = load_model(cfg, dtype=torch.float32, device_type="cpu", seed=0, for_training=False).model
ref = engine.build_reference_engine(model, ds)
del handle
tokenizer = load_tokenizer(ModelConfig(name_or_path=os.path.join(root, "model")))
assert all(p.numel() == 0 for p in ref.module.parameters())  # partitioned: every export gathers
real_save_file = safetensors.torch.save_file

def save_file(tensors, filename, metadata=None):
    with open(os.path.join(root, "saved_files"), "a") as log:
        log.write(filename + "\n")
    if "second_shard_unwritable" in filename and os.path.basename(filename).startswith("model-00002-of-"):
        os.mkdir(filename)  # safetensors itself then fails to write there
    real_save_file(tensors, filename, metadata=metadata)

safetensors.torch.save_file = save_file

def outcome(target):
    try:
        export.export_hf(ref, tokenizer, target, max_shard_bytes=16384)
        return "exported"
    except Exception as e:
        return f"{type(e).__name__}: {e}"

with open(os.path.join(root, f"results.rank{rank}"), "w") as results:
    for mode in ("target_is_a_file", "second_shard_unwritable", "clean", "nan"):
        if mode == "nan":
            param = dict(ref.module.named_parameters())["model.layers.1.mlp.up_proj.weight"]
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if rank == 0:
                    param.data[3, 5] = float("nan")
        line = json.dumps({"mode": mode, "outcome": outcome(os.path.join(root, mode))})
        if mode == "clean":
            with deepspeed.zero.GatheredParameters(list(ref.module.parameters()), modifier_rank=None):
                if rank == 0:
                    full = {k: v.detach().clone() for k, v in ref.module.state_dict().items()}
                    torch.save(full, os.path.join(root, "full_state_dict.pt"))
        results.write(line + "\n")
        results.flush()
if rank == 0:
    time.sleep(600)  # alive, like a peer that NCCL does not see die: only the test's kill ends it
"""


@pytest.fixture(scope="module")
def export_run(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig

    root = tmp_path_factory.mktemp("export")
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, "configs/models/tiny-demo"))
    LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "target_is_a_file").write_text("not a folder")
    (root / "worker.py").write_text(WORKER)
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    torchrun = [
        os.path.join(VENV_BIN, "torchrun"),
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
    ]
    cmd = [*torchrun, str(root / "worker.py"), str(root)]
    deadline, results = time.monotonic() + 240, {}
    with open(root / "worker.log", "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                results = {r: _lines(root / f"results.rank{r}") for r in (0, 1)}
                if all(len(lines) == 4 for lines in results.values()):
                    break
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"root": root, "results": results, "log": (root / "worker.log").read_text()}


def _lines(path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _outcome(export_run, mode: str, rank: int) -> str:
    for line in export_run["results"][rank]:
        if line["mode"] == mode:
            return line["outcome"]
    raise AssertionError(
        f"rank {rank} never finished export mode {mode!r} (stuck?):\n{export_run['log'][-4000:]}"
    )


@pytest.mark.distributed
@pytest.mark.parametrize(
    "mode, rank0_cause",
    [("target_is_a_file", "FileExistsError"), ("second_shard_unwritable", "SafetensorError")],
)
def test_a_write_failure_on_rank0_raises_on_both_ranks(export_run, mode, rank0_cause):
    for rank in (0, 1):
        outcome = _outcome(export_run, mode, rank)
        assert outcome.startswith(f"CheckpointError: export to {export_run['root'] / mode} failed"), outcome
        assert f"rank 0: {rank0_cause}" in outcome, outcome


@pytest.mark.distributed
def test_a_failure_mid_export_leaves_nothing_behind(export_run):
    """Shard 1 was written and shard 2 failed, both inside a hidden staging folder; rank 0 removed it,
    so the target is as empty as before: no weights, index or config.json that would look exported."""
    folder = export_run["root"] / "second_shard_unwritable"
    saved = [p for p in (export_run["root"] / "saved_files").read_text().splitlines() if str(folder) in p]
    assert [os.path.basename(p) for p in saved] == [
        "model-00001-of-00008.safetensors",
        "model-00002-of-00008.safetensors",
    ]
    assert all(os.path.basename(os.path.dirname(p)).startswith(".export-") for p in saved), saved
    assert folder.is_dir() and list(folder.iterdir()) == []


@pytest.mark.distributed
def test_a_nonfinite_parameter_raises_on_both_ranks_naming_it(export_run):
    for rank in (0, 1):
        outcome = _outcome(export_run, "nan", rank)
        assert "non-finite parameter model.layers.1.mlp.up_proj.weight" in outcome, outcome
        assert outcome.startswith("CheckpointError"), outcome


@pytest.mark.distributed
def test_after_failed_exports_the_ranks_still_export_together(export_run):
    """The clean export comes after two failed ones: every rank left them at the same collective."""
    from safetensors.torch import load_file

    assert _outcome(export_run, "clean", 0) == _outcome(export_run, "clean", 1) == "exported"
    folder = export_run["root"] / "clean"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    weights = {}
    for shard in sorted(set(index["weight_map"].values())):
        weights.update(load_file(str(folder / shard)))
    assert set(weights) == set(index["weight_map"]) and len(set(index["weight_map"].values())) > 2
    # the training-time use_cache=false is not exported: the config says what the model had
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(folder).use_cache is True


@pytest.mark.distributed
def test_the_shards_are_hf_hubs_split_of_the_full_state_dict_and_load_back(export_run):
    """An independent expectation: huggingface_hub's splitter on the gathered state dict (real tensors,
    the module's own state_dict names) gives the exported files, their tensors and the index; and
    from_pretrained reads back exactly the gathered weights."""
    import torch
    from huggingface_hub import constants, split_torch_state_dict_into_shards
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder = export_run["root"] / "clean"
    full = torch.load(export_run["root"] / "full_state_dict.pt")
    assert all(v.numel() > 0 for v in full.values())  # whole tensors, not the ranks' empty slices
    expected = split_torch_state_dict_into_shards(full, max_shard_size=16384)
    # 8 by hand: embed and lm_head (65536 bytes each, over the limit) get shards of their own, lm_head's
    # numbered before the last partly filled one (the final norms)
    assert len(expected.filename_to_tensors) == 8
    assert expected.filename_to_tensors["model-00007-of-00008.safetensors"] == ["lm_head.weight"]
    index = json.loads((folder / constants.SAFETENSORS_INDEX_FILE).read_text())
    assert index == {"metadata": expected.metadata, "weight_map": expected.tensor_to_filename}
    assert sorted(p.name for p in folder.glob("*.safetensors")) == sorted(expected.filename_to_tensors)
    for filename, names in expected.filename_to_tensors.items():
        assert sorted(load_file(str(folder / filename))) == sorted(names), filename
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # the staging folder is gone
    loaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert sorted(loaded) == sorted(full)
    for name, value in full.items():
        assert torch.equal(loaded[name], value), name
