"""The priority registry: every method of the taxonomy, and a user's own Φ, plugs in here.

A priority is a short, pure function of per-token tensors. Its positional parameters are statistics, named from the
fixed vocabulary in `trl_priority.statistics` (`logps`, `entropy`, `mask`, `ref_logps`, ...); its keyword-only
parameters are its hyperparameters, exactly what `priority_args` may set. It returns Φ with the shape of `logps`,
`(batch, seq_len - 1)`, where position t scores `labels[:, t + 1]`.

```python
@register_priority(regime="soft", paper="Wu et al. 2025, arXiv 2508.05629")
def dft(logps, mask):
    return logps.exp() * mask
```

The trainer reads the signature once: it computes a reference forward only for methods that ask for a `ref_*`
statistic, computes the full next-token distribution only for methods that ask for a distribution statistic, and
rejects an unknown or out-of-range hyperparameter before the model is even loaded.

Why one module of ~480 lines: it is the one contract every priority and every caller of one relies on, the hyperparameter
constraints (`Range`, `Hyperparameter`), the entry that reads a signature and checks values against it (`Priority`),
and registration and lookup (`register_priority`, `get_priority`). Split, a reader would follow one rule (what
`priority_args` may hold, which statistics a method reads) across files that only ever change together; the methods
themselves live in the other modules of `trl_priority.priorities`.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch

from trl_priority import statistics as stats_vocab
from trl_priority.checks import non_finite_message
from trl_priority.signatures import hyperparameter_names, statistic_parameters


Regime = Literal["hard", "soft", "signed"]
REGIMES = typing.get_args(Regime)


class PriorityError(ValueError):
    """A priority was misconfigured or returned an invalid Φ."""


# ------------------------------------------------------------------------------------------------------------------
# Hyperparameter constraints: written in the signature with `typing.Annotated`, so the function stays plain Python.
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """Closed or open bounds on a numeric hyperparameter: `Annotated[float, Range(0, 1, low_open=True)]` is (0, 1]."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def __str__(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{low}, {high}{')' if self.high_open or self.high is None else ']'}"


Fraction = Annotated[float, Range(0, 1, low_open=True)]  # (0, 1]: a share of tokens that must keep at least one
Probability = Annotated[float, Range(0, 1)]  # [0, 1]
NonNegative = Annotated[float, Range(0, None)]
PositiveInt = Annotated[int, Range(1, None)]


@dataclass(frozen=True)
class Hyperparameter:
    """One keyword-only parameter of a priority, read from its signature."""

    name: str
    default: Any
    kind: type  # float, int, bool or str
    choices: tuple[Any, ...] | None = None  # from `Literal[...]`
    bounds: Range | None = None

    @classmethod
    def from_parameter(cls, param: inspect.Parameter, hints: dict[str, Any], method: str) -> Hyperparameter:
        if param.default is inspect.Parameter.empty:
            raise PriorityError(
                f"Priority '{method}': hyperparameter '{param.name}' has no default. Every keyword-only parameter of "
                "a priority needs a default, so that the method runs with `priority_args` left empty."
            )
        hint = hints.get(param.name, type(param.default))
        bounds = None
        if typing.get_origin(hint) is Annotated:
            hint, *extras = typing.get_args(hint)
            bounds = next((extra for extra in extras if isinstance(extra, Range)), None)
        choices = None
        if typing.get_origin(hint) is Literal:
            choices = typing.get_args(hint)
            hint = type(choices[0])
        if hint not in (float, int, bool, str):
            raise PriorityError(
                f"Priority '{method}': hyperparameter '{param.name}' is annotated {hint!r}; use float, int, bool, str "
                "or a Literal of them, so that a YAML recipe can set it."
            )
        return cls(param.name, param.default, hint, choices, bounds)

    def describe(self) -> str:
        if self.choices is not None:
            allowed = " | ".join(repr(choice) for choice in self.choices)
        else:
            allowed = self.kind.__name__ + (f" in {self.bounds}" if self.bounds else "")
        return f"{self.name}: {allowed} = {self.default!r}"

    def coerce(self, value: Any, method: str) -> Any:
        """Check `value` and return it as `kind` (an int is accepted for a float), or raise naming the fix."""
        problem = None
        if self.kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            value = float(value)
            if not math.isfinite(value):
                problem = "is not finite"
        elif not isinstance(value, self.kind) or (self.kind is int and isinstance(value, bool)):
            problem = f"has type {type(value).__name__}, expected {self.kind.__name__}"
        if problem is None and self.choices is not None and value not in self.choices:
            problem = f"is not one of {list(self.choices)}"
        if problem is None and self.bounds is not None and not self.bounds.contains(value):
            problem = f"is outside {self.bounds}"
        if problem is not None:
            raise PriorityError(
                f"priority_args for '{method}': {self.name}={value!r} {problem}. Valid: {self.describe()}."
            )
        return value


# ------------------------------------------------------------------------------------------------------------------
# The registry entry
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Priority:
    """A registered priority: the function plus what the trainer needs to know about it.

    Attributes:
        name: registry name, the value of `PrioritySFTConfig.priority`.
        fn: the pure function computing Φ.
        statistics: names of its positional parameters, from the statistic vocabulary.
        hyperparameters: its keyword-only parameters with defaults and constraints.
        regime: "hard" (Φ ∈ {0, 1}), "soft" (Φ ≥ 0) or "signed" (Φ may be negative: tokens to unlearn).
        paper: the citation shown by `trl-priority list` and the README.
        reference: what a method that reads `ref_*` statistics compares against when the user names no reference:
            "starting_model" (a frozen copy of the model as training starts, or the LoRA base with the adapter off) or
            "explicit" (the method is meaningless against the starting model, so a reference must be given).
        trains_prompt_tokens: the method puts weight on prompt tokens too, so they keep their labels during data
            preparation, and the `response_mask` statistic tells them apart. A function of the resolved
            hyperparameters when it depends on them (WIT with `prompt_weight=0` trains the completion only).
        loss_terms: extra terms added to the Φ-weighted loss (`trl_priority.objectives.LossTerm` per token,
            `DistributionTerm` over the whole next-token distribution), each scaled by one of its hyperparameters.
        selection: a `TopFraction`: the method's Φ reads the statistic `selected`, the top fraction of tokens by a
            score, chosen over the micro-batch or over the whole optimizer step (every micro-batch, every process).
        uses_reference: a function of the resolved hyperparameters saying whether this configuration reads the
            reference at all (Target-SFT with a uniform prior does not); by default, whenever `ref_*` is declared.
            When it says no, the `ref_*` statistics are passed as None.
        validate: checks that involve several hyperparameters at once (e.g. a lower below an upper threshold);
            raises `PriorityError`.
        signal_switch: the rule reads policy statistics, and may read them from the frozen reference instead: the
            registry adds the hyperparameter `signal: "policy" | "reference"` (PriFT, arXiv 2606.09396: a rule often
            works better on the pretrained model's signal). `dft` with `signal="reference"` is `prift_prob`.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    statistics: tuple[str, ...]
    hyperparameters: dict[str, Hyperparameter]
    regime: Regime
    paper: str
    reference: Literal["starting_model", "explicit"] = "starting_model"
    trains_prompt_tokens: bool | Callable[[dict[str, Any]], bool] = False
    loss_terms: tuple[Any, ...] = field(default=())
    selection: Any = None
    uses_reference: Callable[[dict[str, Any]], bool] | None = None
    validate: Callable[[dict[str, Any]], None] | None = None
    signal_switch: bool = False

    @property
    def signed(self) -> bool:
        return self.regime == "signed"

    def trains_prompt(self, args: Mapping[str, Any]) -> bool:
        """Whether prompt tokens keep their labels, for these resolved hyperparameters."""
        flag = self.trains_prompt_tokens
        return bool(flag(dict(args)) if callable(flag) else flag)

    @functools.cached_property
    def all_statistics(self) -> tuple[str, ...]:
        """Every statistic read by the function, its selection score and its loss terms (not `priority`)."""
        names = list(self.statistics)
        if self.selection is not None:
            names += self.selection.statistics
        for term in self.loss_terms:
            names += term.statistics
        return tuple(name for name in dict.fromkeys(names) if name != "priority")

    def signal_of(self, name: str, args: Mapping[str, Any] | None) -> str:
        """The statistic actually read for the declared `name`: with `signal="reference"`, a policy statistic is
        read from the reference instead (`logps` → `ref_logps`), so any rule on the policy runs on the reference."""
        if args is not None and args.get("signal") == "reference" and stats_vocab.source_of(name) == "policy":
            return f"ref_{name}"
        return name

    def statistics_for(self, args: Mapping[str, Any] | None) -> tuple[str, ...]:
        """`all_statistics`, with the `signal` switch applied to the function's and its selection's statistics."""
        names = [self.signal_of(name, args) for name in self.statistics]
        if self.selection is not None:
            names += [self.signal_of(name, args) for name in self.selection.statistics]
        for term in self.loss_terms:
            names += term.statistics
        return tuple(name for name in dict.fromkeys(names) if name != "priority")

    def statistics_from(self, source: str, args: Mapping[str, Any] | None = None) -> tuple[str, ...]:
        """The statistics that the priority, its selection and its loss terms read from `source` ('policy',
        'reference', 'data', 'trainer'), for the resolved hyperparameters `args` when given."""
        names = self.all_statistics if args is None else self.statistics_for(args)
        return tuple(name for name in names if stats_vocab.source_of(name) == source)

    def reference_statistics_for(self, args: Mapping[str, Any]) -> tuple[str, ...]:
        """The reference statistics this configuration reads, without their `ref_` prefix."""
        return tuple(name.removeprefix("ref_") for name in self.statistics_from("reference", args))

    def selection_scores(self, statistics: Mapping[str, Any], args: Mapping[str, Any]) -> torch.Tensor:
        """The selection's score, with the `signal` switch applied."""
        view = {name: statistics[self.signal_of(name, args)] for name in self.selection.statistics}
        return self.selection.scores(view, args)

    @property
    def distribution_terms(self) -> tuple[Any, ...]:
        return tuple(term for term in self.loss_terms if hasattr(term, "needs_reference_distribution"))

    @property
    def token_terms(self) -> tuple[Any, ...]:
        return tuple(term for term in self.loss_terms if not hasattr(term, "needs_reference_distribution"))

    @property
    def needs_reference_distribution(self) -> bool:
        return any(term.needs_reference_distribution for term in self.distribution_terms)

    def reference_used(self, args: Mapping[str, Any]) -> bool:
        """Whether this configuration reads the reference (its statistics or its distribution)."""
        declared = bool(self.reference_statistics_for(args)) or self.needs_reference_distribution
        return declared if self.uses_reference is None else declared and bool(self.uses_reference(dict(args)))

    @functools.cached_property
    def reference_statistics(self) -> tuple[str, ...]:
        """The reference statistics the method reads, without their `ref_` prefix (e.g. `("logps",)`)."""
        return tuple(name.removeprefix("ref_") for name in self.statistics_from("reference"))

    @property
    def needs_reference(self) -> bool:
        return bool(self.reference_statistics) or self.needs_reference_distribution

    @property
    def source(self) -> str:
        """Where Φ comes from: "reference", "external" (labels in the data) or "intrinsic" (the policy itself)."""
        sources = {stats_vocab.source_of(name) for name in self.all_statistics}
        if "reference" in sources or self.needs_reference_distribution:
            return "reference"
        if "data" in sources:
            return "external"
        return "intrinsic"

    @functools.cached_property
    def own_hyperparameters(self) -> frozenset[str]:
        """The keyword-only parameters of the function itself (not `signal`, which the registry adds)."""
        return frozenset(hyperparameter_names(self.fn))

    @property
    def summary(self) -> str:
        """The first line of the docstring."""
        return (inspect.getdoc(self.fn) or "").split("\n")[0]

    def resolve_args(self, priority_args: Mapping[str, Any] | None) -> dict[str, Any]:
        """Return the full hyperparameter dict: defaults overridden by `priority_args`, each value checked."""
        if priority_args is not None and not isinstance(priority_args, Mapping):
            raise PriorityError(
                f"priority_args for '{self.name}' must be a mapping (a dict, or a JSON object on the command line), "
                f"got {type(priority_args).__name__} {priority_args!r}."
            )
        priority_args = dict(priority_args or {})
        unknown = sorted(set(priority_args) - set(self.hyperparameters))
        if unknown:
            valid = "; ".join(hp.describe() for hp in self.hyperparameters.values()) or "none (it takes no arguments)"
            raise PriorityError(f"Unknown priority_args {unknown} for priority '{self.name}'. Valid: {valid}.")
        resolved = {
            name: hp.coerce(priority_args[name], self.name) if name in priority_args else hp.default
            for name, hp in self.hyperparameters.items()
        }
        if self.validate is not None:
            self.validate(resolved)
        return resolved

    def __call__(self, statistics: Mapping[str, torch.Tensor], args: Mapping[str, Any]) -> torch.Tensor:
        """Compute Φ, without gradient, and check the contract: the shape of `mask`, finite values, sign."""
        names = [self.signal_of(name, args) for name in self.statistics]
        missing = [name for name in names if name not in statistics]
        if missing:
            raise PriorityError(
                f"Priority '{self.name}' needs statistics {missing}, but only {sorted(statistics)} were given."
            )
        mask = statistics["mask"]
        # Priorities get copies: a function that edits a statistic in place must not change the loss or the metrics
        inputs = (statistics[name] for name in names)
        inputs = [value.clone() if isinstance(value, torch.Tensor) else value for value in inputs]
        own_args = {name: value for name, value in args.items() if name in self.own_hyperparameters}
        with torch.no_grad():
            phi = self.fn(*inputs, **own_args)
        if not isinstance(phi, torch.Tensor) or phi.shape != mask.shape:
            shape = tuple(phi.shape) if isinstance(phi, torch.Tensor) else type(phi).__name__
            raise PriorityError(
                f"Priority '{self.name}' returned Φ of shape {shape}; it must have the shape of `mask`, "
                f"{tuple(mask.shape)} (batch, seq_len - 1)."
            )
        # Ignored positions get exactly 0, whatever the function wrote there.
        phi = torch.where(mask, phi.detach().float(), 0.0)  # (B, T-1)
        if not torch.isfinite(phi).all():
            bad = (~torch.isfinite(phi)).sum().item()
            raise PriorityError(non_finite_message(self.name, "returned a non-finite Φ", bad, int(mask.sum())))
        if self.regime == "hard" and not ((phi == 0) | (phi == 1)).all():
            other = phi[(phi != 0) & (phi != 1)][0].item()
            raise PriorityError(
                f"Priority '{self.name}' is registered `regime=\"hard\"` (Φ ∈ {{0, 1}}) but returned Φ = {other:.4g}. "
                'Return 0 or 1, or register it `regime="soft"`.'
            )
        if not self.signed and (phi < 0).any():
            raise PriorityError(
                f"Priority '{self.name}' returned a negative Φ (min {phi.min().item():.4g}), but it is not declared "
                'signed. Register it with `regime="signed"` if it is meant to unlearn tokens.'
            )
        return phi


_REGISTRY: dict[str, Priority] = {}


def _make_priority(fn: Callable, name: str, regime: Regime, paper: str, **options: Any) -> Priority:
    if regime not in REGIMES:
        raise PriorityError(f"Priority '{name}': regime {regime!r} is not one of {list(REGIMES)}.")
    signature = inspect.signature(fn)  # the parameters themselves: their defaults and annotations
    hints = typing.get_type_hints(fn, include_extras=True)
    positional = list(statistic_parameters(fn))
    unknown = [stat for stat in positional if stats_vocab.source_of(stat) is None]
    if unknown:
        raise PriorityError(
            f"Priority '{name}': positional parameters {unknown} are not statistics. Known statistics: "
            f"{', '.join(stats_vocab.known_statistics())}. Hyperparameters must be keyword-only (after `*`)."
        )
    if "mask" not in positional:
        raise PriorityError(f"Priority '{name}' must take the `mask` statistic, so that ignored tokens get Φ = 0.")
    hyperparameters = {
        hp: Hyperparameter.from_parameter(signature.parameters[hp], hints, name) for hp in hyperparameter_names(fn)
    }
    if options.get("signal_switch"):
        if "signal" in hyperparameters:
            raise PriorityError(f"Priority '{name}' declares `signal` itself; `signal_switch=True` adds it.")
        hyperparameters["signal"] = Hyperparameter("signal", "policy", str, ("policy", "reference"))
    for stat in positional:
        for needed in stats_vocab.hyperparameters_of(stat):
            if needed not in hyperparameters:
                raise PriorityError(
                    f"Priority '{name}': statistic '{stat}' is computed with the hyperparameter '{needed}'; declare "
                    f"it as a keyword-only parameter of the priority."
                )
    selection = options.get("selection")
    if selection is not None:
        if "selected" not in positional:
            raise PriorityError(f"Priority '{name}' declares a selection, so it must read the `selected` statistic.")
        unknown = [stat for stat in selection.statistics if stats_vocab.source_of(stat) is None]
        named = [hp for hp in (selection.fraction, selection.scope) if isinstance(hp, str)]
        missing = [hp for hp in named if hp not in hyperparameters]
        if unknown or missing:
            raise PriorityError(
                f"Priority '{name}': its selection score reads unknown statistics {unknown} or names hyperparameters "
                f"{missing} that the priority does not declare."
            )
    elif "selected" in positional:
        raise PriorityError(f"Priority '{name}' reads `selected` but declares no `selection=TopFraction(...)`.")
    for term in options.get("loss_terms", ()):
        unknown = [stat for stat in term.statistics if stat != "priority" and stats_vocab.source_of(stat) is None]
        missing = [hp for hp in (term.weight, *term.hyperparameters) if hp is not None and hp not in hyperparameters]
        if unknown or missing:
            raise PriorityError(
                f"Priority '{name}': loss term '{term.name}' reads unknown statistics {unknown} or hyperparameters "
                f"{missing} that the priority does not declare."
            )
    return Priority(name, fn, tuple(positional), hyperparameters, regime, paper, **options)


def register_priority(
    fn: Callable | None = None,
    *,
    name: str | None = None,
    regime: Regime = "soft",
    paper: str = "",
    reference: Literal["starting_model", "explicit"] = "starting_model",
    trains_prompt_tokens: bool | Callable[[dict[str, Any]], bool] = False,
    loss_terms: tuple[Any, ...] = (),
    selection: Any = None,
    uses_reference: Callable[[dict[str, Any]], bool] | None = None,
    validate: Callable[[dict[str, Any]], None] | None = None,
    signal_switch: bool = False,
    overwrite: bool = False,
):
    """Register a priority function under `name` (default: the function's name). Usable as a decorator.

    ```python
    from trl_priority import register_priority

    @register_priority(regime="soft", paper="my idea")
    def confident_half(logps, mask, *, power: float = 0.5):
        return logps.exp().pow(power) * mask

    PrioritySFTConfig(..., priority="confident_half", priority_args={"power": 0.25})
    ```
    """

    def decorator(fn: Callable) -> Callable:
        key = name or fn.__name__
        if key in _REGISTRY and not overwrite:
            raise PriorityError(
                f"A priority named '{key}' is already registered; pass `overwrite=True` to replace it."
            )
        _REGISTRY[key] = _make_priority(
            fn,
            key,
            regime,
            paper,
            reference=reference,
            trains_prompt_tokens=trains_prompt_tokens,
            loss_terms=tuple(loss_terms),
            selection=selection,
            uses_reference=uses_reference,
            validate=validate,
            signal_switch=signal_switch,
        )
        return fn

    return decorator if fn is None else decorator(fn)


def get_priority(priority: str | Callable | Priority | Mapping[str, Any]) -> Priority:
    """Look up a registered priority by name; a plain callable is wrapped as an unregistered soft priority, and a
    mapping `{op: parts}` combines registered ones (`trl_priority.priorities.composed`)."""
    if isinstance(priority, Priority):
        return priority
    if isinstance(priority, Mapping):  # a composition, `{"product": ["verifier", "prift_prob"]}`: composed.py
        from trl_priority.priorities.composed import compose_from_spec

        return compose_from_spec(priority)
    if isinstance(priority, str):
        if priority not in _REGISTRY:
            close = difflib.get_close_matches(priority, _REGISTRY, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise PriorityError(
                f"Unknown priority '{priority}'.{hint} Available: {', '.join(available_priorities())}. "
                "Add your own with `trl_priority.register_priority`."
            )
        return _REGISTRY[priority]
    if callable(priority):
        return _make_priority(priority, getattr(priority, "__name__", "custom"), "soft", paper="user-defined")
    raise PriorityError(f"`priority` must be a registered name or a callable, got {type(priority).__name__}.")


def available_priorities() -> list[str]:
    """Names of every registered priority, sorted."""
    return sorted(_REGISTRY)
