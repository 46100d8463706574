"""Checkpoints that never lose work: save, find and resume (export: hdpo_ds/runtime/export.py).

Layout under `<output_dir>/checkpoints/`:

    step00000040/            DeepSpeed's files (every rank's ZeRO-3 shards), plus ours:
        rng_rank<R>.pt       each rank's python / numpy / torch (and CUDA) RNG states
        client_state.json    step, sampler position, MLflow run id, the resolved config, world size
        reference/rank<R>.pt with reference.sync on: each rank's share of the moving reference's weights
        COMPLETE.json        written by rank 0 last, after every rank's files are on disk (fsync)
    latest                   the tag of the newest complete checkpoint; written by us, atomically
    best.json                the best evaluated checkpoint by monitors.best_metric (tag, step, value)

A folder without COMPLETE.json is never resumed from: it is reported and skipped. DeepSpeed's own
`latest` write is turned off (save_latest=False). The last `train.keep_checkpoints` complete
checkpoints are kept; the one `latest` names and protected ones (a monitor's best) never go.

Fault injection (tests): HDPO_FAULT_KILL_DURING_SAVE=<step> makes rank 0 SIGKILL its own process
group after the DeepSpeed files of that step's checkpoint are written and before it is committed.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import re
import shutil
import signal

import numpy as np
import torch

from hdpo_ds.common.atomic import fsync_dir, write_json
from hdpo_ds.runtime import dist
from hdpo_ds.runtime.models import config_for_saving

logger = logging.getLogger(__name__)

__all__ = [
    "MATH_KEYS",
    "CheckpointError",
    "complete_steps",
    "find_resume_checkpoint",
    "load",
    "load_reference",
    "mark_best",
    "math_differences",
    "read_best",
    "save",
    "save_reference",
]

MARKER = "COMPLETE.json"
LATEST = "latest"
BEST = "best.json"
CLIENT_STATE = "client_state.json"
REFERENCE = "reference"  # the subfolder of a moving reference's per-rank shares (reference.sync)
FAULT_KILL_DURING_SAVE = "HDPO_FAULT_KILL_DURING_SAVE"
_TAG = re.compile(r"^step(\d{8})$")
# Config keys whose change alters what a resumed run computes (docs/design.md §3: resume refuses them).
MATH_KEYS = (
    "loss.",
    "model.name_or_path",
    "model.from_scratch",
    "model.tokenizer",
    "model.dtype",
    "model.disable_dropout",
    "model.router_aux_loss_coef",
    "model.lora.",  # the adapters: another rank, targets or start is another model
    "reference.source",
    "reference.name_or_path",
    "reference.sync",
    "reference.sync_alpha",
    "reference.sync_every",
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
    reference_engine=None,
) -> str:
    """Write a complete checkpoint of `step` (collective); returns its tag. The tokenizer and the model
    config go inside, so that `python -m hdpo_ds.runtime.export` needs nothing else. A moving reference
    (`reference_engine`, reference.sync) is saved in the `reference/` subfolder before the commit."""
    root = checkpoint_root(output_dir)
    tag = tag_for(step)
    folder = os.path.join(root, tag)
    if dist.is_main_process() and os.path.isdir(folder):
        shutil.rmtree(folder)  # a leftover incomplete folder of the same step (an earlier kill)
    dist.barrier()
    engine.save_checkpoint(root, tag=tag, client_state={}, save_latest=False)
    if reference_engine is not None:  # its weights are state: the synced reference is not the initial one
        save_reference(reference_engine, folder)
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
    write_json(
        os.path.join(checkpoint_root(output_dir), BEST),
        {"tag": tag_for(step), "step": step, "metric": metric, "value": value},
    )


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
            found = latest_complete(path)
            if found is None:
                raise CheckpointError(f"train.resume: no complete checkpoint under {path}")
            return found
        if not is_complete(path):
            raise CheckpointError(f"train.resume: {path} is not a complete checkpoint (no {MARKER})")
        return path
    root = checkpoint_root(output_dir)
    return latest_complete(root) if os.path.isdir(root) else None


def latest_complete(root: str) -> str | None:
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


def math_differences(saved: dict, current: dict, defaults: dict | None = None) -> list[str]:
    """Flattened config keys (MATH_KEYS) whose values differ, as 'key: saved -> now' lines.

    A key the checkpoint lacks was added to the config after it was written; the code that wrote it
    behaved as the key's default does, so with `defaults` it is compared against that default."""
    defaults = defaults or {}
    lines = []
    for key in sorted(set(saved) | set(current)):
        before = saved[key] if key in saved else defaults.get(key)
        if key.startswith(MATH_KEYS) and before != current.get(key):
            lines.append(f"{key}: {before!r} in the checkpoint, {current.get(key)!r} now")
    return lines


def load(engine, folder: str) -> dict:
    """Restore the engine (weights, optimizer, scheduler) and this rank's RNG; returns the client state."""
    root, tag = os.path.dirname(folder.rstrip("/")), os.path.basename(folder.rstrip("/"))
    state = read_client_state(folder)
    if state["world_size"] != dist.world_size():
        raise CheckpointError(
            f"train.resume: {folder} was written by {state['world_size']} ranks and this run has "
            f"{dist.world_size()}; ZeRO-3 shards do not reload across world sizes (convert the checkpoint "
            "with DeepSpeed's universal checkpoint tools, or resume with the same world size)"
        )
    load_path, _ = engine.load_checkpoint(
        root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {folder}")
    _set_rng_state(torch.load(os.path.join(folder, f"rng_rank{dist.rank()}.pt"), weights_only=False))
    return state


def _reference_shares(module):
    """(name, parameter, this rank's share): the ZeRO-3 partition (ds_tensor, the values DeepSpeed
    gathers from, persisted parameters included) or, without ZeRO-3, the whole tensor."""
    for name, param in module.named_parameters():
        yield name, param, (param.ds_tensor if hasattr(param, "ds_id") else param.data)


def save_reference(reference_engine, folder: str) -> None:
    """Every rank writes its share of the moving reference's weights to reference/rank<R>.pt (an
    optimizer-free DeepSpeed engine cannot save_checkpoint; nothing is gathered)."""
    os.makedirs(os.path.join(folder, REFERENCE), exist_ok=True)
    shares = {
        name: share.detach().cpu().clone() for name, _, share in _reference_shares(reference_engine.module)
    }
    path = os.path.join(folder, REFERENCE, f"rank{dist.rank()}.pt")
    _save_torch_atomically({"world_size": dist.world_size(), "shares": shares}, path)


def load_reference(reference_engine, folder: str) -> None:
    """Restore a moving reference's weights (reference.sync) from the `reference/` subfolder of a
    complete checkpoint; a checkpoint without one raises CheckpointError naming the folder."""
    if not os.path.isdir(os.path.join(folder, REFERENCE)):
        raise CheckpointError(
            f"train.resume: {folder} holds no {REFERENCE}/ folder (it was written without reference.sync), "
            "so the moving reference's weights cannot be restored; resume from a checkpoint of a run with "
            "reference.sync on, or start a fresh run (train.resume=never)"
        )
    path = os.path.join(folder, REFERENCE, f"rank{dist.rank()}.pt")
    saved = torch.load(path, map_location="cpu", weights_only=True)["shares"]
    module = reference_engine.module
    for name, param, share in _reference_shares(module):
        if name not in saved or saved[name].shape != share.shape:
            raise CheckpointError(
                f"train.resume: {path} does not hold this reference's share of {name} (another model or "
                "ZeRO-3 partitioning: reference.name_or_path, reference.ds_config)"
            )
        share.copy_(saved[name])
        if hasattr(param, "ds_id") and param.data.numel():
            # a persisted or still-gathered parameter holds stale whole values: drop them, and the next
            # forward gathers the restored partitions
            param.partition(has_been_updated=False)
