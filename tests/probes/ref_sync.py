"""Launched on 2 ranks by tests/test_reference_sync.py: TR-DPO's reference update (runtime/engine.py
`sync_reference`) between a policy and a reference engine built from two different tiny models, for
several partitionings of the two sides. Per case, rank 0 writes how many parameters each side keeps
whole (ZeRO-3 persistence, [policy, reference]) and the largest deviations from the expected weights:

    soft: reference after sync(alpha) against alpha * policy + (1 - alpha) * old reference (float32);
    policy_unchanged: the policy after the soft sync against before;
    moved: how far one optimizer step moved the policy (must be > 0, or the hard test proves nothing);
    hard: reference after sync(1) against the policy (exactly 0);
    reloaded: the reference saved (checkpoint.save_reference), changed, loaded again, against saved.

usage: ref_sync.py POLICY_MODEL REFERENCE_MODEL ZERO3_DS ZERO3_INFER_DS OUT_DIR
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch

from hdpo_ds.runtime import stop

ALPHA = 0.6


def gathered(module) -> dict[str, torch.Tensor]:
    """Every parameter, whole, float32 on CPU: one parameter gathered at a time (collective)."""
    import deepspeed

    out = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            out[name] = param.data.detach().float().cpu().clone()
    return out


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def main(policy_dir, ref_dir, z3_path, infer_path, out_dir) -> None:
    from transformers import LlamaForCausalLM

    from hdpo_ds.config import load_config
    from hdpo_ds.runtime import checkpoint, dist, engine

    engine.init_distributed()
    cfg = load_config(
        None, ["model.name_or_path=x", "data.train_files=[x]", "train.pairs_per_step=2", "optim.lr=1e-2"]
    )
    z3, infer = engine.load_ds_config(z3_path), engine.load_ds_config(infer_path)
    persisted = copy.deepcopy(infer)  # every parameter kept whole on every rank (persisted)
    persisted["zero_optimization"]["stage3_param_persistence_threshold"] = 10**9
    stage0_policy = {k: v for k, v in z3.items() if k != "zero_optimization"}
    stage0_ref = {k: v for k, v in infer.items() if k != "zero_optimization"}
    cases = {
        "z3_z3": (z3, infer),
        "z3_z3persisted": (z3, persisted),
        "z0_z3": (stage0_policy, infer),
        "z3_z0": (z3, stage0_ref),
    }

    def build(path: str, ds: dict, training: bool):
        filled = engine.fill_ds_config(
            ds,
            cfg,
            world_size=dist.world_size(),
            device_type="cpu",
            hidden_size=32,
            training=training,
            dtype=torch.float32,
        )
        handle = engine.zero3_loading(filled)
        model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        del handle
        if training:
            return engine.build_policy_engine(model, filled, lambda s: 1.0)
        return engine.build_reference_engine(model, filled)

    results = {}
    for case, (policy_ds, ref_ds) in cases.items():
        policy = build(policy_dir, policy_ds, True)
        ref = build(ref_dir, ref_ds, False)
        p0, r0 = gathered(policy.module), gathered(ref.module)
        persisted_count = [
            sum(getattr(p, "ds_persist", False) for p in e.module.parameters()) for e in (policy, ref)
        ]
        assert max_diff(p0, r0) > 1e-3, "the two models must differ"
        engine.sync_reference(policy, ref, ALPHA)
        r1 = gathered(ref.module)
        expected = {k: ALPHA * p0[k] + (1 - ALPHA) * r0[k] for k in p0}
        row = {
            "persisted": persisted_count,
            "soft": max_diff(r1, expected),
            "policy_unchanged": max_diff(gathered(policy.module), p0),
        }

        generator = torch.Generator().manual_seed(7 + dist.rank())
        ids = torch.randint(0, policy.module.config.vocab_size, (1, 24), generator=generator)
        policy.train()
        policy.backward(policy(input_ids=ids, labels=ids, use_cache=False).loss)
        policy.step()
        p1 = gathered(policy.module)
        row["moved"] = max_diff(p1, p0)
        engine.sync_reference(policy, ref, 1.0)
        r2 = gathered(ref.module)
        row["hard"] = max_diff(r2, p1)

        folder = os.path.join(out_dir, f"ckpt_{case}")
        checkpoint.save_reference(ref, folder)
        dist.barrier()
        engine.sync_reference(policy, ref, ALPHA)  # the reference changes again ...
        checkpoint.load_reference(ref, folder)  # ... and the saved one comes back
        row["reloaded"] = max_diff(gathered(ref.module), r2)
        results[case] = row
        policy.destroy()
        ref.destroy()
    if dist.is_main_process():
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:6])
    stop.exit_process(0)  # no interpreter teardown after a finished probe (runtime/stop.py)
