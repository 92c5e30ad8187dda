"""The per-token metrics a priority run logs: TRL's SFT metrics (entropy, token accuracy, NLL) and the priority's own
(mean Φ, kept and negative fractions, effective tokens, warm-up weight, scheduled hyperparameters, term values).

`token_metric_sums` gives one vector of per-batch sums, gathered by the trainer in one call; `append_token_metrics`
checks the run (`checks.RunGuard`) and appends the per-token values to the trainer's metrics, which `SFTTrainer.log`
averages over the log window like TRL's own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from trl_priority.priorities.schedules import warmup_weight


def token_metric_sums(outputs, phi: torch.Tensor, term_values: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One vector of every per-batch sum (tokens, entropy, correct, NLL, Φ, kept, negative, |Φ|, each term's value),
    so that one gather sums them over processes."""
    mask = outputs.label_mask
    return torch.stack(
        [
            mask.sum().float(),
            outputs.entropy.detach().sum(),
            outputs.is_top1.sum().float(),
            -outputs.log_probs.detach().sum(),
            phi.sum(),
            (phi > 0).sum().float(),
            (phi < 0).sum().float(),
            phi.abs().sum(),
            *(value.float() for value in term_values.values()),
        ]
    )


def append_token_metrics(
    metrics,
    gathered: torch.Tensor,
    outputs,
    term_names,
    *,
    run_guard,
    global_step: int,
    progress: float,
    warmup_ratio: float,
    schedule: Mapping[str, Any] | None,
    step_args: Mapping[str, Any],
    step_normalised: bool,
    accumulation_steps: int | None,
    num_processes: int,
) -> None:
    """Check the run on the gathered sums (`token_metric_sums`, summed over processes) and append the per-token
    metrics to `metrics` (the trainer's `_metrics[mode]`)."""
    mask = outputs.label_mask
    num_valid, entropy, correct, nll, phi_sum, kept, negative, effective = gathered[:8].tolist()
    bad = int((~outputs.log_probs.detach()[mask].isfinite()).sum()) if not math.isfinite(nll) else 0
    run_guard.check_nll(nll, bad, int(mask.sum()))  # a diverged model: Trainer would log loss 0
    run_guard.check_phi(num_valid, effective, global_step)

    def per_token(value: float) -> float:
        return value / num_valid if num_valid > 0 else 0.0

    metrics["entropy"].append(per_token(entropy))
    metrics["mean_token_accuracy"].append(per_token(correct))
    metrics["nll"].append(per_token(nll))
    metrics["priority/mean"].append(per_token(phi_sum))
    metrics["priority/kept_fraction"].append(per_token(kept))
    metrics["priority/negative_fraction"].append(per_token(negative))
    metrics["priority/effective_tokens"].append(effective)
    if warmup_ratio > 0:
        metrics["priority/warmup_weight"].append(warmup_weight(progress, warmup_ratio))
    if schedule:
        for name in schedule:
            metrics[f"priority/{name}"].append(float(step_args[name]))
    # A term's value for the step: each micro-batch's part (divided by the step's N) summed over processes and
    # accumulation steps. The log averages the appended values over the micro-steps of its window, so each
    # micro-step appends its part times the accumulation steps. Without a step-wide N (evaluation), each
    # process's value is already a mean: average them.
    for name, value in zip(term_names, gathered[8:].tolist()):
        if step_normalised:
            value = value * accumulation_steps
        else:
            value = value / num_processes
        metrics[name].append(value)


def local_token_count(inputs: Mapping[str, Any]) -> torch.Tensor:
    """The tokens of this process's batch, padding excluded: padding-free batches have no attention mask, and every
    position of the packed row is a token."""
    if "attention_mask" in inputs:
        return inputs["attention_mask"].sum()
    return torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
