"""Preference data: records -> tokenized pairs -> packed micro-batches (docs/design.md §1)."""

from hdpo_ds.data.packing import (
    IGNORE_INDEX,
    MicroBatchPlan,
    PackedBatch,
    PlanStats,
    StepPlan,
    collate,
    collate_sequences,
    plan_sequences,
    plan_stats,
    plan_step,
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
    "MicroBatchPlan",
    "PackedBatch",
    "PairSampler",
    "PlanStats",
    "PreferenceRecord",
    "StepAssignment",
    "StepPlan",
    "TokenizeResult",
    "TokenizedPair",
    "TokenizedPairs",
    "collate",
    "collate_sequences",
    "encode_prompt",
    "load_records",
    "normalise_record",
    "plan_sequences",
    "plan_stats",
    "plan_step",
    "resolve_chat_template",
    "tokenize_pairs",
    "tokenizer_fingerprint",
]
