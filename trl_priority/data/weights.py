"""Weights people already have in their data: a `weight` on each message, and a `weight` column per example.

Two formats users bring:

- **Per message** (Mistral's fine-tuning format): a conversation whose messages may carry a `weight`, a number; a
  message without one (or with `weight: null`, what `datasets` writes where other rows have one) weighs 1:

  ```python
  {"messages": [
      {"role": "user", "content": "What is 3 + 4?"},
      {"role": "assistant", "content": "3 + 4 = 8", "weight": -0.5},    # bad: unlearn it (bounded loss)
      {"role": "user", "content": "Check again."},
      {"role": "assistant", "content": "3 + 4 = 7", "weight": 1.0},     # good
  ]}
  ```

  The same holds for conversational prompt-completion rows (`prompt` + `completion` lists of messages).
- **Per example** (TRL PRs 5951/5952): a `weight` column, one number per row, multiplying every token of the row.

`message_token_weights` gives every token of the tokenized row the product of its message's weight and its example's
weight. A message's tokens are found by rendering the chat template on the prefixes of the conversation: message k
owns the tokens from where the first k − 1 messages end to where the first k end (its role header and end-of-turn
tokens included), each end taken as the longest common prefix of that rendering and the row's `input_ids`, so a
template that renders an earlier turn differently once the conversation goes on (dropping a reasoning block, say)
moves a boundary back instead of misaligning every token after it. The whole conversation must render to the
tokenized row itself (an error otherwise: another chat template was used). Truncation, packing and padding-free then
carry the column like the tokens (`trl_priority.data.columns`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from trl.data_utils import common_prefix_length


def _weight(value: Any, where: str) -> float:
    """A finite number (`None`: not given, 1), or an error that names where it stands."""
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(
            f"{where}: `weight` must be a finite number (1 to learn, 0 to skip, negative to unlearn with the bounded "
            f"loss), got {value!r}. Fix the value, or remove it (a missing weight is 1)."
        )
    return float(value)


def conversation_of(example: Mapping[str, Any]) -> list[Mapping[str, Any]] | None:
    """The messages of a conversational row (`messages`, or `prompt` + `completion`), None for a text row."""
    if isinstance(example.get("messages"), list):
        return example["messages"]
    prompt, completion = example.get("prompt"), example.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):
        return [*prompt, *completion]
    return None


def _render(tokenizer, messages: Sequence[Mapping[str, Any]], example: Mapping[str, Any]) -> list[int]:
    """Token ids of `messages` under the chat template, with the row's `tools` and `chat_template_kwargs` as TRL
    tokenizes them (`SFTTrainer._prepare_dataset`)."""
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}
    return list(tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True, **kwargs)["input_ids"])


def message_ends(
    tokenizer, messages: Sequence[Mapping[str, Any]], input_ids: Sequence[int], example, index: int = 0
) -> list[int]:
    """For each message k, the token position where the first k + 1 messages end in `input_ids` (non-decreasing)."""
    ends, end = [], 0
    for k in range(1, len(messages) + 1):
        try:
            rendered = _render(tokenizer, messages[:k], example)
        except Exception as error:  # a template that refuses a partial conversation (jinja's `raise_exception`)
            raise ValueError(
                f"Example {index}: its messages carry weights, which are placed by rendering the chat template on the "
                f"first messages of the conversation, but the template refuses the first {k} ({error}). Give the "
                "weight per example (a `weight` column) instead, or use a template that renders any prefix."
            ) from error
        end = max(end, common_prefix_length(rendered, list(input_ids)))
        ends.append(end)
    return ends


def message_token_weights(
    example: Mapping[str, Any], tokenizer, index: int, priority_args: Mapping[str, Any] | None = None
) -> list[float]:
    """One weight per token of `example["input_ids"]`: its message's `weight` (1 when absent) times the row's `weight`
    column (1 when absent). Errors name the row and the message."""
    input_ids = example["input_ids"]
    row_weight = _weight(example.get("weight"), f"Example {index}, column 'weight'")
    messages = conversation_of(example)
    if messages is None or not any(isinstance(m, Mapping) and m.get("weight") is not None for m in messages):
        return [row_weight] * len(input_ids)
    weights = [
        _weight(message.get("weight"), f"Example {index}, message {i} ({message.get('role', '?')})")
        for i, message in enumerate(messages)
    ]
    ends = message_ends(tokenizer, messages, input_ids, example, index)
    if ends[-1] != len(input_ids):  # the whole conversation, rendered, must be the row TRL tokenized
        raise ValueError(
            f"Example {index}: its messages carry weights, but the tokenizer's chat template renders the conversation "
            f"differently from the tokenized row (they agree on {ends[-1]} of {len(input_ids)} tokens), so its "
            "tokens cannot be given to their messages. Tokenize with the tokenizer's own chat template "
            "(`chat_template_path` is not supported with per-message weights), or give a `weight` column instead."
        )
    per_token, start = [], 0
    for weight, end in zip(weights, ends):
        per_token += [weight * row_weight] * (end - start)
        start = end
    return per_token
