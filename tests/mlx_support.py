"""Shared by the MLX tests: whether MLX is here (decided from the machine, not from
MacTuner's own probe), and a tiny Llama with a small byte-level tokenizer.

mlx[cpu] multiplies matrices slowly (about 1 GFLOP/s here): with SmolLM2's 49,152-token
vocabulary the LM head alone takes seconds per step, so the MLX tests use a 512-token
byte-level BPE tokenizer trained on the test sentences, with SmolLM2's chat template.
"""

from __future__ import annotations

from pathlib import Path

from tests.train_support import FACTS, PHRASINGS


def require_mlx() -> None:
    """Skip without MLX (mlx and mlx-lm, found on the machine); under CI=true fail instead, saying how to install it."""
    from tests.features import require

    require("mlx")


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EXTRA_TEXT = [
    "The capital of France is Paris.",
    "Answer the question. What is the answer? Question: who, what, when, where, which, how?",
    "system user assistant You are a helpful assistant.",
    "0123456789 facts fact city colour tall built keeps stands burns metres island lamp oil",
]


def build_small_vocab_model(folder: Path, chat_template: str, vocab_size: int = 512, seed: int = 0,
                            initializer_range: float = 0.02, hidden_size: int = 64, layers: int = 2) -> Path:
    """Write a tiny LlamaForCausalLM (default hidden 64, 2 layers; float32 safetensors) and its small tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = [p.format(q=q) + " " + a for q, a in FACTS for p in PHRASINGS] + EXTRA_TEXT
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(text, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = chat_template
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
