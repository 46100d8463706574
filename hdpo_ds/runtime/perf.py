"""Model FLOPs utilisation: the FLOPs a step's model work takes, the device's peak, and the step's time
split into phases without host syncs of its own.

MFU (Chowdhery et al. 2022, PaLM, Appendix B) = model FLOPs of the step / (step time × peak × devices).
Model FLOPs count the matrix products the method needs, never recomputation (gradient checkpointing)
or filler micro-batches. Per token, a parameter costs 2 FLOPs forward, 2 more for the input gradient
and 2 for its weight gradient (Kaplan et al. 2020, Sec. 2.1: C ≈ 6·N per token): 6·N for trained
weights, 4·N for a frozen base under LoRA (no weight gradients), 2·N for a forward without backward
(the reference). N excludes the input embedding (a lookup; a tied one is also the output head, which
counts) and counts a mixture of experts' routed experts by k/E (the active parameters). Causal attention
adds, per sequence of n tokens and layer, 2·n²·(heads·head_dim) forward (QK^T and AV, each half of
the square), times 3 with the backward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

__all__ = [
    "GPU_PEAK_TFLOPS",
    "FlopCounts",
    "StepTimer",
    "attention_flops",
    "count_flop_params",
    "device_peak_tflops",
    "measure_matmul_tflops",
    "micro_batch_flops",
    "model_counts",
    "step_metrics",
]

# Dense (no sparsity) peak TFLOPS from the vendors' data sheets: (bf16/fp16 tensor cores, fp32 without
# TF32). Matched against torch.cuda.get_device_name() in this order (longest names first: "H200"
# before "H20", "L40S" before "L4"); an unknown GPU is measured like a CPU.
GPU_PEAK_TFLOPS: tuple[tuple[tuple[str, ...], float, float], ...] = (
    (("GB200",), 2500.0, 80.0),
    (("B200",), 2250.0, 80.0),
    (("H200",), 989.4, 66.9),
    (("H100", "PCIe"), 756.5, 51.2),
    (("H100", "NVL"), 835.5, 60.0),
    (("H100",), 989.4, 66.9),  # SXM
    (("H800",), 989.4, 66.9),
    (("H20",), 148.0, 44.0),
    (("A100",), 312.0, 19.5),
    (("A800",), 312.0, 19.5),
    (("L40S",), 362.1, 91.6),
    (("L4",), 121.0, 30.3),
    (("RTX 4090",), 165.2, 82.6),
    (("MI300X",), 1307.4, 163.4),
    (("V100",), 125.0, 15.7),  # fp16 (no bf16)
    (("T4",), 65.0, 8.1),  # fp16 (no bf16)
)


def device_peak_tflops(
    device: torch.device, dtype: torch.dtype, configured: float = 0.0
) -> tuple[float, str]:
    """(peak TFLOPS of one device for `dtype`'s matrix products, where it comes from): train.peak_tflops
    when set (> 0), the GPU table, else a measured matrix product (CPU, unknown GPUs)."""
    if configured > 0:
        return float(configured), "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        half = dtype in (torch.float16, torch.bfloat16)
        for words, half_peak, fp32_peak in GPU_PEAK_TFLOPS:
            if all(word in name for word in words):
                return (
                    half_peak if half else fp32_peak
                ), f"table: {name}, {str(dtype).removeprefix('torch.')}"
    peak = measure_matmul_tflops(device, dtype)
    return peak, f"measured: {device.type} {str(dtype).removeprefix('torch.')} matmul"


def measure_matmul_tflops(
    device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 5
) -> float:
    """The best of `repeats` timed (size × size) @ (size × size) products on `device`: 2·size³ FLOPs
    each (a warm-up first). Runs once at start-up; ~0.1 s on a 2-core CPU."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        (a @ b).sum().item()  # the item waits for the product, on any device
        if i:  # the first is the warm-up
            best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e12


@dataclasses.dataclass(frozen=True)
class FlopCounts:
    """What one model's FLOPs per token depend on (count_flop_params)."""

    trained: int  # parameters with weight gradients (N of 6·N), input embedding excluded
    frozen: int  # parameters without (a LoRA base: 4·N with a backward, 2·N in a forward)
    layers: int
    attention_width: int  # heads × head_dim of the queries

    @property
    def params(self) -> int:
        return self.trained + self.frozen


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())  # ZeRO-3 keeps only a partition locally


def count_flop_params(model: torch.nn.Module, config, experts_per_token: int = 0) -> FlopCounts:
    """The FLOP-relevant parameter counts of `model` (whole sizes under ZeRO-3, `ds_numel`): every
    parameter once, the input embedding left out unless it is also the output head, and the stacked
    experts of each sparse block (a module with an `experts` child whose parameters lead with E) counted
    by `experts_per_token` / E."""
    embed = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is embed
    scale: dict[int, float] = {}
    if experts_per_token:
        for module in model.modules():
            experts = getattr(module, "experts", None)
            if isinstance(experts, torch.nn.Module):
                for p in experts.parameters():
                    num_experts = p.ds_shape[0] if hasattr(p, "ds_shape") else p.shape[0]
                    scale[id(p)] = experts_per_token / num_experts
    trained = frozen = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen or (p is embed and not tied):
            continue
        seen.add(id(p))
        n = _numel(p) * scale.get(id(p), 1.0)
        if p.requires_grad:
            trained += n
        else:
            frozen += n
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return FlopCounts(int(trained), int(frozen), int(text.num_hidden_layers), int(heads * head_dim))


def model_counts(model: torch.nn.Module) -> FlopCounts:
    """count_flop_params for a transformers model (or an engine's module), a mixture of experts' k from
    its config (runtime/models.py moe_routing)."""
    from hdpo_ds.runtime.models import moe_routing

    routing = moe_routing(model.config)
    return count_flop_params(model, model.config, routing[0] if routing else 0)


def step_metrics(
    model_flops: float,
    real_tokens: float,
    elapsed: float,
    world_size: int,
    peak_tflops: float,
    phases: dict[str, float] | None = None,
) -> dict[str, float]:
    """perf/* of a step, from its model FLOPs and real tokens summed over all ranks: MFU, achieved TFLOPS
    and tokens/s per device, and with `phases` (StepTimer.read, this rank) the time split, `other` being
    the collectives and bookkeeping between phases."""
    per_device = model_flops / (elapsed * world_size)
    metrics = {
        "perf/mfu": per_device / (peak_tflops * 1e12),
        "perf/tflops_per_device": per_device / 1e12,
        "perf/tokens_per_second_per_device": real_tokens / (elapsed * world_size),
    }
    if phases is not None:
        metrics.update({f"perf/time/{name}_s": seconds for name, seconds in phases.items()})
        metrics["perf/time/other_s"] = elapsed - sum(phases.values())
    return metrics


def attention_flops(counts: FlopCounts, sum_squared_lengths: int) -> float:
    """Causal attention's forward FLOPs over sequences whose squared lengths sum to the given value:
    2·n²·(heads·head_dim) per sequence and layer (QK^T and AV over the lower triangle)."""
    return 2.0 * counts.layers * counts.attention_width * sum_squared_lengths


def micro_batch_flops(
    policy: FlopCounts,
    tokens: int,
    sum_squared_lengths: int,
    *,
    reference: FlopCounts | None = None,
    policy_forwards: int = 0,
) -> float:
    """Model FLOPs of one micro-batch of `tokens` real tokens: the policy's forward and backward
    (6·N_trained + 4·N_frozen per token, 3 × attention), a reference forward when `reference` is given
    (2·N + attention; none for a cached or reference-free one), and `policy_forwards` extra no-grad
    policy forwards (AOT's sorting pre-pass)."""
    weights = (6 * policy.trained + 4 * policy.frozen) * tokens
    flops = weights + 3 * attention_flops(policy, sum_squared_lengths)
    flops += policy_forwards * (2 * policy.params * tokens + attention_flops(policy, sum_squared_lengths))
    if reference is not None:
        flops += 2 * reference.params * tokens + attention_flops(reference, sum_squared_lengths)
    return float(flops)


class StepTimer:
    """Wall time of a step's phases (data, forward, backward, optimizer, reference) on this rank.

    On CUDA each phase records two events on the current stream (no sync) and `read` converts them
    after the step's own synchronisation (the metrics all-reduce); elsewhere operations run
    synchronously and perf_counter is exact. A phase inside another (the reference inside the
    forward) is subtracted from it. Outside `begin`..`read`, phases record nothing (evaluation)."""

    PHASES = ("data", "forward", "backward", "optimizer", "reference")
    NESTED = (("reference", "forward"),)  # (inner, outer)

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.active = False
        self._marks: list[tuple[str, object, object]] = []

    def begin(self) -> None:
        self.active, self._marks = True, []

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.active:
            yield
            return
        start = torch.cuda.Event(enable_timing=True) if self.cuda else time.perf_counter()
        if self.cuda:
            start.record()
        try:
            yield
        finally:
            if self.cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
            else:
                end = time.perf_counter()
            self._marks.append((name, start, end))

    def read(self) -> dict[str, float]:
        """Seconds per phase of this step (call after the step's synchronisation), and stop recording."""
        seconds = dict.fromkeys(self.PHASES, 0.0)
        for name, start, end in self._marks:
            seconds[name] += start.elapsed_time(end) / 1000 if self.cuda else end - start
        for inner, outer in self.NESTED:
            seconds[outer] -= seconds[inner]
        self.active, self._marks = False, []
        return seconds
