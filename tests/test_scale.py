"""Large example indices, many entries, partitioned weights: the paths that only show at scale stay exact and small.

Each test here failed on the code before the fix it guards (see the test's docstring for how it failed).
"""

from __future__ import annotations

import torch

from trl_priority.schedules import pool_over_groups, unit_groups


def test_pooling_with_huge_group_ids_allocates_per_group_present():
    """Group ids built as `example_index * 65536 + unit` at example index 10^9: the old pooling allocated a table of
    B × (max id + 1) floats (here ~500 TB, an allocation error; ~13 GB per row at example 50,000). Renumbered per
    batch, it equals pooling the same groups with small ids."""
    phi = torch.tensor([[0.1, 0.9, 0.4, 0.3], [0.5, 0.2, 0.8, 0.7]])  # (B, T-1)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    small = torch.tensor([[0, 0, 1, 1], [2, -1, 2, 3]])
    huge = torch.where(small >= 0, 10**9 * 65536 + small, -1)
    for how in ("max", "mean", "min"):
        torch.testing.assert_close(pool_over_groups(phi, huge, mask, how), pool_over_groups(phi, small, mask, how))


def test_unit_groups_are_numbered_within_the_batch():
    """One group per (example, unit) pair present, numbered from 0, whatever the example index (the old ids were
    `example * 65536 + unit`: 3.3e9 at example 50,000, and a unit ≥ 65536 ran into the next example's ids)."""
    example = torch.tensor([[50_000, 50_000, 50_000, 7_000_000], [50_001, 50_001, -1, -1]])
    unit = torch.tensor([[0, 0, 70_000, 0], [0, 1, -1, -1]])
    words = unit_groups(example, unit, "word")
    assert words.tolist() == [[0, 0, 1, 4], [2, 3, -1, -1]]
    spans = unit_groups(example, unit, "span")  # span 0: outside every span
    assert spans.tolist() == [[-1, -1, 0, -1], [-1, 1, -1, -1]]
