"""The request a forward carries, and the forward that serves it: per-token statistics of the policy (TRL's public
fused head, or this package's own LM-head pass in `trl_priority.statistics.lm_head` for whole-distribution methods).

Split from `trl_priority.statistics` (the statistic vocabulary), which re-exports every public name here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from trl_priority.statistics import (
    ATTENTION_STATISTICS,
    DISTRIBUTION_STATISTICS,
    FUSED_STATISTICS,
    captured_attention,
    causal_lm_of,
    chunk_elements_for,
    lm_head,
)
from trl_priority.statistics.lm_head import gathered_head, logit_transform  # noqa: F401  (re-exported)


# ------------------------------------------------------------------------------------------------------------------
# The request a forward carries, and the package's own LM-head pass that serves it (`trl_priority.statistics.lm_head`)
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class ReferenceDistribution:
    """The reference's final hidden states and the model whose LM head projects them, for the LM-head pass.

    `statistics` are reference statistics (no `ref_` prefix) to compute from its distribution in the policy's pass,
    before Φ; a distribution term that reads `ref_logprobs` projects its head again, once, in the objective.
    """

    hidden: torch.Tensor  # (B, T, H_ref), no gradient
    causal_lm: torch.nn.Module
    statistics: tuple[str, ...] = ()


@dataclass
class DistributionRequest:
    """What a policy forward computes besides TRL's fused log-probabilities; the pass writes its results here.

    A request with distribution statistics, a reference's distribution or terms is served by the package's LM-head
    pass (`trl_priority.statistics.lm_head`) from the final hidden states, inside the model's forward (a forward hook on its
    backbone hands them over), instead of TRL's fused head. The results come back in the request itself.
    """

    statistics: tuple[str, ...] = ()  # no-gradient distribution statistics (and `logps` / `entropy` for a reference)
    args: Mapping[str, Any] = field(default_factory=dict)
    terms: tuple[Any, ...] = ()  # `DistributionTerm`s: differentiable, summed over the supervised positions
    term_weights: tuple[float, ...] = ()
    term_inputs: Mapping[str, torch.Tensor] = field(default_factory=dict)  # (B, T-1) per-token inputs of the terms
    reference: ReferenceDistribution | Any | None = None  # or a `TopKReferenceDistribution`
    backbone_only: bool = False  # a reference: its final hidden states only (`hidden`), no head
    # Called in the pass once the statistics are known, before the objective: `before_terms(outputs, request)`
    # computes Φ and sets `nll_weight` (B, T-1) and `term_inputs`. Without it the pass computes statistics only.
    before_terms: Callable[[Any, DistributionRequest], None] | None = None
    nll_weight: torch.Tensor | None = None  # (B, T-1): w_t of Σ_t w_t·(−log π(y_t)), no gradient
    chunk_elements: int | None = None  # positions × vocabulary per chunk; None: `chunk_elements_for`, at call time
    label_length: int | None = None  # the caller's T: a longer forward has PEFT's virtual tokens first
    # Results
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # statistic -> (B, T-1), no gradient
    term_values: dict[str, torch.Tensor] = field(default_factory=dict)  # term -> (B, T-1) per token, no gradient
    objective: torch.Tensor | None = None  # Σ_t w_t·(−log π(y_t)) + Σ_terms λ·Σ_t term_t, with gradient
    hidden: torch.Tensor | None = None  # the final hidden states, when `backbone_only`

    @property
    def needs_pass(self) -> bool:
        """Whether the package's LM-head pass serves this request (else TRL's fused head does)."""
        reference_statistics = getattr(self.reference, "statistics", ()) if self.reference is not None else ()
        return bool(self.statistics or self.terms or reference_statistics)


@dataclass
class LMHeadOutput:
    """The per-token fields of TRL's `FusedCausalLMOutput` the trainer reads, from the package's LM-head pass:
    `(B, T-1)` each, no gradient (the loss is the request's `objective`)."""

    log_probs: torch.Tensor
    entropy: torch.Tensor
    is_top1: torch.Tensor
    label_mask: torch.Tensor
    aux_loss: torch.Tensor | None = None
    loss: torch.Tensor | None = None


def virtual_positions(labels: torch.Tensor | None, label_length: int | None) -> int:
    """How many positions a PEFT prompt-learning adapter prepended to a sequence whose caller's labels are
    `label_length` long: the virtual tokens of prompt tuning and p-tuning (`PeftModelForCausalLM.forward` prepends
    their embeddings and `num_virtual_tokens` labels -100). Prefix tuning adds keys and values, not positions: 0."""
    if labels is None or label_length is None:
        return 0
    return max(0, labels.shape[1] - label_length)


def drop_virtual_positions(outputs, label_length: int | None):
    """TRL's fused-head `outputs` on the caller's positions only: `(B, T_virtual + T - 1)` per-token fields cut to
    the last `T - 1`, so that position t scores `labels[:, t + 1]` of the caller's labels, as everywhere here.
    Idempotent; `outputs.loss` is left as computed.

    PEFT's own loss gives the virtual positions label -100; the one real label they score, the sequence's first
    token predicted from the last virtual token, has no place in this layout (nothing else scores `labels[:, 0]`),
    so a priority neither weights nor trains it.
    """
    if outputs is None or label_length is None:
        return outputs
    length = label_length - 1
    for name, value in outputs.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] > length:
            outputs[name] = value[:, value.shape[1] - length :]
    return outputs


def fused_statistics(outputs, names: Iterable[str], causal_lm) -> dict[str, torch.Tensor]:
    """The statistics among `names` that TRL's fused head returns (`logps`, `entropy`), detached, float32."""
    statistics = {}
    for name in names:
        if name in FUSED_STATISTICS:
            value = getattr(outputs, FUSED_STATISTICS[name])
            if value is None:
                raise RuntimeError(
                    f"The fused LM head of {type(causal_lm).__name__} does not compute '{FUSED_STATISTICS[name]}'."
                )
            statistics[name] = value.detach().float()
    return statistics


def _positions(rows_value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`(N,)` values of the supervised rows back at their positions: `(B, T-1)` float32, 0 elsewhere."""
    full = torch.zeros(mask.shape, dtype=torch.float32, device=rows_value.device)
    full[mask] = rows_value.float()
    return full


def chunk_statistics(names: Iterable[str], args: Mapping[str, Any]) -> dict[str, lm_head.ChunkStatistic]:
    """The statistics `names` as functions of a chunk, their hyperparameters bound from `args`."""
    out = {}
    for name in names:
        if name in DISTRIBUTION_STATISTICS:
            stat = DISTRIBUTION_STATISTICS[name]
            out[name] = functools.partial(stat.fn, **{hp: args[hp] for hp in stat.hyperparameters})
        else:
            out[name] = lm_head.FUSED_FROM_CHUNK[name]
    return out


def _reference_rows(reference, mask: torch.Tensor, stack: ExitStack) -> lm_head.ReferenceRows | None:
    """The request's reference at the supervised rows (a model's head gathered on `stack`), or None."""
    if reference is None:
        return None
    if isinstance(reference, ReferenceDistribution):
        head = stack.enter_context(lm_head.gathered_head(reference.causal_lm))
        rows_hidden = reference.hidden[:, :-1][mask.to(reference.hidden.device)].to(mask.device)  # (N, H_ref)
        return lm_head.ReferenceRows(head=head, hidden=rows_hidden)
    return lm_head.ReferenceRows(topk=reference.rows(mask))  # a cached top-k (`topk_reference`)


def serve_request(hidden: torch.Tensor, labels: torch.Tensor, causal_lm, request: DistributionRequest):
    """Serve `request` from the final hidden states `(B, T, H)` and the caller's labels `(B, T)` with the package's
    LM-head pass; return the `LMHeadOutput` (policy statistics TRL's fused head would give).

    1. `lm_head.statistics_pass`, no gradient: `logps`, `entropy`, `is_top1`, the request's distribution statistics,
       and the reference's statistics from its distribution;
    2. `request.before_terms(outputs, request)`: Φ, from all of them (the trainer's);
    3. `lm_head.objective_pass`: the Φ-weighted NLL and the terms, with gradient (`request.objective`).
    Steps 2 and 3 only when `before_terms` is set (a training or evaluation loss).
    """
    shifted = labels[:, 1:].to(hidden.device)  # (B, T-1)
    mask = shifted != -100  # (B, T-1)
    rows_hidden = hidden[:, :-1][mask]  # (N, H): only supervised positions are projected
    rows_labels = shifted[mask]  # (N,)
    args = request.args
    policy_names = ("logps", "entropy", "is_top1", *(n for n in request.statistics if n not in FUSED_STATISTICS))
    ref_names = tuple(getattr(request.reference, "statistics", ()) or ())
    with ExitStack() as stack:
        head = stack.enter_context(lm_head.gathered_head(causal_lm))
        reference = _reference_rows(request.reference, mask, stack)
        chunk_rows = max(1, chunk_elements_for(hidden.device, request.chunk_elements) // head.vocab_size)
        values = lm_head.statistics_pass(
            rows_hidden,
            rows_labels,
            head,
            chunk_statistics(policy_names, args),
            chunk_rows,
            reference=reference if ref_names else None,
            ref_statistics=chunk_statistics(ref_names, args),
        )
        full = {name: _positions(value, mask) for name, value in values.items()}
        outputs = LMHeadOutput(full["logps"], full["entropy"], full["is_top1"].bool(), mask)
        request.values.update(
            {name: full[name] for name in request.statistics},
            **{f"ref_{name}": full[f"ref_{name}"] for name in ref_names},
        )
        if request.before_terms is None:
            return outputs
        request.before_terms(outputs, request)
        term_rows = {name: value.to(hidden.device)[mask] for name, value in request.term_inputs.items()}  # (N,)
        term_rows.update({f"ref_{name}": values[f"ref_{name}"] for name in ref_names})
        terms = [
            lm_head.ChunkTerm(
                term.name,
                weight,
                functools.partial(_call_term, term, rows=term_rows, args=args),
            )
            for term, weight in zip(request.terms, request.term_weights)
        ]
        reads_reference = any(getattr(term, "needs_reference_distribution", False) for term in request.terms)
        nll_weight = (
            torch.zeros(mask.shape, device=hidden.device) if request.nll_weight is None else request.nll_weight
        )
        request.objective, term_values = lm_head.objective_pass(
            rows_hidden,
            rows_labels,
            head,
            nll_weight.to(hidden.device)[mask],
            terms,
            chunk_rows,
            reference=reference if reads_reference else None,
        )
        request.term_values = {name: _positions(value, mask) for name, value in term_values.items()}
    return outputs


def _call_term(term, logprobs, labels, ref_logprobs, chunk, *, rows, args):
    """A `DistributionTerm` called on a chunk, its per-token inputs cut from `rows` `(N,)`."""
    return term(logprobs, labels, ref_logprobs, rows, chunk, args)


@contextmanager
def on_final_hidden(causal_lm, label_length: int, fn: Callable[[torch.Tensor], None]):
    """While the block runs, every forward of `causal_lm`'s backbone hands its final hidden states on the caller's
    `label_length` positions (PEFT's virtual tokens cut off) `(B, T, H)` to `fn`, inside the model's forward: where
    ZeRO-3 and FSDP expect the LM head to be used and accelerate's autocast is active. A public forward hook; the
    model's `forward` and TRL's classes are left as they are."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        fn(hidden[:, hidden.shape[1] - label_length :])

    handle = causal_lm.base_model.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _forward_for_hidden(model, inputs: Mapping[str, Any]):
    """The model's own forward, its LM head limited to one position per sequence (`logits_to_keep=1`): the pass
    projects the hidden states itself. No labels, so no loss over logits that are not there."""
    kwargs = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
    kwargs["use_cache"] = False
    return model(**kwargs, logits_to_keep=1)


def forward_statistics(
    model,
    inputs: Mapping[str, Any],
    names: Iterable[str],
    args: Mapping[str, Any],
    keep_outputs: bool = True,
    request: DistributionRequest | None = None,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Run `model` and return `(outputs, statistics)`.

    `names` are policy statistics (no prefix) wanted from this model; every returned statistic is detached. Used for
    the policy and for model references alike.

    - Without a distribution statistic, terms or a reference's distribution: TRL's public fused head
      (`fused_lm_head=True`, `add_fused_lm_head`), unchanged; `outputs` keeps the gradient of `log_probs`.
    - Otherwise the package's LM-head pass (`serve_request`): `outputs` is an `LMHeadOutput` without gradient, and
      with `request.before_terms` set, the loss (Φ-weighted NLL and terms, with gradient) is `request.objective`.
    - With `keep_outputs=False` (a reference, which needs no loss) and a distribution statistic among `names` (or
      `request.backbone_only`), the backbone's hidden states alone are kept and one pass serves every statistic
      (or they are returned in `request.hidden`). `outputs` is then None.
    """
    names = list(dict.fromkeys(names))
    distribution = [name for name in names if name in DISTRIBUTION_STATISTICS]
    request = request or DistributionRequest(args=args)
    label_length = request.label_length = inputs["labels"].shape[1]
    causal_lm = causal_lm_of(model)
    if not keep_outputs and (distribution or request.backbone_only):
        request.statistics = tuple(names)
        served: dict[str, Any] = {}

        def reference_pass(hidden):
            if request.backbone_only:
                request.hidden = hidden
            else:
                served["outputs"] = serve_request(hidden, inputs["labels"], causal_lm, request)

        with on_final_hidden(causal_lm, label_length, reference_pass):
            _forward_for_hidden(model, inputs)
        return None, {name: request.values[name] for name in names if name in request.values} | (
            {name: getattr(served["outputs"], FUSED_STATISTICS[name]) for name in names if name in FUSED_STATISTICS}
            if "outputs" in served
            else {}
        )
    request.statistics = tuple(distribution)
    attention = [name for name in names if name in ATTENTION_STATISTICS]
    num_layers = max((int(args[ATTENTION_STATISTICS[n].layers_hyperparameter]) for n in attention), default=0)
    with captured_attention(causal_lm, num_layers) if attention else nullcontext([]) as weights:
        if request.needs_pass:
            served = {}

            def policy_pass(hidden):
                served["outputs"] = serve_request(hidden, inputs["labels"], causal_lm, request)

            with on_final_hidden(causal_lm, label_length, policy_pass):
                model_outputs = _forward_for_hidden(model, inputs)
            outputs = served["outputs"]
            outputs.aux_loss = getattr(model_outputs, "aux_loss", None)
            # The model's own head (one position per row) joins the loss at weight 0, so that its backward runs: under
            # DeepSpeed ZeRO-3 that is when the head's weight is gathered, and autograd accumulates the pass's weight
            # gradient into the weight as it then is (partitioned, 0 elements, it fails: "size of tensor a (0) must
            # match ... (32)"; found by tests/test_distributed.py's zero3 asft run)
            logits = getattr(model_outputs, "logits", None)
            if request.objective is not None and logits is not None and logits.requires_grad:
                request.objective = request.objective + 0.0 * logits.sum()
        else:
            outputs = drop_virtual_positions(model(**inputs, fused_lm_head=True), label_length)
    statistics = fused_statistics(outputs, names, causal_lm)
    for name in attention:
        layers = int(args[ATTENTION_STATISTICS[name].layers_hyperparameter])
        statistics[name] = ATTENTION_STATISTICS[name].fn(weights[-layers:], inputs, causal_lm.config)
    statistics.update(request.values)
    return outputs, statistics


def distribution_statistics(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    causal_lm,
    names: Iterable[str],
    args: Mapping[str, Any],
    chunk_elements: int | None = None,
) -> dict[str, torch.Tensor]:
    """Distribution statistics (`logps` and `entropy` too) of final hidden states `(B, T, H)` at the supervised
    positions, chunk by chunk, `(B, T-1)` each. The functional core of the pass, for tests and tools."""
    request = DistributionRequest(statistics=tuple(names), args=args, chunk_elements=chunk_elements)
    with torch.no_grad():
        outputs = serve_request(hidden, labels, causal_lm, request)
    fused = {name: getattr(outputs, FUSED_STATISTICS[name]) for name in names if name in FUSED_STATISTICS}
    return {**request.values, **fused}
