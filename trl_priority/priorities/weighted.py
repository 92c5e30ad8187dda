"""Weights given in the data: Φ is the weight the user wrote on each message, or on each example.

- `weighted`: Φ_t = w_message(t) · w_example(t), read from a `weight` on each message of a conversation and a `weight`
  column (`trl_priority.data.weights`).
"""

from __future__ import annotations

import torch

from trl_priority.data.weights import message_token_weights
from trl_priority.priorities.registry import register_priority
from trl_priority.statistics import register_data_statistic


register_data_statistic(
    "data_weight",
    compute=message_token_weights,
    hint="`weighted` reads a `weight` on the messages of a conversation (Mistral's format: a number per message, 1 "
    "when absent) and/or a `weight` column (one number per example, 1 when absent)",
)


@register_priority(
    regime="signed",
    paper="weights given in the data: TRL issue 5761 and PRs 5951/5952 (a `weight` column per example); Mistral's "
    "fine-tuning format (a `weight` per message); no paper",
)
def weighted(data_weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Weights the user already has in the data: per message, per example, or both.

    Paper: none; the sources are users' requests and an existing format. TRL issue 5761 and PRs 5951/5952 (closed for
    lack of a home) ask for a per-example `weight` column that scales each example's loss; Mistral's fine-tuning
    format (mistral-finetune) puts a `weight` on each message of a conversation ("this turn is good, this one is
    bad"); Unsloth issue 538 asks for the same.

        Φ_t = w_m(t) · w_e(t)

    with w_m(t) the `weight` of the message that token t belongs to (1 when the message has none, or for a text
    row) and w_e(t) the row's `weight` column (1 when the dataset has no such column, or the value is null). A
    message owns its role header and end-of-turn tokens as well as its content, found by rendering the chat template
    on the prefixes of the conversation (`trl_priority.data.weights`); which of those tokens train is TRL's choice as
    usual (`assistant_only_loss`, `completion_only_loss`).

    Choices: weights may be any finite number: 1 learns as SFT, 0 skips, a value between scales, a negative value
    unlearns the message with the objective's bounded unlikelihood |w|·(−log(1 − p)) (`negative_loss: ascent` for
    plain gradient ascent), so the method is registered signed; Mistral's format uses 0 and 1 only. The loss is
    normalised by N, the supervised tokens, not by Σ w: a batch of weight-0.5 examples trains at half the rate, as
    the PRs' per-example weighting does. A non-number or non-finite weight is an error naming the row and message.
    """
    return data_weight * mask  # (B, T-1)
