"""Attention implementations on packed rows against eager attention run one sequence at a time.

Tiny fp32 models of the families whose attention is not plain causal: Mistral (a sliding window on
every layer), Qwen2 (`use_sliding_window` from layer 1), Gemma-2 (`attn_logit_softcapping` and
alternating sliding layers) and gpt-oss (attention sinks, alternating sliding layers). The window
(6 tokens) is shorter than most sequences, so a path that drops it gives other log-probs. Each
implementation either gives the per-sequence eager log-probs (1e-5) or is refused at load with a
ConfigError naming the model's setting; the expected outcomes are written out here, not read from
hdpo_ds.runtime.models' own table.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hdpo_ds.config import ConfigError, ModelConfig
from hdpo_ds.data.packing import IGNORE_INDEX, MicroBatchPacking, collate
from hdpo_ds.data.tokenize import TokenizedPair
from hdpo_ds.objectives.logprobs import segment_sums, token_logps
from tests.test_packing import random_pairs

VOCAB, WINDOW = 128, 6
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
)


def _config(family: str):
    import transformers as tf

    if family == "mistral":
        return tf.MistralConfig(**COMMON, sliding_window=WINDOW)
    if family == "qwen2":
        return tf.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    if family == "gemma2":
        return tf.Gemma2Config(
            **COMMON, sliding_window=WINDOW, attn_logit_softcapping=5.0, query_pre_attn_scalar=8
        )
    # rope_parameters: yarn's factor consistent with the tiny max_position_embeddings (no warning)
    return tf.GptOssConfig(
        **COMMON,
        sliding_window=WINDOW,
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


# None: the packed log-probs equal eager per sequence; a string: the ConfigError names it.
EXPECTED = {
    "mistral": {"eager": None, "sdpa": None, "sdpa_packed": None, "eager_packed": None},
    "qwen2": {"eager": None, "sdpa": None, "sdpa_packed": None, "eager_packed": None},
    "gemma2": {
        "eager": None,
        "eager_packed": None,
        "sdpa": "attn_logit_softcapping=5.0",
        "sdpa_packed": "attn_logit_softcapping=5.0",
    },
    # transformers 5.23 builds gpt-oss's eager/sdpa masks without position_ids (see below)
    "gpt_oss": {"eager_packed": None, "eager": "data.packing=true", "sdpa": "sinks", "sdpa_packed": "sinks"},
}
AUTO_ON_CPU = {
    "mistral": "sdpa_packed",
    "qwen2": "sdpa_packed",
    "gemma2": "eager_packed",
    "gpt_oss": "eager_packed",
}


@pytest.fixture(scope="module")
def batch():
    lengths = np.array([[9, 14], [30, 5], [2, 3], [17, 25], [12, 21]])
    pairs = random_pairs(lengths, vocab=VOCAB, seed=1)
    pairs[2] = TokenizedPair("p2", [7], [9], [10, 11], False, False)  # one-token prompt and response
    mb = MicroBatchPacking(tuple(range(len(pairs))), False, int(lengths.sum()), int(lengths.sum()))
    return pairs, mb


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def family(request, tmp_path_factory):
    """A saved tiny config and the eager model's weights and per-sequence log-prob sums."""
    from transformers import AutoModelForCausalLM

    config = _config(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    config.save_pretrained(folder)
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    return {"name": request.param, "dir": str(folder), "eager": eager, "state": eager.state_dict()}


def _alone(eager, pairs) -> np.ndarray:
    """Each sequence by itself through eager attention: summed log-probs of its response tokens."""
    sums = []
    for pair in pairs:
        for response in (pair.chosen_ids, pair.rejected_ids):
            ids = torch.tensor([pair.prompt_ids + response])
            with torch.no_grad():
                logps = torch.log_softmax(eager(input_ids=ids, use_cache=False).logits[0].float(), -1)
            targets = ids[0, len(pair.prompt_ids) :]
            sums.append(logps[len(pair.prompt_ids) - 1 : -1].gather(-1, targets[:, None]).sum().item())
    return np.array(sums)


def _batch_sums(model, pairs, mb, packing: bool) -> np.ndarray:
    batch = collate(pairs, mb, pad_token_id=0, packing=packing)
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
    tokens = token_logps(logits, batch.labels)
    return segment_sums(
        tokens, batch.seq_index, batch.num_seqs, mask=batch.labels != IGNORE_INDEX
    ).sums.numpy()


def _load(family, attn: str, packing: bool = True):
    from hdpo_ds.runtime.models import load_model

    cfg = ModelConfig(name_or_path=family["dir"], from_scratch=True, attn_implementation=attn)
    loaded = load_model(
        cfg, dtype=torch.float32, device_type="cpu", seed=0, packing=packing, for_training=False
    )
    loaded.model.load_state_dict(family["state"])
    return loaded


@pytest.mark.parametrize("attn", ["eager", "sdpa", "sdpa_packed", "eager_packed"])
def test_packed_rows_equal_eager_per_sequence_or_are_refused(family, batch, attn):
    pairs, mb = batch
    expected = EXPECTED[family["name"]][attn]
    if expected is not None:
        with pytest.raises(
            ConfigError, match=rf"model.attn_implementation: {attn} does not apply .*{expected}"
        ):
            _load(family, attn)
        return
    loaded = _load(family, attn)
    assert loaded.attn_implementation == attn
    packed = _batch_sums(loaded.model.eval(), pairs, mb, packing=True)
    np.testing.assert_allclose(packed, _alone(family["eager"], pairs), rtol=1e-5, atol=1e-5)


def test_auto_picks_a_path_that_applies_the_model(family, batch):
    pairs, mb = batch
    loaded = _load(family, "auto")
    assert loaded.attn_implementation == AUTO_ON_CPU[family["name"]]
    packed = _batch_sums(loaded.model.eval(), pairs, mb, packing=True)
    np.testing.assert_allclose(packed, _alone(family["eager"], pairs), rtol=1e-5, atol=1e-5)


def test_padded_rows_equal_eager_per_sequence(family, batch):
    """The padded mode (data.packing=false) passes an attention mask: eager is right for every family."""
    pairs, mb = batch
    loaded = _load(family, "eager", packing=False)
    padded = _batch_sums(loaded.model.eval(), pairs, mb, packing=False)
    np.testing.assert_allclose(padded, _alone(family["eager"], pairs), rtol=1e-5, atol=1e-5)


def test_gpt_oss_eager_mixes_packed_sequences_in_transformers(batch):
    """Why eager/sdpa are refused for packed gpt-oss rows: GptOssModel.forward builds its masks without
    position_ids, so in a packed row each sequence attends to the ones before it. When a transformers
    release fixes this, this test fails: move gpt_oss out of hdpo_ds.runtime.models' list."""
    from transformers import AutoModelForCausalLM

    pairs, mb = batch
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(_config("gpt_oss"), attn_implementation="eager").eval()
    gap = np.abs(_batch_sums(eager, pairs, mb, packing=True) - _alone(eager, pairs))
    assert gap[0] < 1e-5 < 1e-3 < gap[1:].min()  # the first sequence alone is right, every later one wrong


def test_unsupported_combination_is_refused_before_weights_load():
    """The config alone decides (no model is built): the error names the model's setting and the way out."""
    from hdpo_ds.runtime.attention import select_attention

    config = _config("gemma2")
    with pytest.raises(ConfigError) as info:
        select_attention("sdpa_packed", "cpu", config, packing=True, source="tiny-gemma2")
    message = str(info.value)
    assert message.startswith(
        "model.attn_implementation: sdpa_packed does not apply attn_logit_softcapping=5.0"
    )
    assert "tiny-gemma2" in message and "eager_packed" in message
    assert select_attention("auto", "cpu", config, packing=False) == "eager"  # padded rows: eager applies it


def test_a_feature_the_config_check_missed_is_refused_at_the_first_forward():
    """The backstop inside sdpa_packed (remote-code models can hide what they pass): a Gemma-2 forced onto
    it past the config check raises instead of dropping the softcap."""
    from transformers import AutoModelForCausalLM

    from hdpo_ds.runtime.attention import select_attention

    select_attention("sdpa_packed", "cpu", _config("mistral"))  # registers the per-sequence paths
    model = AutoModelForCausalLM.from_config(_config("gemma2"), attn_implementation="eager").eval()
    model.config._attn_implementation = "sdpa_packed"
    ids = torch.arange(8)[None]
    with pytest.raises(
        ValueError, match=r"sdpa_packed attention was called with \['softcap'\] by Gemma2Attention"
    ):
        model(input_ids=ids, position_ids=ids, use_cache=False)


def test_a_forward_without_kwargs_is_refused_for_packed_rows():
    """Packed rows pass cu_seq_lens_q/k as keyword arguments (PackedBatch.model_inputs): a remote-code
    forward without **kwargs, on the causal LM or on its decoder (the fused head calls it), is refused at
    load time naming data.packing; every causal LM transformers ships takes them."""
    from transformers import AutoModelForCausalLM

    from hdpo_ds.runtime.attention import check_packed_forward

    refused = r"takes neither \*\*kwargs nor all of cu_seq_lens_k, cu_seq_lens_q, max_length_k, max_length_q"

    class Decoder(torch.nn.Module):
        def forward(self, input_ids, position_ids=None, use_cache=None):
            return input_ids

    class RemoteLM(torch.nn.Module):
        def __init__(self, decoder_takes_kwargs: bool):
            super().__init__()
            self.decoder = Decoder()
            if decoder_takes_kwargs:
                self.decoder.forward = lambda input_ids, **kwargs: input_ids

        def get_decoder(self):
            return self.decoder

        def forward(self, input_ids, **kwargs):
            return self.decoder(input_ids)

    for lm, culprit in ((RemoteLM(False), "Decoder"), (type("Bare", (Decoder,), {})(), "Bare")):
        pattern = rf"^data\.packing: {culprit}\.forward of remote/x {refused}"
        with pytest.raises(ConfigError, match=pattern):
            check_packed_forward(lm, "remote/x")
    check_packed_forward(RemoteLM(True), "remote/x")

    class Named(Decoder):  # every boundary by name is enough; one missing is not
        def forward(self, input_ids, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=0, max_length_k=0):
            return input_ids

    class ThreeNamed(Decoder):
        def forward(self, input_ids, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=0):
            return input_ids

    check_packed_forward(Named(), "remote/x")
    with pytest.raises(ConfigError, match=rf"ThreeNamed\.forward of remote/x {refused}"):
        check_packed_forward(ThreeNamed(), "remote/x")
    check_packed_forward(AutoModelForCausalLM.from_config(_config("mistral")), "tiny-mistral")


@pytest.mark.parametrize("family", ["falcon", "opt"])
def test_architectures_that_mix_packed_sequences_refuse_packing(batch, family):
    """transformers 5.23's Falcon and OPT keep packed sequences apart under no attention implementation
    (their masks and positions ignore the restarts of position_ids): data.packing=true is refused for
    every implementation, padded rows are not."""
    import transformers as tf
    from transformers import AutoModelForCausalLM

    from hdpo_ds.runtime.attention import select_attention

    pairs, mb = batch
    if family == "falcon":
        config = tf.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    else:
        config = tf.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64
        )
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    assert np.abs(_batch_sums(eager, pairs, mb, packing=True) - _alone(eager, pairs))[1:].min() > 1e-3
    np.testing.assert_allclose(
        _batch_sums(eager, pairs, mb, packing=False), _alone(eager, pairs), rtol=1e-5, atol=1e-5
    )
    for attn in ("auto", "eager", "sdpa", "sdpa_packed", "eager_packed"):
        with pytest.raises(ConfigError, match=rf"data.packing=true \(transformers' {family} mixes"):
            select_attention(attn, "cpu", config, packing=True)
    assert select_attention("auto", "cpu", config, packing=False) == "sdpa"
