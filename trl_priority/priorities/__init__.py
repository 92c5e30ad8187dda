"""Token priorities: one module per family, every method registered by name.

Importing this package registers every built-in method.
"""

from . import contrastive, distribution, dynamics, external, intrinsic, privacy, reference, signed, weighting  # noqa: F401  (registration side effects)
from .registry import (
    Fraction,
    Hyperparameter,
    NonNegative,
    PositiveInt,
    Priority,
    PriorityError,
    Probability,
    Range,
    available_priorities,
    get_priority,
    register_priority,
)


__all__ = [
    "Fraction",
    "Hyperparameter",
    "NonNegative",
    "PositiveInt",
    "Priority",
    "PriorityError",
    "Probability",
    "Range",
    "available_priorities",
    "get_priority",
    "register_priority",
]
