"""Preference data: records -> tokenized pairs -> packed micro-batches (docs/design.md §1)."""

from hdpo_ds.data.packing import (
    IGNORE_INDEX,
    MicroBatchPacking,
    PackedBatch,
    PackingStats,
    StepPacking,
    collate,
    collate_sequences,
    pack_sequences,
    pack_step,
    packing_stats,
    pad_row,
    sequence_shard,
)
from hdpo_ds.data.records import DataError, LoadResult, PreferenceRecord, load_records, normalise_record
from hdpo_ds.data.sampler import IndexedPairs, PairSampler, StepAssignment
from hdpo_ds.data.tokenize import (
    TokenizedPair,
    TokenizedPairs,
    TokenizeResult,
    encode_prompt,
    resolve_chat_template,
    tokenize_pairs,
    tokenizer_fingerprint,
)

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "IndexedPairs",
    "LoadResult",
    "MicroBatchPacking",
    "PackedBatch",
    "PackingStats",
    "PairSampler",
    "PreferenceRecord",
    "StepAssignment",
    "StepPacking",
    "TokenizeResult",
    "TokenizedPair",
    "TokenizedPairs",
    "collate",
    "collate_sequences",
    "encode_prompt",
    "load_records",
    "normalise_record",
    "pack_sequences",
    "pack_step",
    "packing_stats",
    "pad_row",
    "resolve_chat_template",
    "sequence_shard",
    "tokenize_pairs",
    "tokenizer_fingerprint",
]
