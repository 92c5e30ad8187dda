"""Preference-based, signed priority: Factuality Preference and F-DPO, as a thin subclass of TRL's `DPOTrainer`.

Papers:
- Factuality Preference: Hu et al. 2025, *Fine-tuning Large Language Models for Improving Factuality in Legal Question
  Answering*, COLING 2025: DPO on pairs of a factual answer (chosen) and a hallucinated one (rejected).
- F-DPO: Chaduvula et al. 2026, *Reducing Hallucinations in LLMs via Factuality-Aware Preference Learning*, arXiv
  2601.03027: binary hallucination labels h ∈ {0 factual, 1 hallucinated} per response; (i) pairs whose chosen
  response is hallucinated and rejected one factual are flipped, (ii) a factuality margin that is 0 when both
  responses share their label, so that F-DPO reduces to DPO there.
- Position paper (arXiv 2602.01227), Table 1: Φ(x) = DPO(x_factual > x_hallucinated); Φ(x) = DPO pair + margin.

Loss, per pair (w the chosen response after flipping, l the rejected one), with an optional per-token priority Φ:

    ρ_t(y) = log π_θ(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)                  (token log-ratio)
    L = −log σ( β · [Σ_t Φ_t(w)·ρ_t(w) − Σ_t Φ_t(l)·ρ_t(l)]  −  λ · (h_l − h_w) )

averaged over pairs. With Φ ≡ 1 and λ = 0 this is TRL's sigmoid DPO loss exactly (Factuality Preference); λ > 0 is
F-DPO. Choices where the paper is not explicit, ours: the margin enters inside the sigmoid, subtracted from the scaled
reward difference (a pair with a clear factuality gap must be won by λ more, as in margin-DPO variants), λ = 1 by
default; without the label columns every pair counts as factual (chosen) over hallucinated (rejected): h_l − h_w = 1.

Φ_t: any registered priority of this package whose statistics are among `logps` (log π_θ, no gradient), `ref_logps`
(log π_ref) and `mask` (the completion tokens), e.g. `dft` or `prift_prob`, set with `priority` / `priority_args`;
unset, Φ ≡ 1. Φ is computed per token of both responses and multiplies the token log-ratios, so the token priority of
the rest of the package carries over to the preference objective.

Why a subclass of `DPOTrainer` and not a `PrioritySFTTrainer` path: DPO needs the chosen/rejected pair in one batch,
TRL's preference tokenization and collator, and its reference handling (a `ref_model`, the adapter switched off
under PEFT, a frozen copy of a starting adapter); all of these are reused as they are. Only the loss is replaced,
because TRL sums the token log-probabilities before any weight could be applied; the policy and reference forwards
are TRL's (`fused_lm_head=True`, the same masked labels). What is not reused: TRL's `precompute_ref_log_probs`
(it stores sequence sums, which a token Φ cannot weight), other `loss_type`s, `ld_alpha` and f-divergences: each is
an error with F-DPO's loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from trl_priority.priorities import get_priority


HALLUCINATION_COLUMNS = ("chosen_hallucinated", "rejected_hallucinated")
TOKEN_STATISTICS = {"logps", "ref_logps", "mask"}  # what a DPO forward gives a priority


@dataclass
class FactualityDPOConfig(DPOConfig):
    r"""
    [`~trl.DPOConfig`] plus F-DPO's settings and an optional token priority on the DPO log-ratios.

    Parameters:
        factuality_margin (`float`, *optional*, defaults to `1.0`):
            λ: the loss is −log σ(β·Δ − λ·(h_l − h_w)), h the hallucination labels. 0 gives plain DPO on factual >
            hallucinated pairs (Factuality Preference).
        flip_misordered_pairs (`bool`, *optional*, defaults to `True`):
            Swap chosen and rejected where the chosen response is hallucinated and the rejected one factual.
        priority (`str`, *optional*):
            A registered token priority reading only `logps`, `ref_logps` and `mask`; Φ_t multiplies each token's
            log-ratio. Unset: Φ ≡ 1.
        priority_args (`dict[str, Any]` or `str`, *optional*):
            Its hyperparameters.
    """

    _VALID_DICT_FIELDS = DPOConfig._VALID_DICT_FIELDS + ["priority_args"]

    factuality_margin: float = field(
        default=1.0,
        metadata={"help": "F-DPO's λ: margin λ·(h_rejected − h_chosen) inside the sigmoid; 0: plain DPO."},
    )
    flip_misordered_pairs: bool = field(
        default=True,
        metadata={"help": "Swap pairs whose chosen response is hallucinated and rejected one factual."},
    )
    priority: str | None = field(
        default=None,
        metadata={"help": "Token priority Φ on the DPO log-ratios (reads logps, ref_logps, mask only); unset: Φ = 1."},
    )
    priority_args: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Hyperparameters of `priority`, e.g. '{\"power\": 1}'."}
    )

    def __post_init__(self):
        import json

        if isinstance(self.priority_args, str):
            self.priority_args = json.loads(self.priority_args)
        super().__post_init__()
        if self.loss_type != ["sigmoid"] or self.ld_alpha is not None or self.f_divergence_type != "reverse_kl":
            raise ValueError(
                "F-DPO's loss is the sigmoid DPO loss with a margin: leave `loss_type` at 'sigmoid', `ld_alpha` unset "
                f"and `f_divergence_type` at 'reverse_kl' (got {self.loss_type}, {self.ld_alpha}, "
                f"{self.f_divergence_type!r})."
            )
        if self.factuality_margin < 0:
            raise ValueError(f"`factuality_margin={self.factuality_margin}` must be ≥ 0 (λ; 0 is plain DPO).")
        if self.precompute_ref_log_probs:
            raise ValueError(
                "`precompute_ref_log_probs` stores the reference's sequence sums, which a token priority cannot "
                "weight: leave it off with FactualityDPOTrainer."
            )
        if self.priority is None:
            if self.priority_args:
                raise ValueError("`priority_args` were given but no `priority`.")
            return
        method = get_priority(self.priority)
        self.priority_args = method.resolve_args(self.priority_args)
        extra = set(method.statistics_for(self.priority_args)) - TOKEN_STATISTICS
        if extra or method.selection is not None or method.signed or method.distribution_terms:
            raise ValueError(
                f"Priority '{method.name}' reads {sorted(extra) or 'a selection, a signed Φ or a distribution term'}, "
                f"which a DPO forward does not give: use a method that reads only {sorted(TOKEN_STATISTICS)} (e.g. "
                "'dft', 'prift_prob'), or none."
            )


def flip_and_gap(example: dict[str, Any], flip: bool) -> dict[str, Any]:
    """F-DPO's label flip, and the factuality gap h_rejected − h_chosen of the pair (1 without label columns)."""
    if not all(column in example for column in HALLUCINATION_COLUMNS):
        return {"factuality_gap": 1.0}
    h_chosen, h_rejected = (float(example[column]) for column in HALLUCINATION_COLUMNS)
    if flip and h_chosen > h_rejected:
        return {
            "chosen": example["rejected"],
            "rejected": example["chosen"],
            "chosen_hallucinated": h_rejected,
            "rejected_hallucinated": h_chosen,
            "factuality_gap": h_chosen - h_rejected,
        }
    return {"factuality_gap": h_rejected - h_chosen}


def fdpo_loss(
    logps: torch.Tensor, ref_logps: torch.Tensor, phi: torch.Tensor, gap: torch.Tensor, beta: float, margin: float
) -> torch.Tensor:
    """Per-pair F-DPO loss `(P,)` from token log-probabilities of a batch laid out [chosen; rejected].

    logps, ref_logps, phi: `(2P, T-1)`, 0 outside the completion. gap: `(P,)`, h_l − h_w.
    """
    weighted = (phi * (logps - ref_logps)).sum(dim=1)  # (2P,) Σ_t Φ_t·ρ_t
    chosen, rejected = weighted.chunk(2, dim=0)  # (P,), (P,)
    return -F.logsigmoid(beta * (chosen - rejected) - margin * gap)  # (P,)


class FactualityDPOTrainer(DPOTrainer):
    """TRL's `DPOTrainer` with the F-DPO loss (label flip, factuality margin) and a token priority Φ on the log-ratios.

    Takes every `DPOTrainer` argument; `args` is a [`FactualityDPOConfig`]. The dataset is TRL's preference format
    (`prompt`, `chosen`, `rejected`), with optional `chosen_hallucinated` / `rejected_hallucinated` (0 or 1).
    """

    _tag_names = ["trl", "dpo", "trl-priority", "f-dpo"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.priority = None if self.args.priority is None else get_priority(self.args.priority)
        self.data_collator = _WithGap(self.data_collator)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        flip = getattr(args, "flip_misordered_pairs", True)
        dataset = dataset.map(flip_and_gap, fn_kwargs={"flip": flip})
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "factuality_gap" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "factuality_gap"]

    def token_logps(self, model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(logps, ref_logps, mask)`, each `(2P, T-1)`: TRL's policy and reference forwards, per token."""
        completion_mask = inputs["completion_mask"]  # (2P, T)
        model_kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "factuality_gap")}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        mask = completion_mask[:, 1:].bool()  # (2P, T-1)
        seq_len = mask.size(1)
        logps = model(**model_kwargs, labels=labels, fused_lm_head=True).log_probs[:, -seq_len:]
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is None and is_peft_model(self.model):  # the adapter off, or a starting adapter's copy
                unwrapped = self.accelerator.unwrap_model(self.model)
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    ref = self.model(**model_kwargs, labels=labels, fused_lm_head=True)
            else:
                ref = self.ref_model(**model_kwargs, labels=labels, fused_lm_head=True)
        ref_logps = ref.log_probs[:, -seq_len:]
        zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
        return torch.where(mask, logps, zero), torch.where(mask, ref_logps, zero), mask

    def token_priorities(self, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Φ `(2P, T-1)`: the configured priority on the DPO statistics, or 1 on every completion token."""
        if self.priority is None:
            return mask.to(logps.dtype)
        statistics = {"logps": logps.detach(), "ref_logps": ref_logps, "mask": mask}
        return self.priority(statistics, self.args.priority_args).to(logps.dtype) * mask

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        logps, ref_logps, mask = self.token_logps(model, inputs)
        phi = self.token_priorities(logps, ref_logps, mask)
        gap = inputs["factuality_gap"].to(logps.dtype)  # (P,)
        losses = fdpo_loss(logps, ref_logps, phi, gap, self.args.beta, self.args.factuality_margin)  # (P,)
        with torch.no_grad():
            rewards = self.args.beta * (phi * (logps - ref_logps)).sum(dim=1)  # (2P,)
            chosen, rejected = rewards.chunk(2, dim=0)
            gather = self.accelerator.gather_for_metrics
            self._metrics[mode]["rewards/chosen"].append(gather(chosen).mean().item())
            self._metrics[mode]["rewards/rejected"].append(gather(rejected).mean().item())
            self._metrics[mode]["rewards/accuracies"].append(gather((chosen > rejected).float()).mean().item())
            self._metrics[mode]["rewards/margins"].append(gather(chosen - rejected).mean().item())
            self._metrics[mode]["fdpo/factuality_gap"].append(gather(gap).mean().item())
            self._metrics[mode]["priority/mean_phi"].append((phi.sum() / mask.sum().clamp(min=1)).item())
        loss = losses.mean()
        return (loss, {"losses": losses, "phi": phi}) if return_outputs else loss


class _WithGap:
    """The preference collator, plus each pair's `factuality_gap` `(P,)` (TRL's collator drops unknown keys)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        batch["factuality_gap"] = torch.tensor([float(example.get("factuality_gap", 1.0)) for example in examples])
        return batch
