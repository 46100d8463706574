"""Export to Hugging Face format: from the running engine (collective) or offline from a saved checkpoint.

    python -m hdpo_ds.runtime.export CKPT_DIR OUT_DIR     # any complete checkpoint -> HF safetensors

Both write safetensors shards with the config and the tokenizer, one gathered tensor at a time, so a
large model is never whole in memory.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from hdpo_ds.common.atomic import write_json
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


class _ShardWriter:
    """Collects tensors and writes safetensors shards of at most `max_bytes` (rank 0 only)."""

    def __init__(self, out_dir: str, max_bytes: int) -> None:
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"model-{len(self.files) + 1:05d}.safetensors.part"
        save_file(self.pending, os.path.join(self.out_dir, name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        total = len(self.files)
        weight_map = {}
        for i, (part, names) in enumerate(self.files, start=1):
            final = "model.safetensors" if total == 1 else f"model-{i:05d}-of-{total:05d}.safetensors"
            os.replace(os.path.join(self.out_dir, part), os.path.join(self.out_dir, final))
            weight_map.update(dict.fromkeys(names, final))
        if total > 1:
            write_json(os.path.join(self.out_dir, "model.safetensors.index.json"),
                       {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})  # fmt: skip


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


def export_hf(engine, tokenizer, out_dir: str, *, max_shard_bytes: int = 2 * 2**30) -> None:
    """Gather the model's weights parameter by parameter (collective) and let rank 0 write them as
    safetensors shards with the config, generation config and tokenizer; never the whole model at once.

    Every check that can fail is agreed before the next collective (one all-reduce per parameter): a
    failure on any rank (rank 0's writes, a non-finite parameter, seen by every rank on the gathered
    tensor) raises CheckpointError on all ranks together."""
    import deepspeed

    module = engine.module
    device = getattr(engine, "device", "cpu")
    what = f"export to {out_dir}"
    main = dist.is_main_process()
    writer = _ShardWriter(out_dir, max_shard_bytes) if main else None
    problem, cause = _attempt(os.makedirs, out_dir, 0o777, True) if main else (None, None)
    _raise_together(problem, what, device, cause)
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            problem, cause = None, None
            if not torch.isfinite(param.data).all():
                problem = f"refusing to export a non-finite parameter {name}"
            elif writer is not None:
                problem, cause = _attempt(
                    writer.add, name, param.data.detach().to("cpu", copy=True).contiguous()
                )
        _raise_together(problem, what, device, cause)

    def finish() -> None:
        for name, buf in _persistent_buffers(module).items():
            writer.add(name, buf.detach().to("cpu", copy=True).contiguous())
        writer.finish()
        config_for_saving(module).save_pretrained(out_dir)
        if getattr(module, "generation_config", None) is not None:
            module.generation_config.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)

    problem, cause = _attempt(finish) if main else (None, None)
    _raise_together(problem, what, device, cause)  # also the barrier: rank 0's files are written


def export_hf_from_checkpoint(folder: str, out_dir: str, *, max_shard_bytes: int = 2 * 2**30) -> None:
    """Offline: a saved ZeRO checkpoint -> HF safetensors in the training dtype, one tensor in memory
    at a time (DeepSpeed's lazy fp32 reconstruction), plus config and tokenizer of the run."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoTokenizer

    if not is_complete(folder):
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {MARKER})")
    state = read_client_state(folder)
    dtype = getattr(torch, state["dtype"])
    hf_config = os.path.join(folder, "hf_config")
    root, tag = os.path.dirname(folder.rstrip("/")), os.path.basename(folder.rstrip("/"))
    config = AutoConfig.from_pretrained(hf_config)
    # The names the in-run export writes: one per parameter (tied weights once) and persistent buffers.
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = [n for n, _ in skeleton.named_parameters()] + list(_persistent_buffers(skeleton))
    lazy = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag, lazy_mode=True)
    missing = [n for n in names if n not in lazy]
    if missing:
        raise CheckpointError(f"{folder} lacks tensors the model needs, e.g. {missing[:3]}")
    os.makedirs(out_dir, exist_ok=True)
    writer = _ShardWriter(out_dir, max_shard_bytes)
    for name in names:  # one tensor materialised at a time
        tensor = lazy[name]
        value = tensor.contiguous() if hasattr(tensor, "contiguous") else tensor
        writer.add(name, value.to(dtype).contiguous())
    writer.finish()
    config.save_pretrained(out_dir)
    if os.path.isfile(os.path.join(hf_config, "tokenizer_config.json")):
        AutoTokenizer.from_pretrained(hf_config).save_pretrained(out_dir)


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
