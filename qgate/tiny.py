"""Toy-size models and tokenizers built from a config: no download, same code paths as the real thing.

`model=tiny-qwen3` or `model=tiny-llama` anywhere a model is accepted gives a 2-layer, width-64 decoder with a
byte-level BPE tokenizer and a ChatML chat template, seeded so every process builds identical weights.
"""

from __future__ import annotations

import functools

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen3Config

TINY_MODELS = ("tiny-qwen3", "tiny-llama", "tiny-olmoe", "tiny-qwen3-moe")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Return a list of the words in the string, using sep as the delimiter string.",
    "user assistant system: explain what this function does and give an example.",
    "def add(a, b):\n    return a + b\n",
    "Python is a programming language that lets you work quickly and integrate systems effectively.",
    "0123456789 !?.,;:()[]{}<>=+-*/%&|^~'\"#@$_\\",
]


def is_tiny(name: str) -> bool:
    return name in TINY_MODELS


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_TRAINING_TEXT * 20, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_config(name: str = "tiny-qwen3"):
    common = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
              "pad_token_id": 0, "eos_token_id": 2, "bos_token_id": None, "tie_word_embeddings": True}
    if name == "tiny-qwen3":
        return Qwen3Config(head_dim=16, **common)
    if name == "tiny-llama":
        return LlamaConfig(**common)
    if name == "tiny-olmoe":
        from transformers import OlmoeConfig

        return OlmoeConfig(num_experts=4, num_experts_per_tok=2, **common)
    if name == "tiny-qwen3-moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                              decoder_sparse_step=1, mlp_only_layers=[], **common)
    raise ValueError(f"unknown tiny model {name!r}; choose one of {TINY_MODELS}")


def tiny_model(name: str = "tiny-qwen3", seed: int = 0) -> torch.nn.Module:
    """A randomly initialised toy decoder; the same `seed` gives bit-identical weights in every process."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(name))
    return model.eval()
