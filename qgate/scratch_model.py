"""A small decoder trained from scratch on one corpus: a byte-level BPE tokenizer learned on the corpus's own text
and a random-init Llama, saved as an HF directory that `model=DIR` loads anywhere a model is accepted.

A finetune target that knows nothing before it is trained learns only what its rows teach, so what a subset of
rows teaches (a right fact or a wrong one) is what its evaluation measures. A vocabulary fitted to the corpus keeps
the LM head, the largest part of a small model's compute, small.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from qgate.tiny import CHATML_TEMPLATE, SPECIAL_TOKENS

SIZES = {  # name: (hidden, intermediate, layers, heads)
    "3m": (192, 512, 4, 4),
    "20m": (384, 1024, 8, 6),
    "100m": (768, 2048, 12, 12),
}


def corpus_tokenizer(texts: list[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Byte-level BPE learned on `texts` (any byte still encodes), with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def write_scratch_model(out_dir: str | Path, texts: list[str], size: str = "3m", vocab_size: int = 4096,
                        seed: int = 0) -> Path:
    """Save a random-init decoder of `size` with a tokenizer learned on `texts` to `out_dir`; the same texts,
    size and seed give the same weights."""
    if size not in SIZES:
        raise ValueError(f"scratch model size {size!r}: one of {sorted(SIZES)}")
    hidden, intermediate, layers, heads = SIZES[size]
    tokenizer = corpus_tokenizer(texts, vocab_size)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=1024,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
