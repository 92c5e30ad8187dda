"""Trainable parameters and AdamW state of S2FT (the recipe's defaults) against LoRA r=16 on all linear layers: the
tiny test Llama, and a SmolLM2-135M-shaped Llama on the meta device (no weights, no download).

Run: PYTHONPATH=. python scripts/count_s2ft_vs_lora.py
"""

import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from trl_priority.beyond_tokens.structural import S2FTArgs, apply_s2ft


ADAMW_BYTES = 8  # two float32 moments per trainable parameter


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def compare(name: str, make_model) -> None:
    total = sum(p.numel() for p in make_model().parameters())
    s2ft = apply_s2ft(make_model(), None, S2FTArgs(strategy="random"))["trainable_parameters"]  # same budget
    lora = trainable(get_peft_model(make_model(), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")))
    print(
        f"{name} ({total} parameters): S2FT {s2ft} trainable, AdamW state {ADAMW_BYTES * s2ft / 2**20:.2f} MiB; "
        f"LoRA r=16 all-linear {lora} trainable, AdamW state {ADAMW_BYTES * lora / 2**20:.2f} MiB"
    )


def smollm2_shaped() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True,
    )  # fmt: skip
    with torch.device("meta"):
        return LlamaForCausalLM(config)


if __name__ == "__main__":
    sys.path.insert(0, "tests")
    from conftest import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    compare("tiny test Llama", lambda: build_model(tokenizer))
    compare("SmolLM2-135M shape", smollm2_shaped)
