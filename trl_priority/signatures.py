"""Reading a pure function's parameters from its signature: the one convention every declared function follows.

A priority, a selection score, a loss term and a distribution statistic are pure functions whose positional
parameters are statistics (named from the vocabulary in `trl_priority.statistics`) and whose keyword-only parameters
are the method's hyperparameters. This module reads the two lists; it imports nothing from the package, so any module
(the statistics vocabulary included) can use it without an import cycle.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable


def statistic_parameters(fn: Callable) -> tuple[str, ...]:
    """The names of `fn`'s positional parameters (the statistics it reads), in order."""
    params = inspect.signature(fn).parameters.values()
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def hyperparameter_names(fn: Callable) -> tuple[str, ...]:
    """The names of `fn`'s keyword-only parameters (the hyperparameters it reads), in order."""
    params = inspect.signature(fn).parameters.values()
    return tuple(p.name for p in params if p.kind == p.KEYWORD_ONLY)
