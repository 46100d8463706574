"""A walkthrough of the loss family and the monitors on a tiny randomly initialised Llama.

    python -m hdpo_ds.walkthrough [--alpha 0.9] [--beta 0.1] [--steps 20]

It builds a 2-layer Llama from a config (no download), makes random preference pairs, and takes a few
SGD steps of H-DPO on the policy against a frozen copy as reference, printing per step the loss,
reward margin and accuracy and the token-level monitors, then every loss type on the final batch.
It is what `make demo` runs until the DeepSpeed trainer lands.
"""

from __future__ import annotations

import argparse
import copy

import torch

from hdpo_ds.logprobs import segment_sums, token_stats
from hdpo_ds.losses import LOSS_TYPES, preference_loss


def _tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _sequence_stats(model, input_ids, response_mask):
    """Summed response log-probs and mean monitors per row of `input_ids` (B, L)."""
    logits = model(input_ids=input_ids, use_cache=False).logits
    labels = input_ids[:, 1:].masked_fill(~response_mask[:, 1:], -100)
    stats = token_stats(logits[:, :-1], labels)
    rows = torch.arange(input_ids.shape[0]).unsqueeze(1).expand_as(labels)
    mask = labels != -100
    logps = segment_sums(stats.logps, rows, input_ids.shape[0], mask=mask)
    means = {
        name: segment_sums(getattr(stats, name), rows, input_ids.shape[0], mask=mask).sums / logps.counts
        for name in ("entropy", "topk_mass", "topk_entropy")
    }
    return logps.sums, logps.counts, means


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()

    torch.manual_seed(0)
    vocab, prompt_len, response_len = 64, 12, 10
    policy = _tiny_llama(vocab)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    prompts = torch.randint(0, vocab, (args.pairs, prompt_len))
    chosen = torch.cat([prompts, torch.randint(0, vocab // 2, (args.pairs, response_len))], dim=1)
    rejected = torch.cat([prompts, torch.randint(vocab // 2, vocab, (args.pairs, response_len))], dim=1)
    both = torch.cat([chosen, rejected])
    response_mask = torch.zeros_like(both, dtype=torch.bool)
    response_mask[:, prompt_len:] = True
    with torch.no_grad():
        ref_logps, _, _ = _sequence_stats(reference, both, response_mask)
    ref_w, ref_l = ref_logps.split(args.pairs)

    optimizer = torch.optim.SGD(policy.parameters(), lr=args.lr)
    print(f"H-DPO alpha={args.alpha} beta={args.beta}: chosen responses use the lower half of the vocabulary")
    print(
        f"{'step':>4} {'loss':>8} {'margin':>8} {'acc':>5} {'entropy_w':>9} {'topk_mass_w':>11} {'topk_H_w':>8}"
    )
    for step in range(args.steps):
        logps, _, means = _sequence_stats(policy, both, response_mask)
        lp_w, lp_l = logps.split(args.pairs)
        out = preference_loss(lp_w, lp_l, ref_w, ref_l, loss_type="hdpo", beta=args.beta, alpha=args.alpha)
        loss = out.losses.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        margin = (out.chosen_rewards - out.rejected_rewards).mean().item()
        accuracy = (out.chosen_rewards > out.rejected_rewards).float().mean().item()
        print(
            f"{step:>4} {loss.item():>8.4f} {margin:>8.4f} {accuracy:>5.2f} "
            f"{means['entropy'][: args.pairs].mean():>9.4f} {means['topk_mass'][: args.pairs].mean():>11.4f} "
            f"{means['topk_entropy'][: args.pairs].mean():>8.4f}"
        )

    with torch.no_grad():
        logps, _, _ = _sequence_stats(policy, both, response_mask)
    lp_w, lp_l = logps.split(args.pairs)
    print("\nevery loss type on the final batch (mean over pairs):")
    for loss_type in LOSS_TYPES:
        kwargs = {"alpha": args.alpha} if loss_type == "hdpo" else {}
        out = preference_loss(lp_w, lp_l, ref_w, ref_l, loss_type=loss_type, beta=args.beta, **kwargs)
        print(f"  {loss_type:<16} {out.losses.mean().item():.4f}")
    print("\nThe DeepSpeed trainer (deepspeed launch/train.py) replaces this walkthrough as `make demo`.")


if __name__ == "__main__":
    main()
