"""Structural priority: Φ over parameters instead of tokens. S2FT selects sparse attention heads and FFN channels.

Paper: Yang et al. 2024, *S2FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured Sparsity*,
NeurIPS 2024, arXiv 2412.06289. Position paper (arXiv 2602.01227), Table 1: Φ(x_head) = 𝕀[∇_W L > τ].

What is selected. In every decoder layer, attention head h owns the input channels [h·d, (h+1)·d) of the output
projection `o_proj` (weight `(hidden, H·d)`), and FFN channel c owns input channel c of `down_proj` (weight
`(hidden, I)`). S2FT trains only these column slices of the two output projections: the heads and channels it keeps
are co-permuted into one dense block so that the update is a small dense matrix, and everything else stays frozen.

How it is selected (gradient sensitivity, the table's reading). On a few calibration batches, with the model as it
starts, the gradient G = ∇_W L of the mean token NLL is accumulated; the score of a slice is the Frobenius norm of
its columns:

    s_h = ‖G_o[:, h·d:(h+1)·d]‖_F   (head h of a layer)        s_c = ‖G_down[:, c]‖_2   (channel c of a layer)

and Φ(slice) = 𝕀[s > τ] (`threshold`), or, by default, the top `head_ratio` of the heads and `channel_ratio` of the
channels of each layer by score (the paper selects a fixed budget per layer; a global τ on raw norms would give all
the budget to the layers with the largest gradients). `strategy: random` selects the same budgets uniformly at random
(the paper reports random selection competitive and uses it as its default; gradient sensitivity is what Table 1
names, so it is the default here).

How the selected slices train. Instead of physically co-permuting the weights (which changes the checkpoint's
layout), each selected slice gets a trainable update Δ of shape `(hidden, k)` (k = selected heads·d, or selected
channels), added by a forward hook: `out += x[..., idx] @ Δᵀ`, which is exactly `x @ (W + Δ scattered into
W[:, idx])ᵀ`. Every original parameter is frozen, so the optimizer holds state for the Δs only: the same trainable
set and optimizer memory as S2FT's dense block, without its permutation bookkeeping. A state-dict hook folds Δ into
`W[:, idx]` whenever the model's state dict is read, so a saved model is an ordinary checkpoint of its architecture
that loads without trl-priority.

Why a set-up step and not a token method: the choice is about which parameters train, not about how much each token
counts, so it composes with any `priority` (Φ over tokens) unchanged. The trainer applies it once, after the model is
built and before the optimizer is (`PrioritySFTConfig.structural_priority="s2ft"`); `apply_s2ft` is the same step
for a model used outside the trainer.

Choices where the paper leaves room, ours: the sensitivity is the gradient norm of each slice (not |W·G| or the
activation norm the paper also studies), accumulated over `calibration_batches` = 4 batches of the training data; the
defaults `head_ratio` = 0.25, `channel_ratio` = 0.05 and at least one head and one channel per layer; only the
output projections train (the paper's default; its variants that also train Q/K/V rows are not here); full
fine-tuning only (S2FT replaces LoRA: combining it with a `peft_config` is an error).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


STRUCTURAL_PRIORITIES = ("s2ft",)
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")  # what the calibration forward passes on


@dataclass(frozen=True)
class S2FTArgs:
    """S2FT's hyperparameters (`structural_priority_args`); see the module docstring for where each comes from.

    Attributes:
        head_ratio: fraction of each layer's attention heads that train (at least one).
        channel_ratio: fraction of each layer's FFN channels that train (at least one).
        threshold: τ. When set, a slice trains when its gradient norm is above τ, and the ratios are not used.
        strategy: "gradient" (sensitivity on calibration batches) or "random".
        calibration_batches: training batches the gradient is accumulated over.
        seed: for `strategy: random`.
    """

    head_ratio: float = 0.25
    channel_ratio: float = 0.05
    threshold: float | None = None
    strategy: str = "gradient"
    calibration_batches: int = 4
    seed: int = 0

    def __post_init__(self):
        for name in ("head_ratio", "channel_ratio"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"S2FT `{name}={value}` is outside (0, 1]: the fraction of each layer that trains.")
        if self.strategy not in ("gradient", "random"):
            raise ValueError(f"S2FT `strategy={self.strategy!r}` is not one of 'gradient', 'random'.")
        if self.threshold is not None and self.strategy == "random":
            raise ValueError("S2FT `threshold` applies to gradient scores; with `strategy: random` drop it.")
        if self.calibration_batches < 1:
            raise ValueError(f"S2FT `calibration_batches={self.calibration_batches}` must be at least 1.")

    @classmethod
    def from_mapping(cls, args: Mapping[str, Any] | None) -> S2FTArgs:
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(args or {}) - set(valid))
        if unknown:
            raise ValueError(f"Unknown S2FT argument(s) {unknown} in `structural_priority_args`; valid: {valid}.")
        return cls(**(args or {}))


@dataclass(frozen=True)
class Block:
    """One transformer layer's two output projections and the shape that maps heads to their columns."""

    attn_out: nn.Linear  # o_proj: weight (hidden, H·d)
    ffn_out: nn.Linear  # down_proj: weight (hidden, I)
    num_heads: int
    head_dim: int


def find_blocks(model: nn.Module) -> list[Block]:
    """The decoder layers of a Llama-, Qwen- or Mistral-shaped model (`self_attn.o_proj`, `mlp.down_proj`)."""
    blocks = []
    for module in model.modules():
        attention, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
        o_proj, down_proj = getattr(attention, "o_proj", None), getattr(mlp, "down_proj", None)
        if isinstance(o_proj, nn.Linear) and isinstance(down_proj, nn.Linear):
            head_dim = getattr(attention, "head_dim", None)
            if head_dim is None or o_proj.in_features % head_dim:
                raise ValueError(f"S2FT cannot tell the heads of {type(attention).__name__} apart: no `head_dim`.")
            blocks.append(Block(o_proj, down_proj, o_proj.in_features // head_dim, head_dim))
    if not blocks:
        raise ValueError(
            f"S2FT found no decoder layer with `self_attn.o_proj` and `mlp.down_proj` in {type(model).__name__}: it "
            "supports Llama-, Qwen- and Mistral-shaped models. Drop `structural_priority` for this model."
        )
    return blocks


def calibration_gradients(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], blocks: list[Block]):
    """∇_W of the mean token NLL, summed over `batches`, for each block's `(o_proj, down_proj)` weights."""
    weights = [w for block in blocks for w in (block.attn_out.weight, block.ffn_out.weight)]
    grads = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    device = weights[0].device
    was_training = model.training
    model.eval()  # no dropout: the scores are a property of the weights, not of a dropout draw
    try:
        for batch in batches:
            inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
            if "labels" not in inputs:
                raise ValueError("S2FT calibration batches need `labels` (the collated training batches have them).")
            with torch.enable_grad():
                for w in weights:
                    w.requires_grad_(True)
                loss = model(**inputs).loss
                for acc, g in zip(grads, torch.autograd.grad(loss, weights)):
                    acc += g.float()
    finally:
        model.train(was_training)
    return [(grads[2 * i], grads[2 * i + 1]) for i in range(len(blocks))]


def slice_scores(attn_grad: torch.Tensor, ffn_grad: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient sensitivity per head `(H,)` and per FFN channel `(I,)`: the norms of their columns of G."""
    hidden, width = attn_grad.shape  # (hidden, H·d)
    heads = attn_grad.reshape(hidden, width // head_dim, head_dim).square().sum(dim=(0, 2)).sqrt()  # (H,)
    channels = ffn_grad.square().sum(dim=0).sqrt()  # (I,)
    return heads, channels


def select(scores: torch.Tensor, ratio: float, threshold: float | None) -> torch.Tensor:
    """Indices of the selected slices, ascending: scores above τ, else the top `ratio` (at least one)."""
    if threshold is not None:
        return (scores > threshold).nonzero().flatten()
    k = max(1, math.ceil(ratio * scores.numel()))
    return scores.topk(k).indices.sort().values


def head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The input channels of `o_proj` that heads `heads` own: `(len(heads)·head_dim,)`."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


def _add_delta(linear: nn.Linear, columns: torch.Tensor) -> None:
    """A trainable `(out, k)` update of `linear.weight[:, columns]`, added by a forward hook and folded into the
    weight whenever the state dict is read."""
    linear.register_buffer("s2ft_columns", columns.to(linear.weight.device), persistent=False)
    delta = torch.zeros(linear.out_features, len(columns), dtype=linear.weight.dtype, device=linear.weight.device)
    linear.s2ft_delta = nn.Parameter(delta)  # (out, k)

    def forward_hook(module, args, output):
        x = args[0][..., module.s2ft_columns]  # (..., k)
        return output + nn.functional.linear(x, module.s2ft_delta)  # (..., out)

    def fold_into_weight(module, state_dict, prefix, local_metadata):
        key = prefix + "weight"
        if key in state_dict:  # a plain checkpoint of the architecture: W with Δ added to its columns
            weight = state_dict[key].clone()
            weight[:, module.s2ft_columns] += module.s2ft_delta.detach().to(weight.dtype)
            state_dict[key] = weight
        state_dict.pop(prefix + "s2ft_delta", None)

    linear._s2ft_handles = (
        linear.register_forward_hook(forward_hook),
        linear.register_state_dict_post_hook(fold_into_weight),
    )


def apply_s2ft(
    model: nn.Module, calibration_batches: Iterable[Mapping[str, torch.Tensor]] | None, args: S2FTArgs | None = None
) -> dict[str, Any]:
    """Select S2FT's heads and channels and make them the only trainable parameters of `model` (in place).

    `calibration_batches`: collated training batches (`input_ids`, `labels`, ...), at least `args.calibration_batches`
    of them are read for `strategy: gradient`; unused for `random`. Returns the selection: per layer, the heads and
    FFN channels that train, and the trainable-parameter count.
    """
    args = args or S2FTArgs()
    blocks = find_blocks(model)
    if any(hasattr(block.attn_out, "s2ft_delta") for block in blocks):
        raise ValueError("S2FT was already applied to this model.")
    if args.strategy == "gradient":
        batches = []
        for batch in calibration_batches or ():
            batches.append(batch)
            if len(batches) == args.calibration_batches:
                break
        if not batches:
            raise ValueError("S2FT `strategy: gradient` needs calibration batches; none were given.")
        gradients = calibration_gradients(model, batches, blocks)
        scores = [slice_scores(g_attn, g_ffn, block.head_dim) for block, (g_attn, g_ffn) in zip(blocks, gradients)]
    else:
        generator = torch.Generator().manual_seed(args.seed)
        scores = [
            (torch.rand(b.num_heads, generator=generator), torch.rand(b.ffn_out.in_features, generator=generator))
            for b in blocks
        ]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    selection = {"heads": [], "channels": [], "scores": scores}
    for block, (head_scores, channel_scores) in zip(blocks, scores):
        heads = select(head_scores, args.head_ratio, args.threshold)  # (h,)
        channels = select(channel_scores, args.channel_ratio, args.threshold)  # (c,)
        selection["heads"].append(heads.tolist())
        selection["channels"].append(channels.tolist())
        if len(heads):
            _add_delta(block.attn_out, head_columns(heads, block.head_dim))
        if len(channels):
            _add_delta(block.ffn_out, channels)
    selection["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if selection["trainable_parameters"] == 0:
        raise ValueError(
            f"S2FT `threshold={args.threshold}` selected no head and no channel: every gradient norm is at or below "
            "it. Lower `threshold`, or drop it to select the top `head_ratio` / `channel_ratio`."
        )
    return selection


def merge_s2ft(model: nn.Module) -> None:
    """Fold every S2FT update into its weight and remove the hooks: `model` is a plain model again (in place)."""
    for module in model.modules():
        if hasattr(module, "s2ft_delta"):
            with torch.no_grad():
                module.weight[:, module.s2ft_columns] += module.s2ft_delta.to(module.weight.dtype)
            for handle in module._s2ft_handles:
                handle.remove()
            del module.s2ft_delta, module.s2ft_columns, module._s2ft_handles


def apply_structural_priority(trainer) -> None:
    """The trainer's set-up step for `args.structural_priority`: for S2FT, calibration on the first training batches,
    then the selected slices become the only trainable parameters. Logs the selection."""
    args = trainer.args
    if args.structural_priority is None:
        return
    from trl_priority.statistics import causal_lm_of

    if getattr(trainer.model, "peft_config", None):
        raise ValueError(
            "`structural_priority='s2ft'` trains sparse slices of the full model and replaces LoRA: drop `use_peft` "
            "/ `peft_config`, or drop `structural_priority`."
        )
    s2ft_args = S2FTArgs.from_mapping(args.structural_priority_args)
    batches = trainer.get_train_dataloader() if s2ft_args.strategy == "gradient" else None
    selection = apply_s2ft(causal_lm_of(trainer.model), batches, s2ft_args)
    trainer.structural_selection = selection
    total = sum(p.numel() for p in trainer.model.parameters())
    trainer.accelerator.print(
        f"trl-priority: S2FT trains {selection['trainable_parameters']} of {total} parameters "
        f"({100 * selection['trainable_parameters'] / total:.2f}%): heads {selection['heads']}, "
        f"FFN channels per layer {[len(c) for c in selection['channels']]}"
    )
