"""Differentially private training for any token priority (DP-SGD through Opacus), the privacy half of ATDP.

Paper: Yu et al. 2025 (ATDP), as read in the position paper (arXiv 2602.01227, Table 1 and §5): differentially
private fine-tuning whose privacy budget is allocated per token by a utility score derived from PII detection,
Φ(x) ∝ Utility(x) / PrivacyBudget. The Φ half is the registered priority `atdp`
(`trl_priority.priorities.privacy`); this module makes the training differentially private, for that priority or
any other.

DP-SGD (Abadi et al. 2016) with Opacus, nothing re-implemented: per-example gradients of the trainable parameters
(Opacus' `GradSampleModule` hooks: with LoRA, the adapter's matrices only), each clipped to `max_grad_norm` C,
summed, Gaussian noise N(0, σ²C²) added (σ = `noise_multiplier`), divided by the batch size (Opacus' `DPOptimizer`
around the optimizer the trainer would have built), and the privacy spent tracked by Opacus' RDP accountant at sample
rate q = batch size / training examples: ε(δ) after every optimizer step, logged as `dp/epsilon` (with `dp/delta`).

Why a per-token Φ is a budget allocation here: each example's clipped gradient has norm ≤ C whatever its loss, so
the example is the unit of privacy. Inside it, Φ decides how that bounded contribution is shared between tokens: a
PII token with Φ = 0.1 gets a tenth of a plain token's share, and the guarantee (ε, δ) is unchanged by Φ.

Limits, each an error at set-up rather than a silent weaker guarantee: one process, `gradient_accumulation_steps`
= 1 (Opacus' per-example gradients would otherwise span several backward passes of the trainer), no packing or
padding-free batches (a row must be one example, or the unit of privacy is wrong). The accountant assumes Poisson
sampling; the trainer draws shuffled fixed-size batches (the usual approximation of DP-SGD in practice, not Opacus'
`DPDataLoader`): the logged ε is the RDP accountant's at that sample rate. Defaults, ours: σ = 1.0, C = 1.0,
δ = 1e-5 (below 1/N for the datasets this package ships).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback


@dataclass(frozen=True)
class DPArgs:
    """DP-SGD's settings (`differential_privacy` in the config).

    Attributes:
        noise_multiplier: σ, the Gaussian noise's standard deviation in units of C.
        max_grad_norm: C, the per-example clipping norm.
        delta: δ of the (ε, δ) guarantee reported.
    """

    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5

    def __post_init__(self):
        if self.noise_multiplier < 0 or self.max_grad_norm <= 0 or not 0 < self.delta < 1:
            raise ValueError(
                f"differential_privacy: need noise_multiplier ≥ 0, max_grad_norm > 0 and 0 < delta < 1 (got {self})."
            )

    @classmethod
    def from_mapping(cls, args: Mapping[str, Any] | None) -> DPArgs:
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(args or {}) - set(valid))
        if unknown:
            raise ValueError(f"Unknown `differential_privacy` setting(s) {unknown}; valid: {valid}.")
        return cls(**(args or {}))


def _import_opacus():
    try:
        import opacus
    except ImportError:
        raise ImportError(
            "`differential_privacy` trains with Opacus, which is not installed: pip install 'trl-priority[dp]'."
        ) from None
    return opacus


def check_supported(trainer) -> None:
    """Refuse the settings under which the per-example clipping would not be per example."""
    args = trainer.args
    problems = []
    if args.gradient_accumulation_steps != 1:
        problems.append(f"gradient_accumulation_steps={args.gradient_accumulation_steps} (use 1)")
    if trainer.accelerator.num_processes != 1:
        problems.append(f"{trainer.accelerator.num_processes} processes (use 1)")
    if args.packing or args.padding_free:
        problems.append("packing / padding_free (a row must be one example)")
    if problems:
        raise ValueError("`differential_privacy` (DP-SGD with Opacus) does not support: " + "; ".join(problems) + ".")


class PrivacyAccountantCallback(TrainerCallback):
    """After each optimizer step: clears Opacus' per-example gradients (the Trainer clears `p.grad` with
    `model.zero_grad()`, which Opacus does not see), steps the RDP accountant and puts ε(δ) into the logged metrics."""

    def __init__(self, trainer, dp: DPArgs, sample_rate: float, dp_optimizer):
        from opacus.accountants import RDPAccountant

        self.trainer, self.dp, self.sample_rate, self.dp_optimizer = trainer, dp, sample_rate, dp_optimizer
        self.accountant = RDPAccountant()

    def epsilon(self) -> float:
        return self.accountant.get_epsilon(self.dp.delta) if self.accountant.history else 0.0

    def on_step_end(self, args, state, control, **kwargs):
        self.dp_optimizer.zero_grad(set_to_none=True)  # drops `grad_sample`; the next step would refuse stale ones
        self.accountant.step(noise_multiplier=self.dp.noise_multiplier, sample_rate=self.sample_rate)
        metrics = self.trainer._metrics["train"]
        metrics["dp/epsilon"] = [self.epsilon()]  # the running total, not an average over the logging window
        metrics["dp/delta"] = [self.dp.delta]
        return control


def apply_differential_privacy(trainer) -> None:
    """The trainer's set-up step for `args.differential_privacy`: per-example gradient hooks on the model, Opacus'
    `DPOptimizer` around the trainer's optimizer, and the accountant's callback. Nothing when the setting is unset."""
    if trainer.args.differential_privacy is None:
        return
    _import_opacus()
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    dp = DPArgs.from_mapping(trainer.args.differential_privacy)
    check_supported(trainer)
    # The hooks live on the model's own layers: the trainer keeps calling its model, and they fill `grad_sample`.
    trainer.dp_grad_sample_module = GradSampleModule(trainer.model, batch_first=True, loss_reduction="mean")
    batch_size = trainer.args.per_device_train_batch_size
    trainer.optimizer = DPOptimizer(
        trainer.create_optimizer(),
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=batch_size,
        loss_reduction="mean",  # the loss is a mean over tokens: Opacus rescales per-example gradients to match
    )
    sample_rate = batch_size / len(trainer.train_dataset)
    trainer.dp_accountant = PrivacyAccountantCallback(trainer, dp, sample_rate, trainer.optimizer)
    trainer.add_callback(trainer.dp_accountant)
    trainer.accelerator.print(
        f"trl-priority: DP-SGD (Opacus): noise σ = {dp.noise_multiplier}, clip C = {dp.max_grad_norm}, δ = "
        f"{dp.delta}, sample rate {sample_rate:.4f}; ε is logged as dp/epsilon."
    )
