"""Export to Hugging Face format: from the running engine (collective) or offline from a saved checkpoint.

    python -m hdpo_ds.runtime.export CKPT_DIR OUT_DIR     # any complete checkpoint -> HF safetensors

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

__all__ = ["export_hf", "export_hf_from_checkpoint"]

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
    at a time (DeepSpeed's lazy fp32 reconstruction), plus config and tokenizer of the run."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not is_complete(folder):
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {MARKER})")
    state = read_client_state(folder)
    if state["config"]["model"].get("lora", {}).get("r", 0) > 0:
        raise CheckpointError(
            f"{folder} is a checkpoint of a LoRA run (model.lora.r > 0): exporting its adapter or the merged "
            "model offline is not built yet; the run itself writes the adapter to <output_dir>/hf/adapter"
        )
    dtype = getattr(torch, state["dtype"])
    hf_config = os.path.join(folder, "hf_config")
    root, tag = os.path.dirname(folder.rstrip("/")), os.path.basename(folder.rstrip("/"))
    config = AutoConfig.from_pretrained(hf_config)
    # The names the in-run export writes: one per parameter (tied weights once) and persistent buffers.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = [n for n, _ in skeleton.named_parameters()] + list(_persistent_buffers(skeleton))
    lazy = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag, lazy_mode=True)
    missing = [n for n in names if n not in lazy]
    if missing:
        raise CheckpointError(f"{folder} lacks tensors the model needs, e.g. {missing[:3]}")
    split = _plan({name: (tuple(lazy[name].shape), dtype) for name in names}, max_shard_bytes)
    staged = _StagedExport(out_dir, split)
    try:
        staged.start()
        for filename, shard_names in split.filename_to_tensors.items():
            shard = {}
            for name in shard_names:  # one tensor materialised at a time
                tensor = lazy[name]
                value = tensor.contiguous() if hasattr(tensor, "contiguous") else tensor
                shard[name] = value.to(dtype).contiguous()
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
