"""Launched on 2 ranks by tests/test_trainer_guards.py: the gradient a ZeRO-3 bf16 engine accumulates over
n micro-batches per rank, against the same sum in fp32, with the accumulation dtype our fill_ds_config
chooses and with an explicit bf16 one. Rank 0 writes {"<variant>/<n>": relative error} as JSON."""

from __future__ import annotations

import json
import sys

import torch

from hdpo_ds.runtime import stop


def main(ds_path: str, out_path: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from hdpo_ds.config import load_config
    from hdpo_ds.runtime import dist, engine

    engine.init_distributed()
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    # bf16-representable weights for every variant, so only the arithmetic differs
    initial = {k: v.to(torch.bfloat16).float() for k, v in LlamaForCausalLM(config).state_dict().items()}
    base = ds_path
    variants = {
        "fp32": ("float32", None),
        "bf16_filled": ("bfloat16", None),
        "bf16_accum": ("bfloat16", "bf16"),
    }

    def gradient(dtype_name: str, accum: str | None, n: int) -> dict[str, torch.Tensor]:
        cfg = load_config(
            None,
            [
                "model.name_or_path=x",
                "data.train_files=[x]",
                f"model.dtype={dtype_name}",
                "train.pairs_per_step=2",
                "optim.lr=0",
            ],
        )
        ds = engine.load_ds_config(base)
        if accum:
            ds["data_types"] = {"grad_accum_dtype": accum}
        ds = engine.fill_ds_config(ds, cfg, world_size=dist.world_size(), device_type="cpu", hidden_size=64)
        dtype = getattr(torch, dtype_name)
        handle = engine.zero3_loading(ds)
        model = LlamaForCausalLM(config).to(dtype)
        del handle
        policy = engine.build_policy_engine(model, ds, lambda s: 1.0)
        from deepspeed import zero

        for name, param in policy.module.named_parameters():
            with zero.GatheredParameters([param], modifier_rank=0):
                if dist.is_main_process():
                    param.data.copy_(initial[name].to(dtype))
        generator = torch.Generator().manual_seed(100 + dist.rank())
        for i in range(n):
            ids = torch.randint(0, 256, (1, 48), generator=generator)
            policy.set_gradient_accumulation_boundary(i == n - 1)
            loss = policy(input_ids=ids, labels=ids, use_cache=False).loss
            policy.backward(loss / n)
            if i < n - 1:
                policy.step()
        grads = engine.full_gradients(policy)
        policy.destroy()
        return grads

    errors = {}
    for n in (2, 16):
        exact = gradient("float32", None, n)
        for name, (dtype_name, accum) in variants.items():
            if name == "fp32":
                continue
            got = gradient(dtype_name, accum, n)
            num = sum(((got[k] - exact[k]) ** 2).sum() for k in exact)
            den = sum((exact[k] ** 2).sum() for k in exact)
            errors[f"{name}/{n}"] = float((num / den).sqrt())
    if dist.is_main_process():
        with open(out_path, "w") as f:
            json.dump(errors, f)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(args[0], args[1])
    stop.exit_process(0)  # no interpreter teardown after a finished probe (runtime/stop.py)
