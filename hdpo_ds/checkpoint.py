"""Checkpoints that never lose work: save, find, resume, and export to Hugging Face format.

Layout under `<output_dir>/checkpoints/`:

    step00000040/            DeepSpeed's files (every rank's ZeRO-3 shards), plus ours:
        rng_rank<R>.pt       each rank's python / numpy / torch (and CUDA) RNG states
        client_state.json    step, sampler position, MLflow run id, the resolved config, world size
        COMPLETE.json        written by rank 0 last, after every rank's files are on disk (fsync)
    latest                   the tag of the newest complete checkpoint; written by us, atomically
    best.json                the best evaluated checkpoint by monitors.best_metric (tag, step, value)

A folder without COMPLETE.json is never resumed from: it is reported and skipped. DeepSpeed's own
`latest` write is turned off (save_latest=False). The last `train.keep_checkpoints` complete
checkpoints are kept; the one `latest` names and protected ones (a monitor's best) never go.

    python -m hdpo_ds.checkpoint export CKPT_DIR OUT_DIR     # any saved checkpoint -> HF safetensors

Fault injection (tests): HDPO_FAULT_KILL_DURING_SAVE=<step> makes rank 0 SIGKILL its own process
group after the DeepSpeed files of that step's checkpoint are written and before it is committed.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import random
import re
import shutil
import signal
import sys

import numpy as np
import torch

from hdpo_ds import dist
from hdpo_ds.atomic import fsync_dir, write_json
from hdpo_ds.models import config_for_saving

logger = logging.getLogger(__name__)

__all__ = [
    "MATH_KEYS",
    "CheckpointError",
    "complete_steps",
    "export_hf",
    "export_hf_from_checkpoint",
    "find_resume_checkpoint",
    "load",
    "mark_best",
    "math_differences",
    "read_best",
    "save",
]

MARKER = "COMPLETE.json"
LATEST = "latest"
BEST = "best.json"
CLIENT_STATE = "client_state.json"
FAULT_KILL_DURING_SAVE = "HDPO_FAULT_KILL_DURING_SAVE"
_TAG = re.compile(r"^step(\d{8})$")
# Config keys whose change alters what a resumed run computes (DESIGN.md: resume refuses them).
MATH_KEYS = (
    "loss.",
    "model.name_or_path",
    "model.from_scratch",
    "model.tokenizer",
    "model.dtype",
    "model.disable_dropout",
    "reference.name_or_path",
    "data.train_files",
    "data.split",
    "data.rows",
    "data.max_length",
    "data.max_prompt_length",
    "data.truncation",
    "data.on_bad_record",
    "data.chat_template",
    "train.pairs_per_step",
    "train.seed",
    # The optimizer state restores these; with train.resume_force the new values are applied to it.
    "optim.lr",
    "optim.betas",
    "optim.eps",
    "optim.weight_decay",
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used as asked; the message says why."""


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_torch_atomically(obj, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MARKER))


def _complete_tags(root: str) -> list[str]:
    tags = [
        os.path.basename(p) for p in glob.glob(os.path.join(root, "step*")) if _TAG.match(os.path.basename(p))
    ]
    return sorted(t for t in tags if is_complete(os.path.join(root, t)))


def save(
    engine,
    output_dir: str,
    step: int,
    client_state: dict,
    *,
    keep: int,
    tokenizer=None,
    protected: set[str] | None = None,
) -> str:
    """Write a complete checkpoint of `step` (collective); returns its tag. The tokenizer and the model
    config go inside, so that `python -m hdpo_ds.checkpoint export` needs nothing else."""
    root = checkpoint_root(output_dir)
    tag = tag_for(step)
    folder = os.path.join(root, tag)
    if dist.is_main_process() and os.path.isdir(folder):
        shutil.rmtree(folder)  # a leftover incomplete folder of the same step (an earlier kill)
    dist.barrier()
    engine.save_checkpoint(root, tag=tag, client_state={}, save_latest=False)
    _save_torch_atomically(_rng_state(), os.path.join(folder, f"rng_rank{dist.rank()}.pt"))
    if dist.is_main_process():
        write_json(os.path.join(folder, CLIENT_STATE), client_state)
        config_for_saving(engine.module).save_pretrained(os.path.join(folder, "hf_config"))
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(folder, "hf_config"))
    dist.barrier()  # every rank's files are written

    if dist.is_main_process():
        if os.environ.get(FAULT_KILL_DURING_SAVE) == str(step):
            logger.warning(
                "%s=%d: killing the job in the middle of saving on purpose", FAULT_KILL_DURING_SAVE, step
            )
            os.killpg(os.getpgid(0), signal.SIGKILL)
        files = {}
        for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
                files[os.path.relpath(path, folder)] = os.path.getsize(path)
        fsync_dir(folder)
        write_json(
            os.path.join(folder, MARKER), {"step": step, "world_size": dist.world_size(), "files": files}
        )
        with open(os.path.join(root, f"{LATEST}.tmp"), "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(os.path.join(root, f"{LATEST}.tmp"), os.path.join(root, LATEST))
        fsync_dir(root)
        _prune(root, keep, {tag, *(protected or set())})
    dist.barrier()
    logger.info("checkpoint %s committed", folder)
    return tag


def complete_steps(output_dir: str) -> list[int]:
    """The steps of the complete checkpoints under output_dir, oldest first."""
    root = checkpoint_root(output_dir)
    return [int(_TAG.match(t).group(1)) for t in _complete_tags(root)] if os.path.isdir(root) else []


def mark_best(output_dir: str, step: int, metric: str, value: float) -> None:
    """Name the best evaluated checkpoint in checkpoints/best.json (atomically); pruning spares it."""
    write_json(os.path.join(checkpoint_root(output_dir), BEST),
               {"tag": tag_for(step), "step": step, "metric": metric, "value": value})  # fmt: skip


def read_best(output_dir: str) -> dict | None:
    path = os.path.join(checkpoint_root(output_dir), BEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _prune(root: str, keep: int, protected: set[str]) -> None:
    if keep <= 0:
        return
    complete = _complete_tags(root)
    for tag in complete[:-keep]:
        if tag not in protected:
            shutil.rmtree(os.path.join(root, tag), ignore_errors=True)


def find_resume_checkpoint(output_dir: str, resume: str) -> str | None:
    """The checkpoint folder to resume from, or None for a fresh start.

    `never`: None. `auto`: the folder `latest` names when it is complete, else (reported) the newest
    complete one, else None. A path: that checkpoint folder (or a checkpoints root), which must be
    complete.
    """
    if resume == "never":
        return None
    if resume != "auto":
        path = resume
        if os.path.isfile(os.path.join(path, LATEST)) or os.path.basename(path.rstrip("/")) == "checkpoints":
            found = _latest_complete(path)
            if found is None:
                raise CheckpointError(f"train.resume: no complete checkpoint under {path}")
            return found
        if not is_complete(path):
            raise CheckpointError(f"train.resume: {path} is not a complete checkpoint (no {MARKER})")
        return path
    root = checkpoint_root(output_dir)
    return _latest_complete(root) if os.path.isdir(root) else None


def _latest_complete(root: str) -> str | None:
    latest_file = os.path.join(root, LATEST)
    if os.path.isfile(latest_file):
        with open(latest_file) as f:
            tag = f.read().strip()
        if is_complete(os.path.join(root, tag)):
            return os.path.join(root, tag)
        logger.warning(
            "checkpoint %s named by %s is incomplete (no %s); skipping it", tag, latest_file, MARKER
        )
    complete = _complete_tags(root)
    for folder in glob.glob(os.path.join(root, "step*")):
        if not is_complete(folder):
            logger.warning("checkpoint %s is incomplete (no %s); it is never resumed from", folder, MARKER)
    return os.path.join(root, complete[-1]) if complete else None


def read_client_state(folder: str) -> dict:
    with open(os.path.join(folder, CLIENT_STATE)) as f:
        return json.load(f)


def math_differences(saved: dict, current: dict) -> list[str]:
    """Flattened config keys (MATH_KEYS) whose values differ, as 'key: saved -> now' lines."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        if key.startswith(MATH_KEYS) and saved.get(key) != current.get(key):
            lines.append(f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now")
    return lines


def load(engine, folder: str) -> dict:
    """Restore the engine (weights, optimizer, scheduler) and this rank's RNG; returns the client state."""
    root, tag = os.path.dirname(folder.rstrip("/")), os.path.basename(folder.rstrip("/"))
    state = read_client_state(folder)
    if state["world_size"] != dist.world_size():
        raise CheckpointError(
            f"train.resume: {folder} was written by {state['world_size']} ranks and this run has "
            f"{dist.world_size()}; ZeRO-3 shards do not reload across world sizes (convert the checkpoint with "
            "DeepSpeed's universal checkpoint tools, or resume with the same world size)"
        )
    load_path, _ = engine.load_checkpoint(
        root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {folder}")
    _set_rng_state(torch.load(os.path.join(folder, f"rng_rank{dist.rank()}.pt"), weights_only=False))
    return state


# ------------------------------------------------------------------------------------------ HF export


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
    parser = argparse.ArgumentParser(prog="python -m hdpo_ds.checkpoint")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="convert a saved checkpoint to a Hugging Face model directory")
    export.add_argument(
        "checkpoint", help="a checkpoint folder (checkpoints/stepNNNNNNNN) or a checkpoints root"
    )
    export.add_argument("out_dir")
    export.add_argument("--max-shard-gib", type=float, default=2.0)
    args = parser.parse_args(argv)
    folder = args.checkpoint
    if not is_complete(folder):
        found = _latest_complete(folder) if os.path.isdir(folder) else None
        if found is None:
            print(f"error: {folder} is not a complete checkpoint and holds none", file=sys.stderr)
            return 2
        folder = found
    export_hf_from_checkpoint(folder, args.out_dir, max_shard_bytes=int(args.max_shard_gib * 2**30))
    print(f"exported {folder} -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
