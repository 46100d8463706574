"""Where the reference log-probs come from: a reference engine, the policy's engine with its LoRA
adapters disabled, or the Arrow cache.

All three answer the same question for a packed micro-batch: the reference's summed log-prob of
each sequence's response tokens, shape (num_seqs,). The trainer does not care which one it holds.
The cache fingerprint (what the cached values depend on) is built here too, so that precompute and
training derive it the same way.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from hdpo_ds.config import Config
from hdpo_ds.data.packing import IGNORE_INDEX, PackedBatch
from hdpo_ds.objectives.logprobs import SegmentSums, segment_sums, token_logps
from hdpo_ds.reference.cache import CACHE_FORMAT_VERSION, RefCache, RefCacheError, file_sha256
from hdpo_ds.runtime import lora, sequence_parallel
from hdpo_ds.runtime.fused_head import reference_head_inputs, reference_token_logps

__all__ = [
    "AdaptersOffReference",
    "CachedReference",
    "OnlineReference",
    "pair_sequence_indices",
    "reference_fingerprint",
]

_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


def pair_sequence_indices(batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence indices of each pair's chosen and rejected sequence, in pair order: (num_pairs,) each."""
    seqs = torch.arange(batch.num_seqs, device=batch.pair_index.device)
    chosen = torch.empty(batch.num_pairs, dtype=torch.long, device=seqs.device)
    rejected = torch.empty_like(chosen)
    chosen[batch.pair_index[batch.is_chosen]] = seqs[batch.is_chosen]
    rejected[batch.pair_index[~batch.is_chosen]] = seqs[~batch.is_chosen]
    return chosen, rejected


@dataclass
class OnlineReference:
    """The reference engine (DeepSpeed, no optimizer, eval mode) run on each micro-batch."""

    engine: torch.nn.Module
    chunk_size: int
    fused_head: bool = False  # sequence sums from hidden states, never the logits (runtime/fused_head.py)

    @torch.no_grad()
    def logits(self, batch: PackedBatch) -> torch.Tensor:
        if sequence_parallel.layout().size > 1:  # TDPO's full logits; refused at start-up
            raise RuntimeError("the reference's logits are not gathered under train.sequence_parallel")
        return self.engine(**batch.model_inputs()).logits

    @torch.no_grad()
    def sums_from_logits(
        self, logits: torch.Tensor, batch: PackedBatch, dtype=torch.float32, token_weights=None
    ) -> SegmentSums:
        """Per-sequence sums of the response tokens' log-probs; `token_weights` (shaped like the labels,
        e.g. LD-DPO's, objectives/modifiers.py) weigh each token's log-prob in its sum."""
        tokens = token_logps(logits, batch.labels, chunk_size=self.chunk_size)
        return self._sums(tokens, batch, dtype, token_weights)

    @torch.no_grad()
    def token_logps(self, batch: PackedBatch) -> torch.Tensor:
        """The reference's log-prob of each label, (B, L) like `batch.labels` (0 where there is none).
        Under sequence parallelism each rank forwards its slice of the row and the slices are gathered."""
        layout = sequence_parallel.layout()
        local = layout.shard(batch)
        if self.fused_head:
            tokens = reference_token_logps(
                self.engine.module, local.model_inputs(), local.labels, chunk_size=self.chunk_size
            )
        else:
            logits = self.engine(**local.model_inputs()).logits
            tokens = token_logps(logits, local.labels, chunk_size=self.chunk_size)
        return layout.gather(tokens)

    def sequence_sums(
        self, batch: PackedBatch, dtype: torch.dtype = torch.float32, token_weights=None
    ) -> SegmentSums:
        return self._sums(self.token_logps(batch), batch, dtype, token_weights)

    @staticmethod
    def _sums(tokens: torch.Tensor, batch: PackedBatch, dtype, token_weights) -> SegmentSums:
        if token_weights is not None:
            tokens = tokens * token_weights
        return segment_sums(tokens, batch.seq_index, batch.num_seqs, mask=batch.labels != -100, dtype=dtype)

    def sequence_logps(self, batch: PackedBatch, token_weights: torch.Tensor | None = None) -> torch.Tensor:
        return self.sequence_sums(batch, token_weights=token_weights).sums

    def head_inputs(self, batch: PackedBatch) -> tuple:
        """TDPO's share of the fused head: the reference's hidden states and a copy of its output
        embedding (runtime/fused_head.py reference_head_inputs), in place of its logits."""
        return reference_head_inputs(self.engine.module, batch.model_inputs())


@dataclass
class AdaptersOffReference:
    """reference.source: adapters_off. The policy's own engine with every LoRA adapter disabled
    (runtime/lora.py `adapters_disabled`: no_grad, eval mode), i.e. the frozen base model: no second
    model, no second engine. With model.lora.init_adapter the reference is the base without any adapter.
    Every rank runs it on every micro-batch, as it runs the policy (ZeRO-3 gathers collectively)."""

    online: OnlineReference  # holds the policy engine, the chunk size and whether the fused head applies

    @property
    def fused_head(self) -> bool:
        return self.online.fused_head

    def logits(self, batch: PackedBatch) -> torch.Tensor:
        with lora.adapters_disabled(self.online.engine):
            return self.online.logits(batch)

    def sums_from_logits(
        self, logits: torch.Tensor, batch: PackedBatch, dtype=torch.float32, token_weights=None
    ) -> SegmentSums:
        return self.online.sums_from_logits(logits, batch, dtype=dtype, token_weights=token_weights)

    def sequence_sums(
        self, batch: PackedBatch, dtype: torch.dtype = torch.float32, token_weights=None
    ) -> SegmentSums:
        with lora.adapters_disabled(self.online.engine):
            return self.online.sequence_sums(batch, dtype=dtype, token_weights=token_weights)

    def sequence_logps(self, batch: PackedBatch, token_weights: torch.Tensor | None = None) -> torch.Tensor:
        return self.sequence_sums(batch, token_weights=token_weights).sums

    def head_inputs(self, batch: PackedBatch) -> tuple:
        """TDPO's fused pass: the base model's hidden states and output embedding, adapters disabled."""
        with lora.adapters_disabled(self.online.engine):
            return self.online.head_inputs(batch)


@dataclass
class CachedReference:
    """Values looked up by pair id in a validated cache: no reference forward at all."""

    cache: RefCache
    device: torch.device

    def sequence_logps(self, batch: PackedBatch, token_weights: torch.Tensor | None = None) -> torch.Tensor:
        """(num_seqs,) float32 on self.device. The cache's response token counts are checked against the
        batch's first (a mismatch raises RefCacheError naming the pair): the values are never used for
        other sequences than the ones they were computed on. The cache holds plain sums only: per-token
        weights (loss.ld_alpha, refused with a cached reference at config load) cannot apply."""
        if token_weights is not None:
            raise RefCacheError("the reference cache holds plain sequence sums: it cannot weigh tokens")
        rows = self.cache.rows_of(batch.pair_ids)
        if (rows < 0).any():  # check_covers ran at start-up: only a batch from other data gets here
            missing = [batch.pair_ids[j] for j in np.flatnonzero(rows < 0)[:5]]
            raise RefCacheError(f"reference cache {self.cache.path} has no values for pair(s) {missing}")
        chosen, rejected = (idx.cpu() for idx in pair_sequence_indices(batch))
        labelled = batch.labels.cpu() != IGNORE_INDEX  # host sync: one per micro-batch
        counts = torch.bincount(batch.seq_index.cpu()[labelled], minlength=batch.num_seqs).numpy()
        sides = (
            ("chosen", chosen, self.cache.chosen_tokens),
            ("rejected", rejected, self.cache.rejected_tokens),
        )
        for side, seqs, stored in sides:
            mismatch = np.flatnonzero(counts[seqs.numpy()] != stored[rows])
            if mismatch.size:
                j = int(mismatch[0])
                raise RefCacheError(
                    f"pair {batch.pair_ids[j]}: the batch has {counts[seqs[j]]} {side} response tokens, the "
                    f"reference cache {self.cache.path} stored {stored[rows[j]]} (a stale cache, or one of "
                    "other data; rebuild it)"
                )
        out = torch.empty(batch.num_seqs, dtype=torch.float32)
        out[chosen] = torch.from_numpy(self.cache.chosen[rows]).float()
        out[rejected] = torch.from_numpy(self.cache.rejected[rows]).float()
        return out.to(self.device)


# What transformers loads, in its order of preference: safetensors before pickled weights.
_WEIGHT_INDEXES = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def loaded_weight_files(directory: str) -> list[str]:
    """The weight files `from_pretrained` reads from `directory` (an index and its shards, or the one
    file), so a snapshot holding both .safetensors and .bin copies is hashed once, as loaded. Folders
    of another layout fall back to every file of the known weight formats."""
    for index_name, single_name in _WEIGHT_INDEXES:
        index = os.path.join(directory, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [index, *(os.path.join(directory, shard) for shard in shards)]
        if os.path.isfile(os.path.join(directory, single_name)):
            return [os.path.join(directory, single_name)]
    return sorted({f for pattern in _WEIGHT_PATTERNS for f in glob.glob(os.path.join(directory, pattern))})


def model_identity(cfg: Config) -> dict:
    """Path, config hash and weight-file hash of the reference model (sha256 over the files' bytes)."""
    path = given = cfg.reference.name_or_path or cfg.model.name_or_path
    # A local model is named by its resolved path, so "model", "./model" and /abs/model are one model;
    # a hub id stays the id (its snapshot path carries the revision, which the weights hash covers).
    name = os.path.realpath(given) if os.path.exists(given) else given
    if not os.path.exists(path):
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, local_files_only=True)
    directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
    config_file = os.path.join(directory, "config.json")
    identity = {
        "reference.model": name,
        "reference.config_sha256": file_sha256(config_file),
    }
    if cfg.model.from_scratch and not cfg.reference.name_or_path:
        identity["reference.weights"] = f"random init from config, train.seed={cfg.train.seed}"
        return identity
    files = loaded_weight_files(directory)
    digest = hashlib.sha256()
    for f in files:
        digest.update(os.path.basename(f).encode())
        digest.update(file_sha256(f).encode())
    identity["reference.weights_sha256"] = digest.hexdigest() if files else "no weight files"
    return identity


def reference_fingerprint(
    cfg: Config,
    *,
    data_fingerprint: str,
    tokenizer_fingerprint: str,
    dtype: torch.dtype,
    identity: dict | None = None,
) -> dict:
    """Everything the cached values depend on, as named entries (so a mismatch can say which).
    `identity`: `model_identity(cfg)` computed once for several splits (hashing weights is the slow part)."""
    return {
        "format": CACHE_FORMAT_VERSION,
        **(identity if identity is not None else model_identity(cfg)),
        "data": data_fingerprint,
        "tokenizer_and_template": tokenizer_fingerprint,
        "data.max_length": cfg.data.max_length,
        "data.max_prompt_length": cfg.data.max_prompt_length,
        "data.truncation": cfg.data.truncation,
        "data.on_bad_record": cfg.data.on_bad_record,
        "dtype": str(dtype).removeprefix("torch."),
    }


def versions_of_interest() -> dict:
    from hdpo_ds.common.versions import package_versions

    versions = package_versions()
    return {k: versions[k] for k in ("torch", "transformers", "deepspeed")}
