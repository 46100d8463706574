"""The GPU path's pieces that CPU can check: sequence boundaries computed once in the collator, the
per-sequence attention without host syncs, torch_varlen's wrapper against a reference kernel, and the
order `auto` picks implementations in (CUDA simulated). The real varlen kernel runs where CUDA is.
"""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import pytest
import torch

from hdpo_ds.config import ConfigError, ModelConfig
from hdpo_ds.data.packing import (
    MicroBatchPacking,
    boundaries_from_positions,
    collate,
    pad_row,
    sequence_shard,
)
from hdpo_ds.runtime import attention
from tests.test_attention import _config
from tests.test_packing import random_pairs

LENGTHS = np.array([[9, 14], [30, 5], [2, 3], [17, 25], [12, 21]])


def _micro_batch(lengths=LENGTHS):
    total = int(lengths.sum())
    return random_pairs(lengths, vocab=128, seed=3), MicroBatchPacking(
        tuple(range(len(lengths))), False, total, total
    )


@pytest.mark.parametrize("multiple_of", [1, 4, 7])
def test_collator_boundaries_equal_those_read_from_position_ids(multiple_of):
    pairs, mb = _micro_batch()
    batch = collate(pairs, mb, pad_token_id=0, packing=True, multiple_of=multiple_of)
    seq_lens = LENGTHS.reshape(-1)
    expected = [0, *np.cumsum(seq_lens).tolist()]
    pad = -int(seq_lens.sum()) % multiple_of
    if pad:
        expected.append(expected[-1] + pad)  # the sequence-parallel pad run is a run of its own
    assert batch.seq_offsets == tuple(expected) == boundaries_from_positions(batch.position_ids)
    assert batch.cu_seq_lens.dtype == torch.int32 and batch.cu_seq_lens.tolist() == expected
    assert batch.max_seq_len == 30
    inputs = batch.model_inputs()
    assert inputs["cu_seq_lens_q"] is inputs["cu_seq_lens_k"] is batch.cu_seq_lens
    assert inputs["max_length_q"] == inputs["max_length_k"] == 30
    assert inputs["cu_seq_lens_q"].host_offsets == tuple(expected)
    if multiple_of > 1:  # a shard keeps the whole row's boundaries: what the core sees after Ulysses
        shard = sequence_shard(batch, multiple_of, 1)
        assert shard.input_ids.shape[1] == batch.input_ids.shape[1] // multiple_of
        assert shard.seq_offsets == batch.seq_offsets and shard.max_seq_len == 30
    assert pad_row(batch, 1, 0) is batch


def test_padded_batches_carry_no_boundaries():
    pairs, mb = _micro_batch()
    batch = collate(pairs, mb, pad_token_id=0, packing=False)
    assert batch.seq_offsets == () and batch.cu_seq_lens is None
    assert not {"cu_seq_lens_q", "max_length_q"} & batch.model_inputs().keys()


@contextlib.contextmanager
def _host_reads(monkeypatch):
    """Counts the calls that read tensor values back to the host (a device sync on a GPU)."""
    counts = {"nonzero": 0, "tolist": 0, "item": 0, "bool": 0}
    for owner, name, key in (
        (torch, "nonzero", "nonzero"),
        (torch.Tensor, "tolist", "tolist"),
        (torch.Tensor, "item", "item"),
        (torch.Tensor, "__bool__", "bool"),
    ):
        original = getattr(owner, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            counts[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
    yield counts
    monkeypatch.undo()


@pytest.mark.parametrize("attn", ["sdpa_packed", "eager_packed"])
def test_per_sequence_paths_take_the_collators_boundaries_without_host_syncs(tmp_path, monkeypatch, attn):
    """A 3-layer Mistral (sliding window 6): the logits with the collator's boundaries equal those
    read from position_ids (today's path, 1e-6), which pays one nonzero + tolist per layer; with the
    boundaries no tensor value is read back at all."""
    from hdpo_ds.runtime.models import load_model

    config = _config("mistral")
    config.num_hidden_layers = 3
    config.save_pretrained(tmp_path)
    cfg = ModelConfig(name_or_path=str(tmp_path), from_scratch=True, attn_implementation=attn)
    model = load_model(cfg, dtype=torch.float32, device_type="cpu", seed=0, for_training=False).model.eval()
    pairs, mb = _micro_batch()
    batch = collate(pairs, mb, pad_token_id=0, packing=True)
    given = batch.model_inputs()
    derived = {k: v for k, v in given.items() if not k.startswith(("cu_seq_lens", "max_length"))}
    with torch.no_grad():
        with _host_reads(monkeypatch) as reads_derived:
            reference = model(**derived).logits
        with _host_reads(monkeypatch) as reads_given:
            logits = model(**given).logits
    torch.testing.assert_close(logits, reference, rtol=1e-6, atol=1e-6)
    assert reads_derived["nonzero"] == reads_derived["tolist"] == 3  # once per layer
    assert reads_given == {"nonzero": 0, "tolist": 0, "item": 0, "bool": 0}


def _reference_varlen(windowed: bool, gqa: bool):
    """A naive kernel with torch.nn.attention.varlen.varlen_attn's documented semantics: (T, H, D)
    inputs, cumulative offsets, window_size (left, right) with -1 unbounded (torch >= 2.11) or
    is_causal (2.10), enable_gqa where the signature has it."""

    def kernel(
        q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=None, is_causal=None, enable_gqa=False
    ):
        assert (window_size is not None) == windowed and (is_causal is not None) != windowed
        assert enable_gqa == (gqa and k.shape[1] != q.shape[1])
        if not gqa:
            assert k.shape[1] == q.shape[1], "a kernel without enable_gqa gets repeated key/value heads"
        left, right = window_size if windowed else (-1, 0 if is_causal else -1)
        offsets = cu_q.tolist()
        assert max_q == max_k == max(b - a for a, b in itertools.pairwise(offsets))
        out = torch.empty_like(q)
        for a, b in itertools.pairwise(offsets):
            i = torch.arange(b - a)[:, None]
            j = torch.arange(b - a)[None, :]
            allowed = ((j >= i - left) | (left < 0)) & ((j <= i + right) | (right < 0))
            kk = k[a:b].repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            vv = v[a:b].repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            logits = torch.einsum("ihd,jhd->hij", q[a:b], kk) * (scale or q.shape[-1] ** -0.5)
            probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
            out[a:b] = torch.einsum("hij,jhd->ihd", probs, vv)
        return out

    return kernel


@pytest.mark.parametrize(
    ("windowed", "gqa", "window"),
    [(True, True, None), (True, True, 5), (True, False, None), (True, False, 5), (False, False, None)],
)
def test_torch_varlen_wrapper_equals_sdpa_packed(monkeypatch, windowed, gqa, window):
    """torch_varlen's layout changes, GQA and window arguments, against sdpa_packed, for the
    signatures of torch 2.10 (is_causal only; a window is refused, below) and 2.11+ (window_size,
    enable_gqa)."""
    kernel = _reference_varlen(windowed, gqa)
    monkeypatch.setattr(attention, "_varlen_signature", lambda: (kernel, windowed, gqa))
    torch.manual_seed(0)
    offsets = (0, 7, 8, 20, 33)
    query = torch.randn(1, 4, 33, 8)
    key, value = torch.randn(1, 2, 33, 8), torch.randn(1, 2, 33, 8)
    cu = torch.tensor(offsets, dtype=torch.int32)
    cu.host_offsets = offsets
    module = torch.nn.Module().eval()
    kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=13, max_length_k=13, sliding_window=window)
    out, _ = attention._varlen_packed(module, query, key, value, None, scaling=0.3, **kwargs)
    expected, _ = attention._sdpa_per_sequence(module, query, key, value, None, scaling=0.3, **kwargs)
    assert out.shape == (1, 33, 4, 8)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_torch_varlen_refuses_what_it_cannot_apply(monkeypatch):
    kernel = _reference_varlen(False, False)
    monkeypatch.setattr(attention, "_varlen_signature", lambda: (kernel, False, False))
    module = torch.nn.Module().train()
    q = torch.randn(1, 2, 10, 8)
    cu = torch.tensor([0, 10], dtype=torch.int32)
    common = dict(cu_seq_lens_q=cu, max_length_q=10)
    with pytest.raises(ValueError, match="has no window; use sdpa_packed"):
        attention._varlen_packed(module, q, q, q, None, sliding_window=4, **common)
    with pytest.raises(ValueError, match="no attention dropout"):
        attention._varlen_packed(module, q, q, q, None, dropout=0.1, **common)
    with pytest.raises(ValueError, match="softcap"):
        attention._varlen_packed(module, q, q, q, None, softcap=5.0, **common)


@pytest.fixture
def cuda_here(monkeypatch):
    """This process as a CUDA machine of a given compute capability, with or without flash-attn."""

    def simulate(capability=(9, 0), flash=False, varlen=True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
        monkeypatch.setattr(
            attention, "_flash_available", lambda device_type: flash and device_type == "cuda"
        )
        signature = (_reference_varlen(True, True), True, True) if varlen else None
        monkeypatch.setattr(attention, "_varlen_signature", lambda: signature)

    return simulate


def test_auto_order_and_its_recorded_reason(cuda_here):
    choose = attention.choose_attention
    llama, gemma2 = _config("mistral"), _config("gemma2")
    assert choose("auto", "cpu", llama, dtype=torch.float32).name == "sdpa_packed"
    cuda_here()
    got = choose("auto", "cuda", llama, dtype=torch.bfloat16)
    assert (got.name, got.reason) == ("torch_varlen", "auto: torch_varlen")
    got = choose("auto", "cuda", llama, dtype=torch.float32)
    assert got.name == "sdpa_packed"
    assert got.reason == (
        "auto: sdpa_packed; skipped torch_varlen (runs float16/bfloat16 only, not float32); "
        "flash_attention_2 (needs the flash-attn package (pip install flash-attn, or -e '.[gpu]'))"
    )
    got = choose("auto", "cuda", gemma2, dtype=torch.bfloat16)  # softcapping: not in torch's kernel
    assert got.name == "eager_packed" and "torch_varlen (does not apply softcap)" in got.reason
    cuda_here(flash=True)
    assert choose("auto", "cuda", gemma2, dtype=torch.bfloat16).name == "flash_attention_2"
    assert choose("auto", "cuda", llama, dtype=torch.bfloat16, packing=False).name == "flash_attention_2"
    cuda_here(flash=True, varlen=False)  # torch 2.9: no torch.nn.attention.varlen
    got = choose("auto", "cuda", llama, dtype=torch.float16)
    assert got.name == "flash_attention_2" and "needs torch >= 2.10" in got.reason
    cuda_here(capability=(7, 5), flash=True)  # T4: no flash kernels
    got = choose("auto", "cuda", llama, dtype=torch.float16)
    assert got.name == "sdpa_packed" and "compute capability 8.0 or later (this GPU: 7.5)" in got.reason


def test_explicit_kernels_are_routed_or_refused(cuda_here):
    choose = attention.choose_attention
    llama, gemma2 = _config("mistral"), _config("gemma2")
    with pytest.raises(ConfigError, match="model.attn_implementation: torch_varlen needs CUDA"):
        choose("torch_varlen", "cpu", llama, dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="torch_varlen attends within packed rows; set data.packing=true"):
        choose("torch_varlen", "cpu", llama, packing=False)
    cuda_here()
    got = choose("torch_varlen", "cuda", llama, dtype=torch.float32)
    assert (got.name, got.reason) == (
        "sdpa_packed",
        "torch_varlen runs float16/bfloat16 only, not float32: routed to sdpa_packed",
    )
    assert choose("torch_varlen", "cuda", llama, dtype=torch.bfloat16).reason == "torch_varlen: as configured"
    with pytest.raises(ConfigError, match="flash_attention_2 needs the flash-attn package"):
        choose("flash_attention_2", "cuda", llama, dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="torch_varlen does not apply attn_logit_softcapping"):
        choose("torch_varlen", "cuda", gemma2, dtype=torch.bfloat16)
    cuda_here(flash=True)  # a float32 run routed away from flash-attn picks a path that applies softcap
    got = choose("flash_attention_2", "cuda", gemma2, dtype=torch.float32)
    assert got.name == "eager_packed" and got.reason.endswith("routed to eager_packed")
    got = choose("flash_attention_2", "cuda", llama, dtype=torch.float32, packing=False)
    assert got.name == "sdpa"


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch's varlen kernel is CUDA-only)"
)
def test_torch_varlen_kernel_on_cuda_equals_sdpa_packed():
    if attention._varlen_signature() is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    torch.manual_seed(0)
    offsets = (0, 70, 71, 200, 333)
    q = torch.randn(1, 8, 333, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 333, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cu = torch.tensor(offsets, dtype=torch.int32, device="cuda")
    cu.host_offsets = offsets
    module = torch.nn.Module().eval()
    for window in (None, 32):
        kwargs = dict(cu_seq_lens_q=cu, max_length_q=133, sliding_window=window)
        out, _ = attention._varlen_packed(module, q, k, v, None, **kwargs)
        expected, _ = attention._sdpa_per_sequence(module, q.float(), k.float(), v.float(), None, **kwargs)
        torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_sampling_models_get_the_attention_auto_picks_for_padded_rows(tmp_path):
    """Evaluation (padded rows, KV cache) asks choose_attention too: plain sdpa for a Llama, eager for
    Gemma-2, whose softcapping sdpa would drop (before: sdpa for every model)."""
    import shutil

    from transformers import AutoModelForCausalLM

    from hdpo_ds.recipes.evaluate import load_for_sampling

    demo = "configs/models/tiny-demo"
    for family, expected in (("qwen2", "sdpa"), ("gemma2", "eager")):
        folder = tmp_path / family
        AutoModelForCausalLM.from_config(_config(family)).save_pretrained(folder)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(f"{demo}/{name}", folder / name)
        model, _, dtype, attn = load_for_sampling(str(folder), device=torch.device("cpu"))
        assert (attn, dtype, model.config._attn_implementation) == (expected, "float32", expected)
