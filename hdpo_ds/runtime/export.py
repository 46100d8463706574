"""Export to Hugging Face format: from the running engine (collective) or offline from a saved checkpoint.

    python -m hdpo_ds.runtime.export CKPT_DIR OUT_DIR     # any complete checkpoint -> HF safetensors
                                                          # (LoRA: OUT_DIR/adapter + the merged model)

Both plan the safetensors shards up front with huggingface_hub's splitter (names, shapes and dtypes
only), then gather, write and free one shard at a time, so a large model is never whole in memory.
Everything is written into a hidden folder inside OUT_DIR and moved into place at the end, config.json
last: a folder with a config.json holds a whole export, never half of one.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable

import torch
from huggingface_hub import constants, split_torch_state_dict_into_shards

from hdpo_ds.common.atomic import fsync_dir, fsync_path, write_json
from hdpo_ds.runtime import dist
from hdpo_ds.runtime.checkpoint import (
    MARKER,
    CheckpointError,
    is_complete,
    latest_complete,
    read_client_state,
)
from hdpo_ds.runtime.models import config_for_saving

__all__ = [
    "export_hf",
    "export_hf_from_checkpoint",
    "export_lora_from_state",
    "export_merged_from_checkpoint",
    "merged_lora_tensor",
]

CONFIG_FILE = "config.json"
_STAGING_PREFIX = ".export-"
# model.safetensors, model-00001-of-00003.safetensors and the index: what hf_hub's pattern names
_PREFIX, _, _SUFFIX = constants.SAFETENSORS_WEIGHTS_FILE_PATTERN.partition("{suffix}")
_WEIGHT_FILE = re.compile(re.escape(_PREFIX) + r"(-\d{5}-of-\d{5})?" + re.escape(_SUFFIX))


def _plan(specs: dict[str, tuple[tuple[int, ...], torch.dtype]], max_shard_bytes: int):
    """huggingface_hub's shard plan (file names, tensor -> file, total size) from shapes and dtypes alone:
    meta tensors have a size but no data, and no storage to share (the names are unique already)."""
    meta = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in specs.items()}
    return split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_bytes)


class _StagedExport:
    """One export's files (rank 0 only), written into a hidden folder inside `out_dir` and moved into
    place at the end: the shards, the index, tokenizer and generation config, then config.json."""

    def __init__(self, out_dir: str, split) -> None:
        self.out_dir, self.split = out_dir, split
        self.staging: str | None = None

    def start(self) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        self.staging = tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=self.out_dir)

    def write_shard(self, filename: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = os.path.join(self.staging, filename)
        save_file(tensors, path, metadata={"format": "pt"})
        fsync_path(path)

    def commit(self, save_rest: Callable[[str], None]) -> None:
        """Write the index, let `save_rest(folder)` write config and tokenizer, then move it all in."""
        weights = list(self.split.filename_to_tensors)
        if self.split.is_sharded:
            index = {"metadata": self.split.metadata, "weight_map": self.split.tensor_to_filename}
            write_json(os.path.join(self.staging, constants.SAFETENSORS_INDEX_FILE), index)
            weights.append(constants.SAFETENSORS_INDEX_FILE)
        save_rest(self.staging)
        staged = set(os.listdir(self.staging))
        if CONFIG_FILE not in staged:
            raise CheckpointError(f"the export wrote no {CONFIG_FILE}")
        for name in staged:
            fsync_path(os.path.join(self.staging, name))
        # An earlier export here first stops looking complete (its config.json goes), then loses the weight
        # files this one does not replace (a stale model.safetensors would shadow a new index).
        if os.path.lexists(os.path.join(self.out_dir, CONFIG_FILE)):
            os.remove(os.path.join(self.out_dir, CONFIG_FILE))
        for name in os.listdir(self.out_dir):
            weight = _WEIGHT_FILE.fullmatch(name) or name == constants.SAFETENSORS_INDEX_FILE
            if weight and name not in staged:
                os.remove(os.path.join(self.out_dir, name))
        fsync_dir(self.out_dir)
        for name in [*weights, *sorted(staged - set(weights) - {CONFIG_FILE})]:
            os.replace(os.path.join(self.staging, name), os.path.join(self.out_dir, name))
        fsync_dir(self.out_dir)
        os.replace(os.path.join(self.staging, CONFIG_FILE), os.path.join(self.out_dir, CONFIG_FILE))
        fsync_dir(self.out_dir)
        os.rmdir(self.staging)
        for name in os.listdir(self.out_dir):  # what killed exports left behind
            if name.startswith(_STAGING_PREFIX):
                shutil.rmtree(os.path.join(self.out_dir, name), ignore_errors=True)

    def abandon(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)


def _persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    keys = set(module.state_dict().keys())
    return {name: buf for name, buf in module.named_buffers() if name in keys}


def _raise_together(problem: str | None, what: str, device, cause: BaseException | None = None) -> None:
    """Collective: every rank learns whether any rank has a problem, and then all raise CheckpointError
    (rank by rank messages), so that no rank goes on into a collective the others never join."""
    if not dist.all_agree(problem is not None, device=device):
        return
    problems = dist.gather_objects(problem)
    ranks: dict[str, list[int]] = {}
    for r, p in enumerate(problems):
        if p is not None:
            ranks.setdefault(p, []).append(r)
    detail = "; ".join(f"rank {', '.join(map(str, rs))}: {p}" for p, rs in ranks.items())
    raise CheckpointError(f"{what} failed ({detail}); every rank stops here") from cause


def _attempt(fn, *args) -> tuple[str | None, BaseException | None]:
    """Run `fn(*args)` (this rank's own work between collectives); its failure as (message, exception)."""
    try:
        fn(*args)
    except Exception as e:
        return f"{type(e).__name__}: {e}", e
    return None, None


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True).contiguous()


def _take(shard: dict[str, torch.Tensor], name: str, tensor: torch.Tensor) -> None:
    shard[name] = _host_copy(tensor)


def _finish_shard(staged: _StagedExport, filename: str, names: list[str], shard: dict, buffers: dict) -> None:
    """Add the shard's buffers to its gathered parameters and write it, in the plan's order."""
    shard.update({name: _host_copy(buffers[name]) for name in names if name in buffers})
    staged.write_shard(filename, {name: shard[name] for name in names})


def export_hf(engine, tokenizer, out_dir: str, *, max_shard_bytes: int = 2 * 2**30) -> None:
    """Gather the model's weights parameter by parameter (collective) and let rank 0 write them as
    safetensors shards with the config, generation config and tokenizer; never more than one shard.

    Every rank plans the shards (the gathers follow the plan's order). Every check that can fail is
    agreed before the next collective (one all-reduce per parameter and per shard): a failure on any
    rank (rank 0's writes, a non-finite parameter, seen by every rank on the gathered tensor) raises
    CheckpointError on all ranks together, and rank 0 removes what it had staged."""
    import deepspeed

    module = engine.module
    device = getattr(engine, "device", "cpu")
    what = f"export to {out_dir}"
    main = dist.is_main_process()
    # One name per parameter (named_parameters lists a tied weight once) and the persistent buffers.
    params, buffers = dict(module.named_parameters()), _persistent_buffers(module)
    # Under ZeRO-3 a rank holds a slice of each parameter; ds_shape is the whole one's shape.
    specs = {name: (tuple(getattr(p, "ds_shape", p.shape)), p.dtype) for name, p in params.items()}
    specs.update({name: (tuple(b.shape), b.dtype) for name, b in buffers.items()})
    split = _plan(specs, max_shard_bytes)
    staged = _StagedExport(out_dir, split)
    problem, cause = _attempt(staged.start) if main else (None, None)
    _raise_together(problem, what, device, cause)
    try:
        for filename, names in split.filename_to_tensors.items():
            shard: dict[str, torch.Tensor] = {}
            for name in names:
                if name in buffers:  # whole on every rank: no gather
                    continue
                with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=None):
                    data = params[name].data
                    problem, cause = None, None
                    if not torch.isfinite(data).all():
                        problem = f"refusing to export a non-finite parameter {name}"
                    elif main:
                        problem, cause = _attempt(_take, shard, name, data)
                _raise_together(problem, what, device, cause)

            problem, cause = (
                _attempt(_finish_shard, staged, filename, names, shard, buffers) if main else (None, None)
            )
            shard.clear()  # the shard's tensors are freed before the next shard's gathers
            _raise_together(problem, what, device, cause)

        def save_rest(folder: str) -> None:
            config_for_saving(module).save_pretrained(folder)
            if getattr(module, "generation_config", None) is not None:
                module.generation_config.save_pretrained(folder)
            tokenizer.save_pretrained(folder)

        problem, cause = _attempt(staged.commit, save_rest) if main else (None, None)
        _raise_together(problem, what, device, cause)  # also the barrier: rank 0's files are written
    except BaseException:
        staged.abandon()
        raise


def export_hf_from_checkpoint(folder: str, out_dir: str, *, max_shard_bytes: int = 2 * 2**30) -> None:
    """Offline: a saved ZeRO checkpoint -> HF safetensors in the training dtype, one shard in memory
    at a time (DeepSpeed's lazy fp32 reconstruction), plus config and tokenizer of the run. A LoRA run's
    checkpoint gives both its adapter in PEFT's format (``out_dir/adapter``) and the merged model."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not is_complete(folder):
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {MARKER})")
    state = read_client_state(folder)
    lora_cfg = state["config"]["model"].get("lora", {})
    root, tag = os.path.dirname(folder.rstrip("/")), os.path.basename(folder.rstrip("/"))
    lazy = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag, lazy_mode=True)
    if lora_cfg.get("r", 0) > 0:
        export_lora_from_state(
            lazy, folder, out_dir, adapter=True, merged=True, max_shard_bytes=max_shard_bytes
        )
        return
    _write_offline(folder, out_dir, lambda name: lazy.get(name), max_shard_bytes)


def export_lora_from_state(
    lazy, folder: str, out_dir: str, *, adapter: bool, merged: bool, max_shard_bytes: int = 2 * 2**30
) -> None:
    """A LoRA run's checkpoint ``folder`` (its full fp32 state ``lazy``: peft's names, frozen base
    included) -> with ``adapter`` the adapter in PEFT's format at ``out_dir/adapter``, with ``merged`` the
    merged model as HF safetensors in ``out_dir``: each adapted weight W + (alpha / r) B A (Hu et al. 2021,
    LoRA, eq. 3), each modules_to_save module its trained copy, one tensor materialised at a time."""
    state = read_client_state(folder)
    lora_cfg = state["config"]["model"]["lora"]
    scale = float(lora_cfg["alpha"]) / int(lora_cfg["r"])
    if adapter:
        _write_adapter(
            lazy, folder, lora_cfg, os.path.join(out_dir, "adapter"), getattr(torch, state["dtype"])
        )
    if merged:
        _write_offline(folder, out_dir, lambda name: merged_lora_tensor(lazy, name, scale), max_shard_bytes)


def export_merged_from_checkpoint(folder: str, out_dir: str, device) -> None:
    """Collective: rank 0 writes a LoRA run's merged model from its checkpoint ``folder`` into ``out_dir``
    (``export_lora_from_state``); a failure there stops every rank together."""
    problem, cause = None, None
    if dist.is_main_process():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        def merge() -> None:
            root, tag = os.path.dirname(folder.rstrip("/")), os.path.basename(folder.rstrip("/"))
            lazy = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag, lazy_mode=True)
            export_lora_from_state(lazy, folder, out_dir, adapter=False, merged=True)

        problem, cause = _attempt(merge)
    _raise_together(problem, "the merged export", device, cause)


_PEFT_PREFIX = "base_model.model."  # where peft puts the wrapped model's names (PeftModelForCausalLM)


def merged_lora_tensor(lazy, name: str, scale: float):
    """The merged model's tensor ``name`` (the plain model's name) from a LoRA state in peft's names: a
    modules_to_save module's trained copy, an adapted Linear's W + scale * B A (an adapted Embedding's
    W + scale * (B A)^T), else the frozen tensor itself; None when the state has none of them. A lazy
    tensor is returned as it is (materialised by the caller), a merged one computed here."""
    module, _, param = name.rpartition(".")
    head = _PEFT_PREFIX + (module + "." if module else "")
    saved = f"{head}modules_to_save.default.{param}"
    if saved in lazy:
        return lazy[saved]
    base = f"{head}base_layer.{param}"
    if base not in lazy:
        return lazy.get(_PEFT_PREFIX + name)
    if param != "weight" or (
        f"{head}lora_A.default.weight" not in lazy and f"{head}lora_embedding_A.default" not in lazy
    ):
        return lazy[base]
    weight = _materialise(lazy[base])
    if f"{head}lora_A.default.weight" in lazy:
        a, b = (
            _materialise(lazy[f"{head}lora_A.default.weight"]),
            _materialise(lazy[f"{head}lora_B.default.weight"]),
        )
        return weight + scale * (b @ a)
    a, b = (
        _materialise(lazy[f"{head}lora_embedding_A.default"]),
        _materialise(lazy[f"{head}lora_embedding_B.default"]),
    )
    return weight + scale * (b @ a).T


def _materialise(tensor) -> torch.Tensor:
    return (tensor.contiguous() if hasattr(tensor, "contiguous") else tensor).float()


def _write_adapter(lazy, folder: str, lora_cfg: dict, out: str, dtype: torch.dtype) -> None:
    """The adapter (and modules_to_save copies) in PEFT's format, through peft's own save_pretrained on a
    meta-device skeleton that holds only the trained tensors; written aside and renamed into place."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from hdpo_ds.config import LoraConfig
    from hdpo_ds.runtime.lora import _peft_config

    config = AutoConfig.from_pretrained(os.path.join(folder, "hf_config"))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
        wrapped = get_peft_model(skeleton, _peft_config(LoraConfig(**lora_cfg)), autocast_adapter_dtype=False)
    trained = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    missing = [n for n in trained if n not in lazy]
    if missing:
        raise CheckpointError(f"{folder} lacks adapter tensors, e.g. {missing[:3]}")
    values = {n: _materialise(lazy[n]).to(dtype) for n in trained}
    wrapped.load_state_dict(values, strict=False, assign=True)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=parent)
    try:
        wrapped.save_pretrained(staging, safe_serialization=True, save_embedding_layers=False)
        for name in os.listdir(staging):
            fsync_path(os.path.join(staging, name))
        if os.path.isdir(out):  # an earlier export: set aside, then dropped once the new one is in place
            old = tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=parent)
            os.replace(out, os.path.join(old, "adapter"))
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_offline(folder: str, out_dir: str, tensor_of, max_shard_bytes: int) -> None:
    """The plain model's tensors (``tensor_of(name)``: a tensor, a lazy one, or None when missing) in the
    training dtype as HF safetensors shards in ``out_dir``, with the run's config and tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    state = read_client_state(folder)
    dtype = getattr(torch, state["dtype"])
    hf_config = os.path.join(folder, "hf_config")
    config = AutoConfig.from_pretrained(hf_config)
    # The names the in-run export writes: one per parameter (tied weights once) and persistent buffers.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = {**dict(skeleton.named_parameters()), **_persistent_buffers(skeleton)}
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    names = list(tensors)
    missing = [n for n in names if tensor_of(n) is None]
    if missing:
        raise CheckpointError(f"{folder} lacks tensors the model needs, e.g. {missing[:3]}")
    split = _plan({name: (shapes[name], dtype) for name in names}, max_shard_bytes)
    staged = _StagedExport(out_dir, split)
    try:
        staged.start()
        for filename, shard_names in split.filename_to_tensors.items():
            shard = {}
            for name in shard_names:  # one tensor materialised at a time
                value = _materialise(tensor_of(name)).to(dtype).contiguous()
                if tuple(value.shape) != shapes[name]:
                    raise CheckpointError(
                        f"{folder}: {name} has shape {tuple(value.shape)}, the model {shapes[name]}"
                    )
                shard[name] = value
            staged.write_shard(filename, shard)
            shard.clear()

        def save_rest(folder: str) -> None:
            config.save_pretrained(folder)
            if os.path.isfile(os.path.join(hf_config, "tokenizer_config.json")):
                AutoTokenizer.from_pretrained(hf_config).save_pretrained(folder)

        staged.commit(save_rest)
    except BaseException:
        staged.abandon()
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hdpo_ds.runtime.export",
        description="convert a saved checkpoint to a Hugging Face model directory",
    )
    parser.add_argument(
        "checkpoint", help="a checkpoint folder (checkpoints/stepNNNNNNNN) or a checkpoints root"
    )
    parser.add_argument("out_dir")
    parser.add_argument("--max-shard-gib", type=float, default=2.0)
    args = parser.parse_args(argv)
    folder = args.checkpoint
    if not is_complete(folder):
        found = latest_complete(folder) if os.path.isdir(folder) else None
        if found is None:
            print(f"error: {folder} is not a complete checkpoint and holds none", file=sys.stderr)
            return 2
        folder = found
    export_hf_from_checkpoint(folder, args.out_dir, max_shard_bytes=int(args.max_shard_gib * 2**30))
    print(f"exported {folder} -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
