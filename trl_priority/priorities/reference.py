"""Reference priorities: Φ compares the policy with a frozen reference model, or reads the reference alone.

The reference statistics (`ref_logps`, `ref_mass`, ...) come from whatever reference the trainer was given: a
separate frozen model, the LoRA base with the adapter switched off, or a user's callback (see
`trl_priority.reference`). The functions below only see tensors.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..selection import TopFraction
from .registry import Fraction, Probability, register_priority


def excess_loss(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_Δ(t) = L_θ(t) − L_ref(t) = ref_logps_t − logps_t: how much worse the policy does than the reference."""
    return (ref_logps - logps) * mask  # (B, T-1)


@register_priority(
    regime="hard",
    paper="Lin et al. 2024, Rho-1: Not All Tokens Are What You Need, arXiv 2404.07965 (NeurIPS 2024)",
    reference="explicit",
    selection=TopFraction(excess_loss, fraction="ratio", scope="scope"),
)
def rho1(
    selected: torch.Tensor,
    mask: torch.Tensor,
    *,
    ratio: Fraction = 0.6,
    scope: Literal["step", "micro_batch"] = "step",
) -> torch.Tensor:
    """Rho-1 (Selective Language Modeling): train on the tokens with the highest excess loss over a reference.

    Paper: Lin et al. 2024, "Rho-1: Not All Tokens Are What You Need", arXiv 2404.07965, Eq. 3-5.

        L_Δ(t) = L_θ(t) − L_ref(t) = ref_logps_t − logps_t        (excess loss, `excess_loss`)
        Φ_t    = 1[t is among the top k = round(ratio · n) supervised tokens of the batch by L_Δ]

    The reference is a model trained on curated, high-quality data; against the starting model every excess loss is
    0 at step 0, so this method requires an explicit reference (`ref_model=` or `ref_model_name_or_path`).
    `ratio` = 0.6 is the paper's value for its 1.1B model (0.7 for 7B).

    Choices (the paper released no training code): the batch is the optimizer step's (`scope="step"`, the default):
    every micro-batch of the step on every process is scored first (without gradient, in eval mode), and the top k of
    all their supervised tokens are kept, so the selection does not depend on gradient accumulation or the number of
    GPUs; `scope="micro_batch"` selects within each micro-batch on each process, without the scoring pass. k =
    round(ratio · n), at least 1, exactly k tokens kept, ties broken by position. The paper divides the loss by the
    kept count k; here it is divided by all supervised tokens, like every method: a constant factor 1/ratio, which
    AdamW's update does not see (it normalises the gradient's scale away), so the paper's learning rate applies as is.
    """
    return selected.float() * mask  # (B, T-1)


@register_priority(
    regime="soft",
    paper="Wang, Li, Salzmann, Frossard 2026, PriFT: Prior-Support Guided SFT, arXiv 2606.09396",
)
def prift_prob(ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PriFT-prob: weight each token by its probability under the frozen pretrained model.

    Paper: Wang et al. 2026, "PriFT: Prior-Support Guided Supervised Fine-Tuning", arXiv 2606.09396; code
    github.com/wang-kee/PriFT (`prift_weights.py`).

        Φ_t = q(y_t) = exp(ref_logps_t),   q = the frozen model the fine-tuning starts from

    Tokens the prior already supports are reinforced; tokens outside its support (often noise) barely move it. By
    default the reference is the starting model: with LoRA, the base with the adapter off.
    """
    return ref_logps.exp() * mask  # (B, T-1)


@register_priority(
    regime="hard",
    paper="Wang, Li, Salzmann, Frossard 2026, PriFT: Prior-Support Guided SFT, arXiv 2606.09396",
)
def prift_mass(ref_mass: torch.Tensor, mask: torch.Tensor, *, threshold: Probability = 0.5) -> torch.Tensor:
    """PriFT-mass: keep the tokens that lie inside the bulk of the frozen prior's next-token distribution.

    Paper: Wang et al. 2026, "PriFT: Prior-Support Guided Supervised Fine-Tuning", arXiv 2606.09396; code
    github.com/wang-kee/PriFT (`prift_weights.py`).

        u_t = Σ_v q(v)·1[q(v) < q(y_t)] + q(y_t)      (the `ref_mass` statistic)
        Φ_t = 1[u_t ≥ threshold],  threshold = 0.5

    u_t is the prior probability of drawing a token no more likely than y_t: 1 for the prior's argmax, near 0 for a
    token deep in the tail. Ties follow the official code (strict <, plus the label's own mass); its README writes ≤,
    which differs only for tokens with exactly equal probability. Needs the reference's full distribution: computed
    in chunks of positions.
    """
    return (ref_mass >= threshold).float() * mask  # (B, T-1)
