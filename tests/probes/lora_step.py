"""Run by tests/test_lora.py (plain python: a world of one; or 2 ranks under the deepspeed launcher):
LoRA preference training with the adapters-off reference, driven step by step.

    python tests/probes/lora_step.py --ds ZERO3.json key=value ...

Rank 0 writes <output_dir>/lora_probe.json with
- `step0`: per loss type (LOSS_TYPES below), each pair's loss, rewards and the policy's and the
  reference's log-probs at step 0 (no gradient; B = 0, so policy == reference);
- `loss0`: the configured loss of the real step 0 (its gradient is dumped by train.dump_gradients_at);
- `changed`: the names of the parameters whose gathered values changed in that step, `frozen_changed`
  those of them that are not trainable, and `trainable`: the trainable parameters' names;
- `loss1`, `frozen_changed_step1`: the same after a second step (B != 0: every adapter has a gradient);
- `after`: on step 2's micro-batches, the adapters-off reference's sequence log-probs, those of a separate
  reference engine on the base model, and the policy's own (adapters on), each a list per micro-batch;
and <output_dir>/lora_logits.pt: the in-run model's logits on a fixed input, before `finish()` writes the
adapter to <output_dir>/hf/adapter.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch

from hdpo_ds.runtime import stop

# The loss types checked at step 0, with the keys each needs beside LOSS_BETA.
LOSS_BETA = 0.2
LOSS_TYPES = {
    "dpo": {},
    "hdpo": {"alpha": 0.9},
    "ipo": {},
    "hinge": {},
    "sppo_hard": {},
    "nca_pair": {},
    "apo_zero": {},
    "apo_down": {},
    "fdpo_js": {},
    "robust": {"label_smoothing": 0.1},
    "exo_pair": {"label_smoothing": 1e-3},
    "discopop": {},
    "tdpo1": {},
}


def gathered(module, names) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(module.named_parameters())
    out = {}
    for name in names:
        with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=None):
            out[name] = params[name].data.detach().clone().cpu()
    return out


def main(argv: list[str]) -> None:
    from hdpo_ds.config import LossConfig, load_config
    from hdpo_ds.data import collate
    from hdpo_ds.objectives.objective import PairTerms, make_objective
    from hdpo_ds.recipes.precompute import load_reference_engine
    from hdpo_ds.recipes.preference import PreferenceRecipe
    from hdpo_ds.reference.sources import OnlineReference
    from hdpo_ds.runtime import dist, engine

    argv = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher's
    assert argv[0] == "--ds"
    ds_path, overrides = argv[1], argv[2:]
    dist.fill_single_process_env()  # a world of one under plain python; a launcher's values otherwise
    cfg = load_config(None, overrides)
    recipe = PreferenceRecipe(cfg, ds_path)
    recipe.setup()
    s = recipe.session
    module = s.policy.module
    names = [n for n, _ in module.named_parameters()]
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    result = {"reference_source": recipe.reference_source, "trainable": trainable, "step0": {}}

    assignment = recipe.next_assignment()
    pairs = assignment.pairs(recipe.train_data.pairs)
    batches = [
        collate(pairs, mb, pad_token_id=s.tokenizer.pad_token_id, packing=cfg.data.packing).to(s.device)
        for mb in assignment.micro_batches
    ]
    real = [not mb.filler for mb in assignment.micro_batches]
    configured = recipe.objective
    checked = LOSS_TYPES if os.environ.get("LORA_PROBE_LOSS_TYPES", "1") == "1" else {}
    # One pass through the recipe's forward per objective kind (sequence sums: dpo; logits: TDPO); the
    # other sequence-level types take the same PairTerms (the adapters-off reference's values).
    forwarded = {}
    s.policy.eval()
    for kind in ("dpo", "tdpo1"):
        recipe.objective = make_objective(
            LossConfig(type=kind, beta=LOSS_BETA), chunk_size=cfg.train.logits_chunk_size
        )
        forwarded[kind] = [
            recipe._run_batch(recipe.references["train"], batch, track_grad=False, alpha=1.0)
            for batch, keep in zip(batches, real, strict=True)
        ]
    recipe.objective = configured
    s.policy.train()
    for loss_type, keys in checked.items():
        objective = make_objective(
            LossConfig(type=loss_type, beta=LOSS_BETA, **keys), chunk_size=cfg.train.logits_chunk_size
        )
        rows = {k: [] for k in ("losses", "chosen_rewards", "rejected_rewards", "lp_w", "lp_l")}
        rows.update(ref_w=[], ref_l=[], kl_w=[], kl_l=[])
        outs = forwarded["tdpo1" if loss_type == "tdpo1" else "dpo"]
        for out, keep in zip(outs, real, strict=True):
            if not keep:
                continue
            if loss_type != "tdpo1":
                terms = PairTerms(
                    out.lp[0],
                    out.lp[1],
                    out.ref[0],
                    out.ref[1],
                    chosen_tokens=out.tokens[0],
                    rejected_tokens=out.tokens[1],
                )
                out.loss = objective.pair_loss(terms, keys.get("alpha", 1.0))
            rows["losses"] += out.loss.losses.tolist()
            rows["chosen_rewards"] += out.loss.chosen_rewards.tolist()
            rows["rejected_rewards"] += out.loss.rejected_rewards.tolist()
            rows["lp_w"] += out.lp[0].tolist()
            rows["lp_l"] += out.lp[1].tolist()
            rows["ref_w"] += out.ref[0].tolist()
            rows["ref_l"] += out.ref[1].tolist()
            if out.loss.kl is not None:
                rows["kl_w"] += out.loss.kl[0].tolist()
                rows["kl_l"] += out.loss.kl[1].tolist()
        merged = dist.gather_objects(rows)
        result["step0"][loss_type] = {k: [v for m in merged for v in m[k]] for k in rows}

    before = gathered(module, names)
    outcome = recipe.train_step(assignment)
    recipe.after_step(outcome)
    after = gathered(module, names)
    result["loss0"] = outcome.metrics["loss"]
    result["skipped"] = outcome.skipped
    result["changed"] = [n for n in names if not torch.equal(before[n], after[n])]
    result["frozen_changed"] = [n for n in result["changed"] if n not in trainable]
    outcome = recipe.train_step(recipe.next_assignment())  # B != 0 now: every adapter gets a gradient
    recipe.after_step(outcome)
    result["loss1"] = outcome.metrics["loss"]
    final = gathered(module, names)
    result["frozen_changed_step1"] = [
        n for n in names if n not in trainable and not torch.equal(before[n], final[n])
    ]

    # Step 2's micro-batches through three sources: adapters off, a base-model engine, the policy itself.
    ref_cfg = dataclasses.replace(cfg, reference=dataclasses.replace(cfg.reference, source="engine"))
    ref_ds = s.fill_ds_config(engine.load_ds_config(cfg.reference.ds_config), training=False, dtype=s.dtype)
    base_engine = load_reference_engine(ref_cfg, ref_ds, s.dtype, s.device_type)
    policy_now = OnlineReference(s.policy, cfg.train.logits_chunk_size)
    nxt = recipe.next_assignment()
    nxt_pairs = nxt.pairs(recipe.train_data.pairs)
    rows = {"adapters_off": [], "engine": [], "policy": []}
    s.policy.eval()
    for mb in nxt.micro_batches:
        batch = collate(nxt_pairs, mb, pad_token_id=s.tokenizer.pad_token_id, packing=cfg.data.packing)
        batch = batch.to(s.device)
        values = {
            "adapters_off": recipe.references["train"].sequence_logps(batch),
            "engine": base_engine.sequence_logps(batch),
            "policy": policy_now.sequence_logps(batch),
        }
        if not mb.filler:
            for key, v in values.items():
                rows[key].append(v.tolist())
    merged = dist.gather_objects(rows)
    result["after"] = {k: [v for m in merged for v in m[k]] for k in rows}
    # The in-run model's logits on a fixed input, for the exported adapter (finish() writes hf/adapter).
    with torch.no_grad():
        ids = torch.arange(3, 3 + 24, device=s.device)[None]
        logits = s.policy(input_ids=ids, use_cache=False).logits.float().cpu()
    s.policy.train()
    recipe.finish()
    if dist.is_main_process():
        torch.save({"input_ids": ids.cpu(), "logits": logits}, os.path.join(cfg.output_dir, "lora_logits.pt"))
        with open(os.path.join(cfg.output_dir, "lora_probe.json"), "w") as f:
            json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
    stop.exit_process(0)  # no interpreter teardown after a finished probe (runtime/stop.py)
