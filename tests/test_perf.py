"""Model FLOPs and MFU arithmetic (hdpo_ds/runtime/perf.py) against hand counts; the peak table; the
step timer's phases. The trainer's perf/* metrics are checked per step in tests/test_trainer.py."""

from __future__ import annotations

import time

import pytest
import torch

from hdpo_ds.runtime import perf


def _llama():
    import transformers as tf

    config = tf.LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config), config


# Per layer: q 32·32 + k, v 2·32·16 + o 32·32 + MLP 3·32·64 + 2 norms of 32 = 9,280; two layers, the
# final norm (32) and the untied head (512·32): 34,976 (the input embedding, a lookup, is left out).
LLAMA_N = 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32 + 512 * 32


def test_dense_counts_and_a_step_by_hand():
    model, config = _llama()
    counts = perf.count_flop_params(model, config)
    assert counts == perf.FlopCounts(trained=LLAMA_N, frozen=0, layers=2, attention_width=32)
    # two sequences of 3 and 5 tokens: 8 tokens, Σn² = 34; attention forward 2·2·32·34 = 4,352
    assert perf.attention_flops(counts, 34) == 4352
    assert perf.micro_batch_flops(counts, 8, 34) == 6 * LLAMA_N * 8 + 3 * 4352
    with_reference = perf.micro_batch_flops(counts, 8, 34, reference=counts, policy_forwards=1)
    assert with_reference == 6 * LLAMA_N * 8 + 3 * 4352 + 2 * (2 * LLAMA_N * 8 + 4352)
    # MFU of a 0.25 s step on a 1-TFLOPS device x 2 ranks, as the recipes log it
    phases = {"data": 0.01, "forward": 0.1, "backward": 0.1, "optimizer": 0.02, "reference": 0.01}
    got = perf.step_metrics(with_reference, 8, 0.25, 2, 1.0, phases)
    assert got["perf/mfu"] == pytest.approx(with_reference / (0.25 * 1e12 * 2), rel=1e-12)
    assert got["perf/tokens_per_second_per_device"] == pytest.approx(16.0)
    assert got["perf/time/other_s"] == pytest.approx(0.01)


def test_tied_embeddings_count_once_as_the_head():
    import transformers as tf

    config = tf.LlamaConfig(**{**_llama()[1].to_dict(), "tie_word_embeddings": True})
    tied = tf.LlamaForCausalLM(config)
    assert perf.count_flop_params(tied, config).trained == LLAMA_N  # the head's matmul, once


def test_lora_base_is_frozen():
    from peft import LoraConfig, get_peft_model

    model, config = _llama()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    counts = perf.count_flop_params(peft_model, config)
    # per layer q: A 4·32 + B 32·4, v: A 4·32 + B 16·4 = 448
    assert (counts.trained, counts.frozen) == (2 * 448, LLAMA_N)
    assert perf.micro_batch_flops(counts, 10, 100) == (6 * 896 + 4 * LLAMA_N) * 10 + 3 * 2 * 2 * 32 * 100


def test_mixture_of_experts_counts_its_routed_experts():
    import transformers as tf

    config = tf.MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    model = tf.MixtralForCausalLM(config)
    counts = perf.count_flop_params(model, config, experts_per_token=2)
    # attention 16·16 + 2·16·8 + 16·16 = 768, router 16·4, 2 of 4 experts of 3·16·32, norms 2·16 + 16,
    # head 64·16
    assert counts.trained == 768 + 64 + 2 * 3 * 16 * 32 + 48 + 64 * 16


def test_peak_table_and_configured_peak(monkeypatch):
    cpu = torch.device("cpu")
    assert perf.device_peak_tflops(cpu, torch.float32, 12.5) == (12.5, "train.peak_tflops")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    gpu = torch.device("cuda", 0)
    assert perf.device_peak_tflops(gpu, torch.bfloat16) == (989.4, "table: NVIDIA H100 80GB HBM3, bfloat16")
    assert perf.device_peak_tflops(gpu, torch.float32)[0] == 66.9
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    assert perf.device_peak_tflops(gpu, torch.bfloat16)[0] == 756.5
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert perf.device_peak_tflops(gpu, torch.bfloat16)[0] == 989.4  # not the H20 row
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA L40S")
    assert perf.device_peak_tflops(gpu, torch.float16)[0] == 362.1  # not the L4 row
    peak, source = perf.device_peak_tflops(cpu, torch.float32)
    assert peak > 0 and source == "measured: cpu float32 matmul"


def test_step_timer_phases_and_nesting():
    timer = perf.StepTimer(torch.device("cpu"))
    with timer.phase("forward"):  # outside begin..read: nothing recorded (evaluation)
        time.sleep(0.01)
    timer.begin()
    with timer.phase("data"):
        time.sleep(0.02)
    with timer.phase("forward"):
        time.sleep(0.03)
        with timer.phase("reference"):
            time.sleep(0.05)
    with timer.phase("forward"):
        time.sleep(0.01)
    seconds = timer.read()
    assert set(seconds) == set(perf.StepTimer.PHASES)
    assert seconds["data"] == pytest.approx(0.02, abs=0.01)
    assert seconds["reference"] == pytest.approx(0.05, abs=0.01)
    assert seconds["forward"] == pytest.approx(0.04, abs=0.01)  # the reference inside it taken out
    assert seconds["backward"] == seconds["optimizer"] == 0.0
    assert not timer.active
