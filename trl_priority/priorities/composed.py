"""Priorities that compose: a product, a minimum or a weighted sum of registered priorities, itself a `Priority`.

The position paper (Shen et al. 2026, arXiv 2602.01227, appendix A.2) asks for priorities that keep confidence and
correctness apart: "PriFT-prob, but never imitate a step the checker marks wrong" is the product of two registered
methods, not a new one. A recipe writes

```yaml
priority: {product: [verifier, prift_prob]}       # Φ_t = Φ_verifier,t · Φ_prift_prob,t
priority_args: {verifier: {wrong_weight: -0.5}}   # each part's hyperparameters under its name
# priority: {min: [profit, faithful]}             # Φ_t = min(Φ_profit,t, Φ_faithful,t)
# priority: {sum: {dft: 0.5, sft: 0.5}}           # Φ_t = 0.5·Φ_dft,t + 0.5·Φ_sft,t  (a list: every weight 1)
```

and Python `PrioritySFTConfig(priority={"product": ["verifier", "prift_prob"]})` or `priority=compose("product",
["verifier", "prift_prob"])`. On the command line, `--priority '{"product": ["verifier", "prift_prob"]}'` (JSON).

What the combination is, derived from its parts:

- **statistics**: the union of what the parts read, each part's `signal` switch applied, so the trainer runs a
  reference only if a part reads one, the full distribution only if a part does, and so on;
- **hyperparameters**: each part's, named `<part>.<name>` (`verifier.wrong_weight`): each part keeps its own values
  and its own checks (ranges, choices, its `validate`); `priority_schedule` may move them by that name. A statistic
  that is computed with a hyperparameter (`topk_entropy` with `k`), a span column that a part derives from the text
  (the verifier's checker) read it by its plain name, so the resolved arguments carry that name too;
  two parts that would give it different values are refused, and so is a schedule of it;
- **regime**: signed if any part is (or a `sum` weight is negative); hard only if every part is hard and the op keeps
  {0, 1} (`product`, `min`); soft otherwise;
- **reference**: read if any part reads it; "explicit" (a trained reference must be given) if any part says so;
- **prompt tokens** keep their labels if any part trains them (`wit`): the other parts then weight them too.

Choices, where a combination has no obvious meaning (each refused with an error that says why):

- **Selections**: at most one part may declare a top-fraction selection; it is the run's one `selected` statistic and
  keeps the part's scope (a step-wide Rho-1 selects over the whole optimizer step, as alone). Two selections would
  each need the other's kept set.
- **Loss terms** (`asft`, `target_sft`): refused. Each term is set against its method's own Φ (Target-SFT's soft
  target has mass 1 − α_t where its Φ is α_t; ASFT's KL weight was chosen with DFT's Φ), so a combined Φ would change
  what it means; register a method with `loss_terms=` that states the combined objective instead.
- **Token state** (`t3s`): at most one part, since the state is keyed by token only.
- **A product of two signed parts** is refused: two negative weights multiply to a positive one, so a token both
  parts unlearn would be learned. Use `min` (the most negative wins) or `sum`.
- Parts are registered names (or `Priority` objects); a composition is not itself a part.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trl_priority import statistics as stats_vocab
from trl_priority.priorities.registry import Priority, PriorityError, get_priority


OPERATIONS = ("product", "min", "sum")
_EXAMPLE = (
    "{'product': ['verifier', 'prift_prob']}, {'min': ['profit', 'faithful']} or {'sum': {'dft': 0.5, 'sft': 0.5}}"
)


def combine(op: str, phis: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Φ of a composition from its parts' Φ, each `(B, T-1)`: Π_i Φ_i, min_i Φ_i or Σ_i w_i·Φ_i."""
    stacked = torch.stack(list(phis))  # (parts, B, T-1)
    if op == "product":
        return stacked.prod(0)
    if op == "min":
        return stacked.min(0).values
    weight = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)  # (parts,)
    return (weight[:, None, None] * stacked).sum(0)


def part_args(part: Priority, args: Mapping[str, Any]) -> dict[str, Any]:
    """The part's own hyperparameters, read from a composition's `<part>.<name>` arguments."""
    prefix = f"{part.name}."
    return {key[len(prefix) :]: value for key, value in args.items() if key.startswith(prefix)}


def parse_spec(spec: Mapping[str, Any]) -> tuple[str, tuple[Any, ...], tuple[float, ...]]:
    """`(op, parts, weights)` of a composition written `{op: [names]}` or `{"sum": {name: weight}}`."""
    if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in OPERATIONS:
        keys = list(spec) if isinstance(spec, Mapping) else spec
        raise PriorityError(
            f"A composed `priority` is a mapping with one key, {' | '.join(OPERATIONS)}, got {keys!r}. Write e.g. "
            f"{_EXAMPLE}."
        )
    op, value = next(iter(spec.items()))
    if isinstance(value, Mapping):
        if op != "sum":
            raise PriorityError(f"`{op}` takes a list of priorities, e.g. {{'{op}': ['verifier', 'prift_prob']}}.")
        parts, weights = tuple(value), tuple(value.values())
    elif isinstance(value, Sequence) and not isinstance(value, str):
        parts, weights = tuple(value), (1.0,) * len(value)
    else:
        raise PriorityError(
            f"`{op}` takes a list of priorities (or, for `sum`, a mapping of priority to weight), got {value!r}."
        )
    if len(parts) < 2:
        raise PriorityError(
            f"`{op}` combines at least two priorities, got {list(parts)}: a single one is `priority: <name>`."
        )
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise PriorityError(f"The weights of `sum` must be finite numbers, got {dict(zip(parts, weights))}.")
    return op, parts, tuple(float(weight) for weight in weights)


@dataclass(frozen=True)
class _PartSelection:
    """A part's `TopFraction`, read with the part's own hyperparameters out of the composition's arguments."""

    part: Priority

    @property
    def statistics(self) -> tuple[str, ...]:
        return self.part.selection.statistics

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        return self.part.selection.hyperparameters

    @property
    def fraction(self):
        return self.part.selection.fraction

    @property
    def scope(self):
        return self.part.selection.scope

    def kept_fraction(self, args: Mapping[str, Any], progress: float) -> float:
        return self.part.selection.kept_fraction(part_args(self.part, args), progress)

    def scope_of(self, args: Mapping[str, Any]) -> str:
        return self.part.selection.scope_of(part_args(self.part, args))

    def scores(self, statistics: Mapping[str, Any], args: Mapping[str, Any]) -> torch.Tensor:
        return self.part.selection_scores(statistics, part_args(self.part, args))


@dataclass(frozen=True)
class ComposedPriority(Priority):
    """A `Priority` whose Φ combines the Φ of registered priorities (see the module docstring).

    Attributes (besides `Priority`'s, all derived from the parts):
        op: "product", "min" or "sum".
        parts: the combined priorities.
        weights: one per part; read by `sum` only.
    """

    op: str = "product"
    parts: tuple[Priority, ...] = ()
    weights: tuple[float, ...] = ()

    def __reduce__(self):  # pickled (training_args.bin) as its spec: the parts' functions are found by name again
        return compose_from_spec, (self.spec,)

    @property
    def spec(self) -> dict[str, Any]:
        """The composition as a recipe writes it."""
        names = [part.name for part in self.parts]
        if self.op == "sum":
            return {"sum": dict(zip(names, self.weights))}
        return {self.op: names}

    def statistics_for(self, args: Mapping[str, Any] | None) -> tuple[str, ...]:
        names = [
            name
            for part in self.parts
            for name in part.statistics_for(None if args is None else part_args(part, args))
        ]
        return tuple(name for name in dict.fromkeys(names) if name != "priority")

    def selection_scores(self, statistics: Mapping[str, Any], args: Mapping[str, Any]) -> torch.Tensor:
        return self.selection.scores(statistics, args)

    @staticmethod
    def shared_names(part: Priority, own: Mapping[str, Any]) -> set[str]:
        """Hyperparameters of `part` (resolved: `own`) that the trainer's shared machinery reads by their plain name:
        statistics computed with them, a span column the part derives from the text."""
        statistics = part.statistics_for(own)
        names = {hp for stat in statistics for hp in stats_vocab.hyperparameters_of(stat)}
        derived = any(
            getattr(stats_vocab.DATA_STATISTICS.get(stat), "derive", None) is not None for stat in statistics
        )
        if derived:  # `derive(completion, priority_args)` may read any of the part's hyperparameters
            names |= set(part.hyperparameters)
        return names

    def resolve_args(self, priority_args: Mapping[str, Any] | None) -> dict[str, Any]:
        """Each part's hyperparameters resolved and checked by the part, as `<part>.<name>`, plus the plain names the
        shared machinery reads. Takes them nested (`{"verifier": {"wrong_weight": -0.5}}`, what a recipe writes) or
        as `<part>.<name>` keys (what this returns)."""
        if priority_args is not None and not isinstance(priority_args, Mapping):
            raise PriorityError(
                f"priority_args for '{self.name}' must be a mapping of each part's name to its hyperparameters, e.g. "
                f"{{'{self.parts[0].name}': {{...}}}}, got {type(priority_args).__name__} {priority_args!r}."
            )
        given = dict(priority_args or {})
        by_part: dict[str, dict[str, Any]] = {part.name: {} for part in self.parts}
        plain: dict[str, Any] = {}
        for key, value in given.items():
            head, _, tail = key.partition(".")
            if key in by_part:
                if value is not None and not isinstance(value, Mapping):
                    raise PriorityError(
                        f"priority_args['{key}'] of '{self.name}' must be a mapping of {key}'s hyperparameters, got "
                        f"{value!r}."
                    )
                by_part[key].update(value or {})
            elif tail and head in by_part:
                by_part[head][tail] = value
            else:
                plain[key] = value
        resolved = {}
        for part in self.parts:
            own = part.resolve_args(by_part[part.name])  # the part's own checks, and its error messages
            resolved.update({f"{part.name}.{name}": value for name, value in own.items()})
        shared: dict[str, tuple[Any, str]] = {}
        for part in self.parts:
            own = part_args(part, resolved)
            for name in sorted(self.shared_names(part, own)):
                if name in shared and shared[name][0] != own[name]:
                    raise PriorityError(
                        f"In '{self.name}', '{shared[name][1]}' and '{part.name}' both set `{name}` ({shared[name][0]!r} "
                        f"and {own[name]!r}), which a statistic or a derived column of the run reads once. Give "
                        "both parts the same value."
                    )
                shared[name] = (own[name], part.name)
        for key, value in plain.items():
            if key in shared and value == shared[key][0]:
                continue  # the plain name of an argument this returned: resolving is idempotent
            owners = [part.name for part in self.parts if key in part.hyperparameters]
            if not owners:
                parts = "; ".join(f"{part.name}: {', '.join(part.hyperparameters) or 'none'}" for part in self.parts)
                raise PriorityError(
                    f"Unknown priority_args key '{key}' for '{self.name}': give each part's hyperparameters under its "
                    f"name, e.g. {{'{self.parts[0].name}': {{...}}}}. Hyperparameters by part: {parts}."
                )
            also = ""
            if key in shared:  # a schedule moved '<part>.<key>' but not the plain name the machinery reads
                also = (
                    f" It is also read by its plain name (by a statistic or a derived column) and may not differ from "
                    f"'{shared[key][1]}.{key}' = {shared[key][0]!r}, so `priority_schedule` cannot move it here."
                )
            raise PriorityError(
                f"priority_args of '{self.name}' give `{key}` = {value!r} without its part. Write it under its part, "
                f"e.g. {{'{owners[0]}': {{'{key}': {value!r}}}}}.{also}"
            )
        resolved.update({name: value for name, (value, _) in shared.items()})
        return resolved

    def __call__(self, statistics: Mapping[str, torch.Tensor], args: Mapping[str, Any]) -> torch.Tensor:
        """Each part's Φ (each checked by its own contract), combined; 0 where `mask` is false."""
        phis = [part(statistics, part_args(part, args)) for part in self.parts]  # each (B, T-1)
        phi = combine(self.op, phis, self.weights)  # (B, T-1)
        return torch.where(statistics["mask"], phi, 0.0)


def _regime(op: str, parts: Sequence[Priority], weights: Sequence[float]) -> str:
    if any(part.signed for part in parts) or (op == "sum" and any(weight < 0 for weight in weights)):
        return "signed"
    if op in ("product", "min") and all(part.regime == "hard" for part in parts):
        return "hard"  # a product or minimum of {0, 1} values stays in {0, 1}; a weighted sum does not
    return "soft"


def _check_combinable(name: str, op: str, parts: Sequence[Priority]) -> None:
    selecting = [part.name for part in parts if part.selection is not None]
    if len(selecting) > 1:
        raise PriorityError(
            f"'{name}' combines {selecting}, which each select a top fraction of tokens: a run makes one selection "
            "(the `selected` statistic). Combine at most one selecting method."
        )
    stateful = [part.name for part in parts if "state" in part.all_statistics]
    if len(stateful) > 1:
        raise PriorityError(f"'{name}' combines {stateful}, which each keep a per-token state; at most one may.")
    with_terms = [part.name for part in parts if part.loss_terms]
    if with_terms:
        raise PriorityError(
            f"'{name}' combines {with_terms}, whose objective adds loss terms to Φ·NLL, each set against the method's "
            "own Φ (Target-SFT's soft target has mass 1 − α_t where its Φ is α_t; ASFT's KL weight was chosen with "
            "DFT's Φ): a combined Φ would change what they mean. Use it alone, or register a method (with "
            "`loss_terms=`) that states the combined objective."
        )
    signed = [part.name for part in parts if part.signed]
    if op == "product" and len(signed) > 1:
        raise PriorityError(
            f"'{name}' multiplies the signed priorities {signed}: two negative weights give a positive one, so a token "
            "both unlearn would be learned. Use `min` (the most negative wins) or `sum`."
        )


def _describe(op: str, parts: Sequence[Priority], weights: Sequence[float]) -> str:
    if op == "sum":
        return "sum(" + ", ".join(f"{weight:g}*{part.name}" for part, weight in zip(parts, weights)) + ")"
    return f"{op}(" + ", ".join(part.name for part in parts) + ")"


def compose(op: str, parts: Sequence[Any] | Mapping[Any, float]) -> ComposedPriority:
    """The priority combining `parts` (registered names or `Priority` objects) by `op`.

    `compose("product", ["verifier", "prift_prob"])`: Φ_t = Φ_verifier,t · Φ_prift_prob,t.
    `compose("min", ["profit", "faithful"])`: Φ_t = min(Φ_profit,t, Φ_faithful,t).
    `compose("sum", {"dft": 0.5, "sft": 0.5})`: Φ_t = 0.5·Φ_dft,t + 0.5·Φ_sft,t (a list gives every part weight 1).

    The result is a `Priority` like a registered one: pass it, or the mapping `{op: parts}`, as
    `PrioritySFTConfig.priority`, with each part's hyperparameters under its name in `priority_args`.
    """
    op, names, weights = parse_spec({op: parts})
    members = tuple(get_priority(name) for name in names)
    if any(isinstance(part, ComposedPriority) for part in members):
        raise PriorityError(
            "A part of a composition is a registered priority, not a composition: write the parts flat."
        )
    duplicates = sorted({part.name for part in members if [p.name for p in members].count(part.name) > 1})
    if duplicates:
        raise PriorityError(f"`{op}` names {duplicates} more than once; each part appears once.")
    name = _describe(op, members, weights)
    _check_combinable(name, op, members)
    formula = {
        "product": " · ".join(f"Φ_{part.name}" for part in members),
        "min": "min(" + ", ".join(f"Φ_{part.name}" for part in members) + ")",
        "sum": " + ".join(f"{weight:g}·Φ_{part.name}" for part, weight in zip(members, weights)),
    }[op]

    def composed(mask):  # the combination's documentation: Φ comes from calling the priority, which calls the parts
        raise PriorityError(f"'{name}' computes Φ from its parts: call the priority, `priority(statistics, args)`.")

    composed.__doc__ = f"Composed priority: Φ_t = {formula}, each part with its own hyperparameters.\n\n" + "\n".join(
        f"{part.name}: {part.summary}" for part in members
    )
    statistics = tuple(dict.fromkeys(name for part in members for name in part.statistics))
    hyperparameters = {
        f"{part.name}.{hp.name}": dataclasses.replace(hp, name=f"{part.name}.{hp.name}")
        for part in members
        for hp in part.hyperparameters.values()
    }
    selecting = next((part for part in members if part.selection is not None), None)
    return ComposedPriority(
        name=name,
        fn=composed,
        statistics=statistics,
        hyperparameters=hyperparameters,
        regime=_regime(op, members, weights),
        paper="; ".join(f"{part.name}: {part.paper}" for part in members if part.paper),
        reference="explicit" if any(part.reference == "explicit" for part in members) else "starting_model",
        # Settings that read the composition's arguments go through each part
        trains_prompt_tokens=lambda args: any(part.trains_prompt(part_args(part, args)) for part in members),
        uses_reference=lambda args: any(part.reference_used(part_args(part, args)) for part in members),
        selection=None if selecting is None else _PartSelection(selecting),
        op=op,
        parts=members,
        weights=weights,
    )


def compose_from_spec(spec: Mapping[str, Any]) -> ComposedPriority:
    """`compose` from the mapping a recipe writes: `{"product": ["verifier", "prift_prob"]}`."""
    op, parts, weights = parse_spec(spec)
    return compose(op, dict(zip(parts, weights)) if op == "sum" else list(parts))
