"""The offline reference pass: the reference model's per-pair log-probs, written to the Arrow cache.

    deepspeed launch/precompute_ref.py --ds ds_configs/zero3_infer.json --config run.yaml

All ranks run the reference (ZeRO-3 inference) over the same tokenized pairs as training, shard by
shard: each shard's pairs are packed for the world size (every rank runs the same number of
forwards, fillers included; under train.sequence_parallel for the groups, each rank forwarding its
slice), the per-pair sums (float64) are gathered to rank 0, which writes the shard atomically. A
killed precompute resumes at the first shard that is not complete; the manifest is written last, so an
unfinished cache is never read. Fault injection for tests: HDPO_FAULT_EXIT_AFTER_SHARDS=N makes every
rank exit (code 17) right after the N-th shard this process wrote.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil

import numpy as np
import torch

from hdpo_ds.config import Config, ConfigError
from hdpo_ds.data import IndexedPairs, collate, pack_step
from hdpo_ds.objectives.losses import TDPO_LOSS_TYPES
from hdpo_ds.objectives.reference_free import REFERENCE_FREE_LOSS_TYPES
from hdpo_ds.recipes.splits import Split, check_data_options, prepare_split, split_sources
from hdpo_ds.reference.cache import (
    RefCache,
    RefCacheError,
    cache_status,
    file_sha256,
    read_manifest,
    read_shard,
    shard_path,
    write_manifest,
    write_shard,
)
from hdpo_ds.reference.sources import (
    OnlineReference,
    model_identity,
    pair_sequence_indices,
    reference_fingerprint,
    versions_of_interest,
)
from hdpo_ds.runtime import dist, engine, sequence_parallel
from hdpo_ds.runtime.fused_head import use_fused_head
from hdpo_ds.runtime.models import check_model_source, load_model, load_model_config, load_tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "FAULT_ENV",
    "clear_cache",
    "ensure_reference_caches",
    "free_reference",
    "precompute_split",
    "run_precompute",
]

FAULT_ENV = "HDPO_FAULT_EXIT_AFTER_SHARDS"


def _valid_shard(path: str, fingerprint: dict, expected_ids: list[str]) -> str | None:
    """The shard's sha256 when it is complete and belongs to this cache, else None."""
    try:
        table = read_shard(path)
    except RefCacheError as e:
        logger.warning("discarding reference cache shard: %s", e)
        return None
    meta = table.schema.metadata or {}
    if json.loads(meta.get(b"hdpo_ds.fingerprint", b"{}")) != fingerprint:
        logger.warning("discarding reference cache shard %s: computed for another fingerprint", path)
        return None
    if table.column("id").to_pylist() != expected_ids:
        logger.warning("discarding reference cache shard %s: its pairs are not this shard's", path)
        return None
    return file_sha256(path)


def clear_cache(cache_dir: str) -> None:
    """Remove a cache directory's manifest and shards (rank 0; for a stale cache being rebuilt)."""
    if os.path.isdir(cache_dir):
        shutil.rmtree(cache_dir)


def precompute_split(
    cfg: Config,
    split: Split,
    reference: OnlineReference,
    cache_dir: str,
    fingerprint: dict,
    versions: dict,
    *,
    pad_token_id: int,
    device: torch.device,
) -> None:
    """Compute and write one split's cache; collective (every rank calls it with the same arguments)."""
    pairs = split.data.pairs
    ids = pairs.id_array  # Arrow: a shard's ids are read when it is checked or written
    lengths = pairs.lengths
    shard_pairs = cfg.reference.shard_pairs
    num_shards = -(-len(ids) // shard_pairs)
    layout = sequence_parallel.layout()  # a sequence-parallel group shares each micro-batch
    world, rank = layout.data_size, layout.data_rank

    # Rank 0 decides which shards are already complete; everybody follows that one decision.
    done: dict[int, str] = {}
    if dist.is_main_process():
        os.makedirs(cache_dir, exist_ok=True)
        if read_manifest(cache_dir) is not None:
            raise RefCacheError(f"{cache_dir} already holds a complete cache; clear it before recomputing")
        for k in range(num_shards):
            path = shard_path(cache_dir, k)
            if os.path.isfile(path):
                shard_ids = ids.slice(k * shard_pairs, shard_pairs).to_pylist()
                sha = _valid_shard(path, fingerprint, shard_ids)
                if sha is None:
                    os.remove(path)
                else:
                    done[k] = sha
        if done:
            logger.info(
                "reference cache %s: resuming, %d of %d shards already complete",
                cache_dir,
                len(done),
                num_shards,
            )
    done = dist.broadcast_object(done)

    written_here = 0
    fault_after = int(os.environ.get(FAULT_ENV, "0") or 0)
    for k in range(num_shards):
        if k in done:
            continue
        positions = np.arange(k * shard_pairs, min((k + 1) * shard_pairs, len(ids)))
        packed = pack_step(
            lengths[positions],
            world_size=world,
            max_tokens_per_micro_batch=cfg.data.max_tokens_per_micro_batch * layout.size,
            packing=cfg.data.packing,
            multiple_of=layout.size,
        )
        view = IndexedPairs(pairs, positions)
        local = []
        for mb in packed.for_rank(rank):
            batch = collate(
                view, mb, pad_token_id=pad_token_id, packing=cfg.data.packing, multiple_of=layout.size
            ).to(device)
            sums = reference.sequence_sums(batch, dtype=torch.float64)  # every rank runs it, fillers too
            if mb.filler or not layout.reports:  # a group's ranks hold the same sums: its first writes them
                continue
            chosen, rejected = pair_sequence_indices(batch)
            values = sums.sums.cpu()
            counts = sums.counts.cpu()
            for j, pos in enumerate(mb.pairs):
                local.append(
                    (
                        int(pos),
                        float(values[chosen[j]]),
                        float(values[rejected[j]]),
                        int(counts[chosen[j]]),
                        int(counts[rejected[j]]),
                    )
                )
        gathered = dist.gather_objects(local)
        if dist.is_main_process():
            rows = sorted(row for part in gathered for row in part)
            if [r[0] for r in rows] != list(range(len(positions))):
                raise RuntimeError(f"reference pass of shard {k} covered pairs {[r[0] for r in rows]}")
            columns = {
                "id": ids.take(positions[[r[0] for r in rows]]).to_pylist(),
                "ref_chosen_logps": [r[1] for r in rows],
                "ref_rejected_logps": [r[2] for r in rows],
                "chosen_tokens": [r[3] for r in rows],
                "rejected_tokens": [r[4] for r in rows],
            }
            done[k] = write_shard(cache_dir, k, columns, fingerprint)
        dist.barrier()
        written_here += 1
        if fault_after and written_here >= fault_after:
            logger.warning("%s=%d: exiting after shard %d on purpose", FAULT_ENV, fault_after, k)
            os._exit(17)

    if dist.is_main_process():
        shards = [
            {
                "file": os.path.basename(shard_path(cache_dir, k)),
                "sha256": done[k],
                "rows": min(shard_pairs, len(ids) - k * shard_pairs),
            }
            for k in range(num_shards)
        ]
        write_manifest(cache_dir, fingerprint, versions, shards, len(ids))
        logger.info("reference cache %s: %d pairs in %d shard(s)", cache_dir, len(ids), num_shards)
    dist.barrier()


def cache_root(cfg: Config) -> str:
    return cfg.reference.cache_path or os.path.join(cfg.output_dir, "reference_cache")


def load_reference_engine(cfg: Config, ref_ds: dict, dtype: torch.dtype, device_type: str) -> OnlineReference:
    """The reference model in a DeepSpeed engine without optimizer (built inside zero.Init under ZeRO-3)."""
    handle = engine.zero3_loading(ref_ds)
    model = load_model(
        cfg.model,
        dtype=dtype,
        device_type=device_type,
        seed=cfg.train.seed,
        name_or_path=cfg.reference.name_or_path or None,
        for_training=False,
        packing=cfg.data.packing,
    ).model
    engine.mark_moe_leaves(model, ref_ds, cfg.model.moe_leaf_modules)
    ref_engine = engine.build_reference_engine(model, ref_ds)
    del handle
    # TDPO never asks the engine for sums: its reference head runs in the policy's fused pass
    fused = use_fused_head(cfg.train.fused_head, model.config) and cfg.loss.type not in TDPO_LOSS_TYPES
    if fused and dist.is_main_process():
        logger.info("reference: log-probs through the fused head (train.fused_head), no logits")
    return OnlineReference(ref_engine, cfg.train.logits_chunk_size, fused_head=fused)


def _split_fingerprints(cfg: Config, splits: dict[str, Split], dtype: torch.dtype) -> dict[str, dict]:
    """Every split's cache fingerprint; the model's weight files are hashed once for all of them."""
    identity = model_identity(cfg)
    return {
        name: reference_fingerprint(
            cfg,
            data_fingerprint=split.records.fingerprint,
            tokenizer_fingerprint=split.tokenizer_fingerprint,
            dtype=dtype,
            identity=identity,
        )
        for name, split in splits.items()
    }


def free_reference(reference: OnlineReference) -> None:
    """Give back a reference engine's memory before training allocates its own: DeepSpeed's destroy()
    (optimizer-free here, but hooks, buffers and partitions hang off the engine), then the garbage
    collector and, on CUDA, the caching allocator. `reference` holds no engine afterwards."""
    destroy = getattr(reference.engine, "destroy", None)
    if destroy is not None:
        destroy()
    reference.engine = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def ensure_reference_caches(
    cfg: Config,
    splits: dict[str, Split],
    *,
    ref_ds: dict,
    dtype: torch.dtype,
    device_type: str,
    device: torch.device,
    pad_token_id: int,
    compute_missing: bool,
    reference: OnlineReference | None = None,
) -> tuple[dict[str, RefCache], dict[str, str]]:
    """Validated caches for every split, computing missing (and, with reference.rebuild_stale, stale)
    ones first when `compute_missing`. Returns the caches and what happened to each split
    ("reused", "computed", "rebuilt"). Collective."""
    root = cache_root(cfg)
    versions = versions_of_interest()
    # Hashing the weight files is the slow part: the main process does it once for everybody.
    fingerprints = dist.broadcast_object(
        _split_fingerprints(cfg, splits, dtype) if dist.is_main_process() else None
    )
    statuses = dist.broadcast_object(
        {name: cache_status(os.path.join(root, name), fingerprints[name]) for name in splits}
        if dist.is_main_process()
        else None
    )
    actions: dict[str, str] = {}
    for name, (status, differences) in statuses.items():
        where = os.path.join(root, name)
        if status == "ok":
            actions[name] = "reused"
        elif status == "stale" and not (cfg.reference.rebuild_stale and compute_missing):
            advice = (
                "set reference.rebuild_stale=true to rebuild it"
                if compute_missing
                else "recompute it with launch/precompute_ref.py reference.rebuild_stale=true, or train with "
                "reference.mode=auto reference.rebuild_stale=true"
            )
            raise RefCacheError(
                f"the reference cache at {where} is stale ({advice}):\n  " + "\n  ".join(differences)
            )
        elif not compute_missing:
            raise RefCacheError(
                f"no reference cache at {where}: run launch/precompute_ref.py first, or use "
                "reference.mode=auto"
            )
        else:
            actions[name] = "rebuilt" if status == "stale" else "computed"
    todo = [name for name, action in actions.items() if action != "reused"]
    if todo:
        built_here = reference is None
        ref = reference or load_reference_engine(cfg, ref_ds, dtype, device_type)
        for name in todo:
            where = os.path.join(root, name)
            if actions[name] == "rebuilt":
                logger.warning(
                    "reference cache %s is stale; rebuilding it (reference.rebuild_stale=true): %s",
                    where,
                    "; ".join(statuses[name][1]),
                )
                if dist.is_main_process():
                    clear_cache(where)
                dist.barrier()
            precompute_split(
                cfg,
                splits[name],
                ref,
                where,
                fingerprints[name],
                versions,
                pad_token_id=pad_token_id,
                device=device,
            )
        if built_here:
            free_reference(ref)
        del ref
    caches = {name: RefCache.load(os.path.join(root, name), fingerprints[name], versions) for name in splits}
    for name, cache in caches.items():
        cache.check_covers(splits[name].data.pairs.id_array)
    return caches, actions


def run_precompute(cfg: Config, ds_config_path: str) -> dict[str, str]:
    """The whole offline pass (launch/precompute_ref.py): data, reference engine, caches of every split.
    Its dtype is resolved from the --ds (inference) config; the cache fingerprint records it, so a training
    run in another dtype finds the cache stale rather than using it."""
    if cfg.loss.type in REFERENCE_FREE_LOSS_TYPES:
        raise ConfigError(
            f"loss.type: {cfg.loss.type} is reference-free: its training reads no reference, so there is "
            "no reference cache to precompute"
        )
    if cfg.loss.ld_alpha is not None:
        raise ConfigError(
            "loss.ld_alpha: LD-DPO weighs the reference's per-token log-probs by each pair's shorter "
            "length, and the cache holds one plain sum per sequence; its training runs the reference online"
        )
    infer_ds = engine.load_ds_config(ds_config_path)
    check_model_source(cfg.model)
    sequence_parallel.check_run(cfg, token_kl=False, reference=True, loss=cfg.loss.type)
    tokenizer = load_tokenizer(cfg.model)
    check_data_options(cfg)
    engine.init_distributed(cfg.train.dist_timeout_minutes)
    device_type, device = engine.device_type(), engine.current_device()
    dtype = engine.resolve_dtype(cfg, infer_ds)
    sequence_parallel.setup(cfg, device_type, dtype)
    splits = {name: prepare_split(cfg, name, tokenizer) for name in split_sources(cfg)}
    hidden = getattr(load_model_config(cfg.model), "hidden_size", None)
    ref_ds = engine.fill_ds_config(
        infer_ds,
        cfg,
        world_size=dist.world_size(),
        device_type=device_type,
        hidden_size=hidden,
        training=False,
        dtype=dtype,
    )
    _, actions = ensure_reference_caches(
        cfg,
        splits,
        ref_ds=ref_ds,
        dtype=dtype,
        device_type=device_type,
        device=device,
        pad_token_id=tokenizer.pad_token_id,
        compute_missing=True,
    )
    return actions
