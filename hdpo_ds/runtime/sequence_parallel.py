"""Ulysses sequence parallelism (train.sequence_parallel: N; docs/design.md §5 "Sequence parallelism").

Groups of N consecutive ranks share each micro-batch: its packed row is padded to a multiple of N and
cut into N equal slices, one per rank of the group (data/packing.py `pad_row`, `sequence_shard`); the
ranks' data-parallel index is rank // N. DeepSpeed's `UlyssesSPAttentionHF` wraps the model's attention
core: an all-to-all turns the sequence slices into head slices, so each rank attends over the whole row
for H / N heads, with the position_ids of the whole row (gathered in the group), from which the
per-sequence cores (`sdpa_packed`, `eager_packed`, flash-attn's varlen) find the packed sequences' starts.
The wrapper replaces the core for every model of the process (policy, reference, precompute engines).

Everything after the forward runs on the whole row: the per-token statistics of the slices are
all-gathered (`SequenceLayout.gather`, differentiable), so every rank of a group computes the same pair
losses; the backward of the gather sums the group's N identical losses, which the recipe's gradient
scale divides out (docs/design.md §5).
"""

from __future__ import annotations

import copy
import dataclasses
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from hdpo_ds.config import ConfigError
from hdpo_ds.data.packing import PackedBatch, sequence_shard
from hdpo_ds.objectives.logprobs import TokenStats
from hdpo_ds.runtime import dist
from hdpo_ds.runtime.attention import EAGER_PACKED, SDPA_PACKED, TORCH_VARLEN, select_attention
from hdpo_ds.runtime.models import load_model_config, moe_routing

__all__ = [
    "SEQUENCE_PARALLEL_ATTENTION",
    "SequenceLayout",
    "attention_shape",
    "check_heads",
    "check_layout",
    "check_run",
    "initialize",
    "layout",
    "setup",
]

# Attention cores that keep packed sequences apart from the gathered position_ids alone (Ulysses passes
# no mask). Plain sdpa (is_causal over the whole row) and eager (a mask of the local slice) would not.
SEQUENCE_PARALLEL_ATTENTION = frozenset({SDPA_PACKED, EAGER_PACKED, TORCH_VARLEN, "flash_attention_2"})


@dataclass(frozen=True)
class SequenceLayout:
    """This rank's place: `rank` within its group of `size`, the group's data-parallel index `data_rank`
    of `data_size`; `size` 1 (no sequence parallelism) makes every method the identity."""

    size: int = 1
    rank: int = 0
    data_rank: int = 0
    data_size: int = 1
    group: Any = None

    @property
    def reports(self) -> bool:
        """Whether this rank counts its group's pairs in metrics and caches (the group's first rank)."""
        return self.rank == 0

    def shard(self, batch: PackedBatch) -> PackedBatch:
        """This rank's slice of a packed micro-batch (its row padded to a multiple of `size`)."""
        return batch if self.size == 1 else sequence_shard(batch, self.size, self.rank)

    def gather(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """(B, L / size, ...) slices of the group -> (B, L, ...) in rank order, on every rank of the group.
        Differentiable: the backward hands each rank the sum over the group of its slice's gradients."""
        if self.size == 1 or tensor is None:
            return tensor
        return _GatherSequence.apply(tensor, self.group, self.rank, self.size)

    def gather_stats(self, stats: TokenStats) -> TokenStats:
        return TokenStats(*(self.gather(t) for t in stats))


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 1 within `group`; the backward all-reduces the whole gradient in the group and
    keeps this rank's slice. (torch.distributed.nn.functional.all_gather's backward on gloo scatters from
    global ranks and fails on a group that lacks rank 0: torch 2.13.)"""

    @staticmethod
    def forward(ctx, tensor, group, rank: int, size: int):
        ctx.group, ctx.rank, ctx.width = group, rank, tensor.shape[1]
        parts = [torch.empty_like(tensor) for _ in range(size)]
        tdist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        tdist.all_reduce(grad, group=ctx.group)
        return grad[:, ctx.rank * ctx.width : (ctx.rank + 1) * ctx.width], None, None, None


_layout = SequenceLayout()


def layout() -> SequenceLayout:
    """The process's layout (set once by `initialize`; size 1 before)."""
    return _layout


def attention_shape(config) -> tuple[int, int, int, int]:
    """(attention heads, key/value heads, head size, layers) of a model config: what Ulysses' all-to-all
    is built for, so every model the process runs must share it."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return heads, kv_heads, head_dim, text.num_hidden_layers


def check_heads(size: int, config, source: str) -> None:
    """Ulysses gives each rank heads / size query heads: refuse shapes it cannot split (ConfigError)."""
    heads, kv_heads, _, _ = attention_shape(config)
    if heads % size or (kv_heads % size and size % kv_heads):
        raise ConfigError(
            f"train.sequence_parallel: {size} must divide {source}'s {heads} attention heads, and its "
            f"{kv_heads} key/value heads must be a multiple or a divisor of it"
        )


def check_layout(size: int, attn: str, world: int) -> None:
    """The attention core and the world size a group of `size` ranks needs (ConfigError naming the key)."""
    if attn not in SEQUENCE_PARALLEL_ATTENTION:
        raise ConfigError(
            f"model.attn_implementation: {attn} cannot run under train.sequence_parallel ({size}): Ulysses "
            f"passes no attention mask, so packed sequences stay apart only with "
            f"{' or '.join(sorted(SEQUENCE_PARALLEL_ATTENTION))}"
        )
    if world % size:
        raise ConfigError(f"train.sequence_parallel: {size} does not divide the world size {world}")


def check_run(cfg, *, token_kl: bool, reference: bool, loss: str) -> None:
    """train.sequence_parallel > 1 for a run config: what the split does not carry is refused (ConfigError
    naming the key). `token_kl`: the loss reads a per-token KL (TDPO); `reference`: a reference model runs."""
    size = cfg.train.sequence_parallel
    if size == 1:
        return
    if token_kl:
        raise ConfigError(
            f"train.sequence_parallel: {size} gathers per-token statistics, not the per-token KL of "
            f"loss.type={loss} (TDPO); use train.sequence_parallel=1"
        )
    policy = load_model_config(cfg.model)
    if moe_routing(policy) is not None:
        raise ConfigError(
            f"train.sequence_parallel: {size} is not combined with a mixture of experts' router loss "
            f"({cfg.model.name_or_path}); use train.sequence_parallel=1"
        )
    check_heads(size, policy, "model.name_or_path")
    if cfg.reference.name_or_path and reference:
        other = load_model_config(dataclasses.replace(cfg.model, name_or_path=cfg.reference.name_or_path))
        mine, theirs = attention_shape(policy), attention_shape(other)
        if mine != theirs:
            raise ConfigError(
                f"reference.name_or_path: under train.sequence_parallel ({size}) the reference needs the "
                f"policy's attention shape (heads, key/value heads, head size, layers): {theirs} != {mine}"
            )


def initialize(size: int, model_config, attn: str, source: str = "the model") -> SequenceLayout:
    """Collective (every rank, after the process group exists): the groups and the Ulysses wrapper of the
    `attn` core, registered with transformers for every model of this process. Once per process."""
    global _layout
    world, rank = dist.world_size(), dist.rank()
    if _layout.size > 1:
        if _layout.size != size:
            raise RuntimeError(f"sequence parallelism is already set up with {_layout.size} ranks per group")
        return _layout
    if size == 1:
        _layout = SequenceLayout(1, 0, rank, world)
        return _layout
    check_layout(size, attn, world)
    check_heads(size, model_config, source)
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    config = copy.copy(model_config)
    config._attn_implementation = attn  # the core the wrapper intercepts; the models are built with it
    UlyssesSPAttentionHF.register_with_transformers(
        types.SimpleNamespace(config=config), attn, size, 1, seq_length_is_variable=True
    )
    group = parallel_state_sp.get_sequence_parallel_group()
    if tdist.get_rank(group) != rank % size:  # the layout data/packing.py and the recipe rely on
        raise RuntimeError(f"rank {rank}: DeepSpeed's sequence-parallel groups are not consecutive ranks")
    _layout = SequenceLayout(size, rank % size, rank // size, world // size, group)
    return _layout


def setup(cfg, device_type: str, dtype: torch.dtype | None = None) -> SequenceLayout:
    """`initialize` for a run config: train.sequence_parallel, and the attention core the policy is
    built with (runtime/models.py picks it the same way). Collective."""
    size = cfg.train.sequence_parallel
    if size == 1:
        return initialize(1, None, "")
    config = load_model_config(cfg.model)
    attn = select_attention(
        cfg.model.attn_implementation, device_type, config, packing=cfg.data.packing, dtype=dtype
    )
    return initialize(size, config, attn, source=cfg.model.name_or_path)
