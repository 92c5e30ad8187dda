"""External priorities: Φ from the structure of the data or from labels in it, not from any model."""

from __future__ import annotations

import math
from typing import Annotated

import torch

from ..statistics import register_data_statistic
from .registry import NonNegative, PriorityError, Range, register_priority


register_data_statistic(
    "noise",
    level="example",
    hint="RobustFT reads one noise score per example (a number >= 0, 0 for a clean response) from a 'noise' column",
)


def _check_wit_weights(args: dict) -> None:
    if args["prompt_weight"] == 0 and args["response_weight"] == 0:
        raise PriorityError(
            "priority_args for 'wit': prompt_weight and response_weight are both 0, so no token would train. Set "
            "response_weight > 0 (the paper recommends 0.5 to 1)."
        )


@register_priority(
    regime="soft",
    paper="Chatterjee et al. 2025, On the Effect of Instruction Tuning Loss on Generalization (WIT), TACL 13, "
    "arXiv 2507.07817",
    trains_prompt_tokens=lambda args: args["prompt_weight"] > 0,
    validate=_check_wit_weights,
)
def wit(
    response_mask: torch.Tensor,
    mask: torch.Tensor,
    *,
    prompt_weight: NonNegative = 0.4,
    response_weight: NonNegative = 0.6,
) -> torch.Tensor:
    """WIT (Weighted Instruction Tuning): train on the prompt too, with its own weight.

    Paper: Chatterjee, Renduchintala, Bhatia, Chakraborty 2025, "On the Effect of Instruction Tuning Loss on
    Generalization", TACL 13:1360-1380, arXiv 2507.07817; code github.com/kowndinya-renduchintala/WIT.

        Φ_t = λ_r = response_weight   on response (completion) tokens
        Φ_t = λ_p = prompt_weight     on prompt tokens

    With λ_p > 0, prompt tokens keep their labels during data preparation (`completion_only_loss` is turned off),
    and the `response_mask` statistic tells them apart, so the dataset must be prompt-completion. Defaults 0.4 / 0.6
    are the official run scripts' values; the paper recommends λ_p in [0, 0.5] and λ_r in [0.5, 1].

    The loss is divided by the tokens with a non-zero weight, as in the paper: with λ_p > 0 every prompt and response
    token; with λ_p = 0 the prompt tokens are not supervised at all (their labels are masked, as with
    `completion_only_loss`), so N counts the response tokens only and (0, 1) is exactly conventional completion-only
    instruction tuning (tested against `SFTTrainer`). (1, 1) is continued pre-training on every token. Both weights 0
    is an error (nothing would train).
    """
    weights = torch.where(response_mask.bool(), response_weight, prompt_weight)  # (B, T-1)
    return weights * mask


@register_priority(
    regime="soft",
    paper="Luo et al. 2024, RobustFT: Robust Supervised Fine-tuning for LLMs under Noisy Response, arXiv 2412.14922",
)
def robustft(
    noise: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: NonNegative = 1.0,
    max_noise: Annotated[float, Range(0, None)] = math.inf,
) -> torch.Tensor:
    """RobustFT (soft form): down-weight every token of an example by how noisy its response is judged to be.

    Paper: Luo et al. 2024, "RobustFT: Robust Supervised Fine-tuning for Large Language Models under Noisy Response",
    arXiv 2412.14922; code github.com/luo-junyu/RobustFT (`robustft.py`).

        Φ_t = exp(−gamma · noise_e) · 1[noise_e ≤ max_noise],   e = the example of token t

    `noise` is an example-level column (one number ≥ 0 per example, broadcast to its tokens before truncation and
    packing): 0 for a response judged clean. The official pipeline detects noisy responses by consistency (the
    labelled answer must agree with the model's direct and reasoning-enhanced answers), relabels them with retrieved
    context, scores each relabelled response by its mean token NLL ("entropy") and keeps a relabelled example only if
    that score is below the median; the rest are dropped, and plain SFT follows. Its weights are thus 0 or 1.

    Choices: this is a soft adaptation of that selection: noise = 0 for clean examples and the relabelled response's
    score otherwise, gamma = 1 by default (the paper has no gamma: it is ours), and `max_noise` reproduces the paper's
    hard selection exactly (set it to the median score; gamma = 0 then gives Φ ∈ {0, 1}). The detection and
    relabelling stages are data preparation, outside the trainer. The loss is divided by all supervised tokens.
    """
    weight = torch.exp(-gamma * noise)  # (B, T-1)
    return torch.where(noise <= max_noise, weight, 0.0) * mask
