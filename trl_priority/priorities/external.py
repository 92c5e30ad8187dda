"""External priorities: Φ from the structure of the data or from labels in it, not from any model."""

from __future__ import annotations

import torch

from .registry import NonNegative, register_priority


@register_priority(
    regime="soft",
    paper="Chatterjee et al. 2025, On the Effect of Instruction Tuning Loss on Generalization (WIT), TACL 13, "
    "arXiv 2507.07817",
    trains_prompt_tokens=True,
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

    Prompt tokens keep their labels during data preparation (`completion_only_loss` is turned off), and the
    `response_mask` statistic tells them apart, so the dataset must be prompt-completion. Defaults 0.4 / 0.6 are the
    official run scripts' values; the paper recommends λ_p in [0, 0.5] and λ_r in [0.5, 1]. (0, 1) is conventional
    instruction tuning and (1, 1) continued pre-training. The loss is divided by all supervised tokens (prompt and
    response), which is the paper's normaliser whenever both weights are non-zero.
    """
    weights = torch.where(response_mask.bool(), response_weight, prompt_weight)  # (B, T-1)
    return weights * mask
