"""What the offline scorers share (`trl_priority.tools.token_scores`, `trl_priority.tools.example_scores`): rows
tokenized as the trainer tokenizes them, a scored column added to a dataset, a model's device and a tokenizer's pad id,
a right-padded batch's logits, the command lines' loading of a model or dataset (a path, a hub id, or `builtin:<name>`) and writing of the scored rows."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from datasets import Dataset


def tokenize_like_trainer(dataset: Dataset, tokenizer, args: Any = None) -> Dataset:
    """`dataset` tokenized as `SFTTrainer` tokenizes it, before truncation: `input_ids`, `completion_mask` (for
    prompt-completion rows) and `labels`, in the same order. A dataset with `input_ids` is returned unchanged.

    Runs TRL's own preparation (`SFTTrainer._prepare_dataset`) without building a trainer, with the settings of `args`
    that shape the tokens (`assistant_only_loss`, `dataset_text_field`, `dataset_num_proc`); nothing is truncated or
    packed. A `formatting_func` is not supported: format the rows first. Give the tokenizer as the trainer will use it
    (the trainer replaces its EOS token by `args.eos_token` when that is set).
    """
    if "input_ids" in dataset.column_names:
        return dataset
    from trl import SFTTrainer
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    assistant_only_loss = bool(getattr(args, "assistant_only_loss", False))
    chat_template = None  # as `SFTTrainer.__init__` decides it
    if assistant_only_loss and not has_generation_markers(tokenizer.chat_template):
        chat_template = get_training_chat_template(tokenizer)
    trainer = SimpleNamespace(_tokenizer=tokenizer, chat_template=chat_template, completion_only_loss=False)
    settings = SimpleNamespace(
        dataset_num_proc=getattr(args, "dataset_num_proc", None),
        dataset_text_field=getattr(args, "dataset_text_field", "text"),
        assistant_only_loss=assistant_only_loss,
        max_length=None,  # the trainer's columns are made before truncation
        shuffle_dataset=False,
        truncation_mode="keep_start",
        seed=0,
        packing_strategy="bfd",
    )
    return SFTTrainer._prepare_dataset(trainer, dataset, tokenizer, settings, False, None, "scoring")


def device_of(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (where its inputs go)."""
    return next(model.parameters()).device


def with_column(dataset: Dataset, column: str, values: list[list[float]]) -> Dataset:
    """`dataset` with `column` set to `values` (replaced if it exists)."""
    if column in dataset.column_names:
        dataset = dataset.remove_columns(column)
    return dataset.add_column(column, values)


def pad_token_id(tokenizer) -> int:
    """The id right-padded batches are filled with: the pad token, else EOS, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


@torch.no_grad()
def right_padded_logits(model: torch.nn.Module, sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    """`(B, L, V)` next-token logits of `sequences`, right-padded with `pad_id` into one batch (position j predicts
    token j + 1; padded positions are masked out of attention)."""
    length = max(len(ids) for ids in sequences)
    device = device_of(model)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long, device=device)  # (B, L)
    attention_mask = torch.zeros_like(input_ids)  # (B, L)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids, device=device)
        attention_mask[row, : len(ids)] = 1
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, L, V)


def write_scored(dataset: Dataset, output: str) -> Path:
    """Write a scored dataset to `<output>/train.jsonl` (the folder made if missing); returns that path."""
    path = Path(output) / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.to_json(path)
    return path


def load_model(path: str, device: str):
    """A causal LM from a path, hub id or `builtin:<name>`, in float32 on `device`."""
    from transformers import AutoModelForCausalLM

    from trl_priority.tools.builtin import resolve_model

    return AutoModelForCausalLM.from_pretrained(resolve_model(path), dtype="float32").to(device)


def load_dataset(name: str) -> Dataset:
    """The train split of a hub dataset, or a `builtin:<name>` dataset."""
    from trl_priority.tools import builtin

    if name.startswith(builtin.PREFIX):
        return builtin.load_dataset(name)
    from datasets import load_dataset

    return load_dataset(name, split="train")
