"""Shared test fixtures for the data pipeline: a tokenizer trained here (no downloads) and a tiny Llama."""

from __future__ import annotations

import functools

CORPUS = [
    "Human: What is the capital of France? Assistant: The capital of France is Paris.",
    "Human: How many legs does a spider have? Assistant: A spider has eight legs.",
    "Question: what is two plus two? Answer: Four. The answer is four, not five.",
    "Tell me a joke about cats. Why did the cat sit on the computer? To keep an eye on the mouse.",
    "Write a haiku about the sea. Waves fold into foam, the tide keeps its own counsel, salt on the cold "
    "wind.",
    "Explain photosynthesis simply. Plants turn light, water and air into sugar and oxygen.",
    "Say hello. Hello there! Hi! Good morning, how are you today?",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 1000",
    "You are a helpful assistant. Please answer briefly and politely, with kindness.",
]
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
# A minimal template in the common shape: BOS, one block per message closed by EOS, an assistant header
# for generation. The newline after EOS is what real templates (ChatML, Zephyr) also emit.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@functools.cache
def _trained_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    bos = tok.token_to_id("<s>")
    # Like Llama tokenizers: encode(..., add_special_tokens=True) prepends BOS.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    return tok.to_str()


def make_tokenizer(*, chat_template: str | None = CHAT_TEMPLATE, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on CORPUS, with BOS/EOS/PAD set and (by default) a chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    tok.chat_template = chat_template
    return tok


def tiny_llama(vocab_size: int, attn_implementation: str = "sdpa", seed: int = 0, **config_values):
    """A 2-layer fp32 Llama small enough for unit tests (hidden 64, 4 heads, 2 kv heads), in eval mode;
    `config_values` set further LlamaConfig fields (e.g. attention_dropout)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=vocab_size,
        max_position_embeddings=1024,
        **config_values,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.eval()
    return model
