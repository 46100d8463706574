"""Packed vs padded micro-batches: forward + backward + AdamW throughput in real tokens/s, in one run.

The same long-tailed pairs (lognormal lengths capped at --max-length, like chat preference data) go through
a tiny Llama three ways, each with its own copy of the model and optimizer:

- packed: hdpo_ds.data.pack_step(packing=True), one row per micro-batch, position_ids restart per sequence;
- padded: pack_step(packing=False), one sequence per row padded to the longest, pairs grouped by length;
- padded, arrival order: micro-batches filled in sampling order until rows × longest reaches the budget
  (what a loader without packing or length grouping does);
- packed, per-sequence attention: the packed rows again, with attention computed sequence by sequence
  (sdpa, is_causal) through a bench-local transformers AttentionInterface instead of one dense
  block-diagonal mask over the row. Its cost is the sum of squared sequence lengths rather than the square
  of the row length; checked against the sdpa packed forward before timing.

All three use the same token budget per micro-batch (--budget, default 2 × max length). Optimizer steps of the
three modes are interleaved (step k of each mode, then step k + 1 ...), so background load on a shared
machine hits them alike. Real tokens are non-padding tokens. Usage:

    .venv/bin/python bench/packing.py [--pairs 256] [--pairs-per-step 64] [--threads 2]
    .venv/bin/python bench/packing.py --packing-only     # the packing tables alone (fill, the L2 lower bound)

It first prints two packing tables only: the fill by step size and world size, and, on one rank,
the planner's micro-batch count against Martello and Toth's L2 lower bound
(hdpo_ds.data.packing.lower_bound_micro_batches) and best-fit decreasing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from hdpo_ds.data import IGNORE_INDEX, MicroBatchPacking, TokenizedPair, collate, pack_step, packing_stats
from hdpo_ds.data.packing import lower_bound_micro_batches

PER_SEQUENCE = "per_sequence_sdpa"


def per_sequence_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Causal sdpa on each sequence of a packed row (B == 1); sequences start where position_ids are 0.
    query (1, H, L, D), key/value (1, H_kv, L, D) -> (1, L, H, D), as transformers' attention functions."""
    starts = [*torch.nonzero(kwargs["position_ids"][0] == 0)[:, 0].tolist(), query.shape[2]]  # host sync
    gqa = query.shape[1] != key.shape[1]
    out = torch.cat(
        [
            F.scaled_dot_product_attention(
                query[:, :, s:e],
                key[:, :, s:e],
                value[:, :, s:e],
                is_causal=True,
                scale=scaling,
                enable_gqa=gqa,
            )
            for s, e in itertools.pairwise(starts)
        ],
        dim=2,
    )
    return out.transpose(1, 2).contiguous(), None


def register_per_sequence_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(PER_SEQUENCE, per_sequence_attention)
    # No mask at all: the function finds the sequences from position_ids.
    ALL_MASK_ATTENTION_FUNCTIONS.register(PER_SEQUENCE, lambda *args, **kwargs: None)


def lognormal_lengths(num_pairs: int, max_length: int, rng: np.random.Generator) -> np.ndarray:
    """(num_pairs, 3) token counts: a shared prompt (median 60, at most max_length / 2) and two responses
    (median 120), lognormal with sigma 0.8, each response cut so that prompt + response <= max_length."""
    prompt = np.minimum(np.ceil(rng.lognormal(np.log(60), 0.8, num_pairs)), max_length // 2).astype(np.int64)
    responses = np.ceil(rng.lognormal(np.log(120), 0.8, (num_pairs, 2))).astype(np.int64)
    return np.concatenate([prompt[:, None], np.minimum(responses, max_length - prompt[:, None])], axis=1)


def lognormal_pairs(num_pairs: int, vocab: int, max_length: int, seed: int) -> list[TokenizedPair]:
    """Pairs of random token ids whose lengths follow lognormal_lengths (drawn pair by pair)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(num_pairs):
        prompt_len = min(int(np.ceil(rng.lognormal(np.log(60), 0.8))), max_length // 2)
        responses = []
        for _ in range(2):
            n = int(np.ceil(rng.lognormal(np.log(120), 0.8)))
            responses.append(rng.integers(3, vocab, min(n, max_length - prompt_len)).tolist())
        pairs.append(
            TokenizedPair(f"p{i}", rng.integers(3, vocab, prompt_len).tolist(), *responses, False, False)
        )
    return pairs


def fill_table(args) -> None:
    """Packing fill (fillers included) on random steps of lognormal pairs, by step size and world size."""
    rng = np.random.default_rng(args.seed)
    print(f"## packing fill over {args.fill_steps} random steps, budget {args.budget} (min / mean)")
    print(
        "| pairs per step | world size | packed fill | padded fill (length-grouped) "
        "| padded padding fraction |"
    )
    print("|---|---|---|---|---|")
    for pairs_per_step in (256, 512):
        for world_size in range(1, 9):
            packed, padded, padding = [], [], []
            for _ in range(args.fill_steps):
                counts = lognormal_lengths(pairs_per_step, args.max_length, rng)
                lengths = counts[:, :1] + counts[:, 1:]
                for packing, out in ((True, packed), (False, padded)):
                    stats = packing_stats(
                        pack_step(
                            lengths,
                            world_size=world_size,
                            max_tokens_per_micro_batch=args.budget,
                            packing=packing,
                        )
                    )
                    out.append(stats.fill)
                    if not packing:
                        padding.append(stats.padding_fraction)
            print(
                f"| {pairs_per_step} | {world_size} | {min(packed):.3f} / {np.mean(packed):.3f} | "
                f"{min(padded):.3f} / {np.mean(padded):.3f} | {np.mean(padding):.3f} |"
            )


def best_fit_decreasing(sizes: list[int], budget: int) -> int:
    """Micro-batches that classic best-fit decreasing needs (bench-local, independent of the planner)."""
    free: list[int] = []
    for size in sorted(sizes, reverse=True):
        fitting = [b for b, room in enumerate(free) if room >= size]
        if fitting:
            b = min(fitting, key=lambda b: free[b])
            free[b] -= size
        else:
            free.append(budget - size)
    return len(free)


def bound_table(args) -> None:
    """One rank: the planner's micro-batches against Martello and Toth's L2 lower bound and best-fit
    decreasing, on --bound-steps random steps of 64 to 256 lognormal pairs."""
    rng = np.random.default_rng(args.seed + 2)
    print(f"## packed micro-batches on one rank against the L2 lower bound, budget {args.budget}")
    print("| pairs | sum / budget (L1) | L2 lower bound | planner | best-fit decreasing | planner - L2 |")
    print("|---|---|---|---|---|---|")
    gaps, over_bfd = [], 0
    for pairs in np.linspace(64, 256, args.bound_steps).astype(int):
        counts = lognormal_lengths(int(pairs), args.max_length, rng)
        lengths = counts[:, :1] + counts[:, 1:]
        sizes = [int(x) for x in lengths.sum(axis=1)]
        packed = pack_step(lengths, world_size=1, max_tokens_per_micro_batch=args.budget)
        used, bound = len(packed.ranks[0]), lower_bound_micro_batches(sizes, args.budget)
        bfd = best_fit_decreasing(sizes, args.budget)
        gaps.append(used - bound)
        over_bfd += used > bfd
        print(f"| {pairs} | {-(-sum(sizes) // args.budget)} | {bound} | {used} | {bfd} | {used - bound} |")
    summary = f"# planner - L2: {min(gaps)} to {max(gaps)} micro-batches; steps where the planner needs more"
    print(f"{summary} than best-fit decreasing: {over_bfd} of {len(gaps)}")


def arrival_order_plan(lengths: np.ndarray, budget: int) -> list[MicroBatchPacking]:
    """Padded micro-batches in sampling order: add pairs while 2 × pairs × longest fits the budget."""
    mbs, current, width = [], [], 0
    for i, (c, r) in enumerate(lengths.tolist()):
        w = max(width, c, r)
        if current and 2 * (len(current) + 1) * w > budget:
            mbs.append(current)
            current, w = [], max(c, r)
        current.append(i)
        width = w
    mbs.append(current)
    packings = []
    for members in mbs:
        tokens = int(lengths[members].sum())
        packings.append(
            MicroBatchPacking(tuple(members), False, tokens, 2 * len(members) * int(lengths[members].max()))
        )
    return packings


def build_model(args, seed: int, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        intermediate_size=3 * args.hidden,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.budget, args.max_length),
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def run_step(model, optimizer, pairs, micro_batches, packing: bool) -> int:
    """One optimizer step of a DPO-shaped loss (reference log-probs 0). Returns the real tokens processed."""
    num_pairs = sum(len(mb.pairs) for mb in micro_batches)
    real = 0
    for mb in micro_batches:
        batch = collate(pairs, mb, pad_token_id=0, packing=packing)
        logits = model(**batch.model_inputs()).logits
        logps = torch.log_softmax(logits.float(), dim=-1)
        mask = batch.labels != IGNORE_INDEX
        token_logps = torch.where(mask, logps.gather(-1, batch.labels.clamp(min=0)[..., None])[..., 0], 0.0)
        seq = torch.zeros(batch.num_seqs).index_add(0, batch.seq_index[mask], token_logps[mask])
        margin = seq[batch.is_chosen] - seq[~batch.is_chosen]
        loss = -F.logsigmoid(0.1 * margin).sum() / num_pairs
        loss.backward()
        real += batch.num_real_tokens
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return real


def check_per_sequence_attention(args, pairs, micro_batch: MicroBatchPacking) -> None:
    """The per-sequence attention must give the packed sdpa forward's logits before its speed counts."""
    batch = collate(pairs, micro_batch, pad_token_id=0, packing=True)
    with torch.no_grad():
        reference = build_model(args, args.seed, args.attn)[0](**batch.model_inputs()).logits
        candidate = build_model(args, args.seed, PER_SEQUENCE)[0](**batch.model_inputs()).logits
    torch.testing.assert_close(candidate, reference, rtol=1e-4, atol=1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--pairs-per-step", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument(
        "--budget", type=int, default=None, help="tokens per micro-batch (default 2 × max length)"
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fill-steps", type=int, default=20, help="random steps per row of the fill table")
    parser.add_argument("--bound-steps", type=int, default=15, help="steps of the lower-bound table")
    parser.add_argument(
        "--packing-only", action="store_true", help="only the packing tables: no model, no timing"
    )
    args = parser.parse_args()
    args.budget = args.budget or 2 * args.max_length
    torch.set_num_threads(args.threads)
    load_before = _load_average()
    fill_table(args)
    bound_table(args)
    if args.packing_only:
        return

    pairs = lognormal_pairs(args.pairs, args.vocab, args.max_length, args.seed)
    lengths = np.array([[p.chosen_length, p.rejected_length] for p in pairs])
    perm = np.random.default_rng(args.seed + 1).permutation(len(pairs))
    steps = [perm[s : s + args.pairs_per_step] for s in range(0, len(perm), args.pairs_per_step)]

    modes = {}
    variants = (
        ("packed", True, args.attn),
        ("padded", False, args.attn),
        ("padded, arrival order", False, args.attn),
        ("packed, per-sequence attention", True, PER_SEQUENCE),
    )
    for name, packing, attn in variants:
        packings = []
        for idx in steps:
            if name == "padded, arrival order":
                mbs = arrival_order_plan(lengths[idx], args.budget)
            else:
                mbs = pack_step(
                    lengths[idx], world_size=1, max_tokens_per_micro_batch=args.budget, packing=packing
                )
                mbs = list(mbs.ranks[0])
            packings.append(mbs)
        mbs_all = [mb for step in packings for mb in step]
        tensor = sum(mb.tensor_tokens for mb in mbs_all)
        real = sum(mb.tokens for mb in mbs_all)
        modes[name] = {
            "packing": packing,
            "attn": attn,
            "packings": packings,
            "micro_batches": len(mbs_all),
            "fill": real / (len(mbs_all) * args.budget),
            "padding_fraction": (tensor - real) / tensor,
        }
    if packing_stats(
        pack_step(lengths, world_size=1, max_tokens_per_micro_batch=args.budget)
    ).real_tokens != int(lengths.sum()):
        raise AssertionError("packing lost tokens")
    register_per_sequence_attention()
    check_per_sequence_attention(args, [pairs[i] for i in steps[0]], modes["packed"]["packings"][0][0])

    for mode in modes.values():
        model, optimizer = build_model(args, args.seed, mode["attn"])
        mode.update(model=model, optimizer=optimizer, seconds=0.0, tokens=0)
        step_pairs = [pairs[i] for i in steps[0]]
        run_step(model, optimizer, step_pairs, mode["packings"][0][:1], mode["packing"])  # warm-up, untimed

    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for k, idx in enumerate(steps):
        step_pairs = [pairs[i] for i in idx]
        for mode in modes.values():
            start = time.perf_counter()
            mode["tokens"] += run_step(
                mode["model"], mode["optimizer"], step_pairs, mode["packings"][k], mode["packing"]
            )
            mode["seconds"] += time.perf_counter() - start

    cpu_per_wall = (time.process_time() - cpu_start) / (time.perf_counter() - wall_start)
    params = sum(p.numel() for p in modes["packed"]["model"].parameters())
    packed_rate = modes["packed"]["tokens"] / modes["packed"]["seconds"]
    print(
        f"# {args.pairs} pairs ({int(lengths.sum())} real tokens), steps of {args.pairs_per_step} pairs, "
        f"budget {args.budget} tokens/micro-batch, Llama {params / 1e6:.1f}M params ({args.layers} layers, "
        f"hidden {args.hidden}, vocab {args.vocab}), {args.attn}, fp32, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    print("| mode | micro-batches | fill | padding | seconds | real tokens/s | packed speed-up |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for name, mode in modes.items():
        rate = mode["tokens"] / mode["seconds"]
        results[name] = {
            k: mode[k] for k in ("micro_batches", "fill", "padding_fraction", "seconds", "tokens")
        }
        results[name]["tokens_per_s"] = rate
        print(
            f"| {name} | {mode['micro_batches']} | {mode['fill']:.3f} | {mode['padding_fraction']:.3f} | "
            f"{mode['seconds']:.1f} | {rate:,.0f} | {packed_rate / rate:.2f}× |"
        )
    # Another busy process skews the ratios (small micro-batches suffer most): check these before
    # trusting them.
    print(
        f"# 1-minute load average before {load_before}, after {_load_average()}; process CPU time / wall "
        f"time {cpu_per_wall:.2f} (about {args.threads} when nothing else competes for the cores)"
    )
    print(json.dumps({"args": vars(args), "results": results, "cpu_per_wall": cpu_per_wall}))


def _load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "n/a"


if __name__ == "__main__":
    main()
