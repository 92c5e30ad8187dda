"""Gathering everything Φ reads for one batch, as the run's plan says: the reference's statistics (or those a step-wide
scoring pass computed ahead, or the epoch cache's), the data columns, the trainer's own (progress, units, example
indices, the method's state), then the policy's, from one forward that may also compute the method's distribution
terms (`DistributionRequest`).

`PrioritySFTTrainer._gather_statistics` is a call to `gather_statistics` with the trainer's collaborators.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.profiler import record_function

from trl_priority import statistics as stats_vocab
from trl_priority.objectives import UNLIKELIHOOD_TERM
from trl_priority.statistics import (
    DistributionRequest,
    causal_lm_of,
    drop_virtual_positions,
    forward_statistics,
    fused_statistics,
)
from trl_priority.statistics.state import TokenState


def distribution_terms(priority, negative_loss: str) -> tuple[Any, ...]:
    """The method's distribution terms, plus the bounded unlikelihood on Φ < 0 when the regime is signed and
    `negative_loss="unlikelihood"`: computed from the logits in the LM-head pass (`objectives.unlikelihood_term`).
    """
    unlearn = (UNLIKELIHOOD_TERM,) if priority.signed and negative_loss == "unlikelihood" else ()
    return (*priority.distribution_terms, *unlearn)


def phi_before_terms(
    statistics: dict[str, Any], priority_of: Callable, policy_statistics, head_model: torch.nn.Module
) -> Callable:
    """The request's `before_terms`, called by the package's LM-head pass (`statistics.serve_request`) once the
    policy's statistics are known: Φ from all statistics, then the NLL's weights and the terms' inputs.

    The NLL is weighted by Φ, or by its non-negative part when the negatives are unlearned by the unlikelihood
    term (signed methods, `negative_loss="unlikelihood"`); with "ascent" a negative Φ weights −log p as is:
    |Φ|·log p = Φ·(−log p), as in `objectives.priority_loss`."""

    def before_terms(outputs, request: DistributionRequest) -> None:
        statistics.update(fused_statistics(outputs, policy_statistics, causal_lm_of(head_model)))
        statistics.update(request.values)
        phi = priority_of(statistics)  # (B, T-1)
        available = {**statistics, "priority": phi}
        request.term_inputs = {
            name: available[name] for term in request.terms for name in term.statistics if name in available
        }
        request.nll_weight = phi.clamp(min=0) if UNLIKELIHOOD_TERM in request.terms else phi

    return before_terms


def gather_statistics(
    model,
    inputs: dict[str, Any],
    *,
    plan,
    priority,
    reference,
    epoch_cache,
    state: TokenState | None,
    step_args: Mapping[str, Any],
    progress: float,
    granularity: str,
    terms: tuple[Any, ...],
    head_model: torch.nn.Module,
    training: bool,
    evaluating: bool = False,
    ahead=None,
    train_batch=None,
    priority_of=None,
):
    """Run the reference (unless `ahead` carries its statistics) and the policy; return everything Φ reads.

    Returns `(outputs, statistics, request)`: `outputs` is TRL's `FusedCausalLMOutput` (with gradient), the
    statistics are `(B, T-1)` tensors without gradient (plus `progress` and `state`), `request` holds the
    distribution terms (with gradient) the forward computed. `priority_of(statistics)` computes Φ: it is called
    inside the forward when a term reads Φ or a policy statistic; without it such terms are not computed (a
    scoring pass needs no loss).

    Collaborators: `reference` (a `references.sources.Reference` or None), `epoch_cache` (the reference's values kept
    across epochs, read for training batches, or None), `state` (the method's `TokenState`, or None; `evaluating`
    binds a fresh one), `step_args` (the hyperparameters now), `progress`, `granularity`
    (`priority_granularity`), `terms` (the distribution terms, `distribution_terms`), `head_model` (whose LM head
    the LM-head pass reads).
    """
    # Not model inputs. A batch collated elsewhere may lack the identity columns, which only training reads
    columns = {column: inputs.pop(column) for column in plan.token_columns if column in inputs}
    mask = inputs["labels"][:, 1:] != -100  # (B, T-1)
    # The reference runs first, so that its transient memory never adds to the policy's saved activations
    reference_statistics, reference_distribution = {}, None
    if ahead is not None and ahead.get("reference") is not None and not priority.needs_reference_distribution:
        reference_statistics = ahead["reference"]
    elif reference is not None:
        # A training batch (also in the step-wide scoring pass) reads the reference's values kept from earlier epochs
        train_batch = training if train_batch is None else train_batch
        source = epoch_cache if train_batch and epoch_cache is not None else reference
        with record_function("trl_priority.reference"):
            reference_statistics, reference_distribution = source.statistics(
                model,
                inputs,
                plan.reference_statistics,
                step_args,
                columns=columns,
                distribution=priority.needs_reference_distribution,
            )
    elif priority.needs_reference:  # this configuration reads no reference: its `ref_*` are None
        reference_statistics = {f"ref_{name}": None for name in priority.reference_statistics}
    statistics = dict(reference_statistics, mask=mask)
    for name in plan.data_statistics:
        column = columns[stats_vocab.DATA_STATISTICS[name].column]
        statistics[name] = column[:, 1:].to(mask.device).float()  # (B, T-1): scores labels[:, t + 1]
    statistics["progress"] = torch.tensor(progress, device=mask.device)
    if granularity != "token":
        unit_column = "word_index" if granularity == "word" else "spans"
        statistics["_unit"] = columns[unit_column][:, 1:].to(mask.device).long()
    if "example_index" in columns:
        statistics["_example"] = columns["example_index"][:, 1:].to(mask.device).long()
    if state is not None:
        identity = (
            columns["example_index"][:, 1:].to(mask.device),
            columns["token_position"][:, 1:].to(mask.device),
        )
        # Evaluation rows are other examples under the same example indices: they see no training history
        bound_state = TokenState() if evaluating else state
        statistics["state"] = bound_state.bind(*identity, writable=training)

    # Without `priority_of` (a scoring pass) no loss is computed, so no term either
    terms = terms if priority_of is not None else ()
    request = DistributionRequest(
        args=step_args,
        terms=terms,
        term_weights=tuple(1.0 if t.weight is None else float(step_args[t.weight]) for t in terms),
        reference=reference_distribution,
        # Used only when the package's LM-head pass serves the forward (`statistics.serve_request`)
        before_terms=(
            phi_before_terms(statistics, priority_of, plan.policy_statistics, head_model)
            if priority_of is not None
            else None
        ),
    )
    with record_function("trl_priority.policy_forward"):
        outputs, policy_statistics = forward_statistics(
            model, inputs, plan.policy_statistics, step_args, request=request
        )
    statistics.update(policy_statistics)
    return outputs, statistics, request


def collate_for_scoring(batch, collator) -> Mapping[str, Any]:
    """The collated batch `token_priorities` / `token_statistics` score: `batch` as given when collated already,
    else prepared rows (a list of examples or a `Dataset` slice) collated by `collator`; raw (untokenized) rows and a
    batch without `labels` are refused with the fix."""
    from datasets import Dataset

    if isinstance(batch, Dataset):
        batch = list(batch)
    rows = [batch] if isinstance(batch, Mapping) else list(batch)
    if rows and isinstance(rows[0], Mapping) and "input_ids" not in rows[0]:
        raise ValueError(
            f"`token_priorities` needs prepared rows or a collated batch (with `input_ids` and `labels`), got "
            f"columns {sorted(rows[0])}: raw examples are not tokenized. Pass rows of `trainer.train_dataset` "
            "(e.g. `trainer.train_dataset.select(range(4))`) or a batch from `trainer.get_train_dataloader()`."
        )
    if not isinstance(batch, Mapping):
        batch = collator(rows)
    if "labels" not in batch:
        raise ValueError(
            "`token_priorities` got a batch without `labels`: Φ weights the supervised labels. Collate the rows "
            "with `trainer.data_collator`, which builds them, or add `labels` (-100 where ignored)."
        )
    return batch


def scored_statistics(
    model, inputs: dict[str, Any], forward_with_priority: Callable | None, reference, step_args, label_logps: bool
) -> dict[str, torch.Tensor]:
    """The body of `PrioritySFTTrainer.token_statistics` on a prepared batch, the model in eval mode:
    `forward_with_priority(inputs)` gives `(outputs, phi, statistics, request)` (None without a priority: Φ is the
    mask). Returns `phi`, `mask`, every per-token statistic the method read and, with `label_logps`, `logps` and,
    for a model or adapter `reference`, `ref_logps`."""
    from trl_priority.references.sources import AdapterReference, ModelReference, eval_mode

    mask = inputs["labels"][:, 1:] != -100  # (B, T-1)
    if forward_with_priority is None:
        result = {"phi": mask.float(), "mask": mask}
        if label_logps:
            with eval_mode(model):
                outputs = drop_virtual_positions(model(**inputs, fused_lm_head=True), mask.shape[1] + 1)
                result["logps"] = outputs.log_probs.float()  # (B, T-1)
        return result
    with eval_mode(model):
        outputs, phi, statistics, _ = forward_with_priority(inputs)  # pops the data columns
        result = {
            name: value
            for name, value in statistics.items()
            if not name.startswith("_") and isinstance(value, torch.Tensor) and value.shape == phi.shape
        }
        result.update(phi=phi, mask=mask)
        if label_logps:
            result["logps"] = torch.where(mask, outputs.log_probs.detach().float(), 0.0)  # (B, T-1)
            if "ref_logps" not in result and isinstance(reference, ModelReference | AdapterReference):
                reference_statistics, _ = reference.statistics(model, inputs, ("logps",), step_args)
                result["ref_logps"] = reference_statistics["ref_logps"]
    return result
