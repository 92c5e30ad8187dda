"""Multimodal priority: PAINT, text tokens weighted by the attention they pay to the image."""

from __future__ import annotations

import torch

from trl_priority.priorities.registry import NonNegative, PositiveInt, register_priority


@register_priority(
    regime="soft",
    paper="Arif et al. 2025, PAINT: Paying Attention to INformed Tokens to Mitigate Hallucination in Large "
    "Vision-Language Model, arXiv 2501.12206 (its attention signal as an SFT token weight, per the position paper)",
)
def paint(
    image_attention: torch.Tensor, mask: torch.Tensor, *, alpha: NonNegative = 1.0, attention_layers: PositiveInt = 2
) -> torch.Tensor:
    """PAINT: up-weight the text tokens whose prediction attends most to the image.

    Paper: Arif, Dip, Hussain, Zhang, Thomas 2025, "PAINT: Paying Attention to INformed Tokens to Mitigate
    Hallucination in Large Vision-Language Model", arXiv 2501.12206; position paper (arXiv 2602.01227), Table 1:

        Φ_t = 1 + α · a_t,   a_t = mean over the last `attention_layers` decoder layers and their heads of
                                   Σ_{k: image token} A[t, k]

    `image_attention` (a_t ∈ [0, 1]) is the attention mass the query at position t, the one that predicts y_{t+1}
    (aligned like `logps`), puts on the image tokens, from eager attention weights captured only in the layers read.
    Load the model with `attn_implementation="eager"`; a kernel that returns no weights is an error. Defaults ours:
    α = 1 (Φ ∈ [1, 2]), the last 2 layers.

    What the paper does and this does not: PAINT is an inference-time intervention that rescales the attention heads
    of intermediate layers towards informed image tokens, without training; the position paper reads its signal as a
    token priority, which is what this trains with. Which layers and heads PAINT edits is not reproduced.
    """
    return (1 + alpha * image_attention) * mask  # (B, T-1)
