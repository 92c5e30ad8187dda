"""Rows of the position paper's Table 1 (arXiv 2602.01227) that are not a token weight in `priority`: Φ over
parameters, or Φ inside another objective. Each is a setting or a trainer of this package with its own recipe,
`recipes/<row>.yaml`; `trl-priority list` prints them after the registered methods, and the README has a row for each.
"""

from __future__ import annotations


ROWS: list[dict[str, str]] = [
    {
        "row": "s2ft",
        "kind": "structural",
        "how": "structural_priority: s2ft (trl_priority.beyond_tokens.structural), with any priority",
        "paper": "Yang et al. 2024, S2FT, NeurIPS 2024, arXiv 2412.06289",
    },
    {
        "row": "factuality_preference",
        "kind": "preference",
        "how": "trl-priority dpo, factuality_margin: 0 (trl_priority.beyond_tokens.preference.FactualityDPOTrainer)",
        "paper": "Hu et al. 2025, Factuality in Legal QA, COLING 2025",
    },
    {
        "row": "fdpo",
        "kind": "preference",
        "how": "trl-priority dpo, factuality_margin: 1 (label flip + margin; optional token priority)",
        "paper": "Chaduvula et al. 2026, F-DPO, arXiv 2601.03027",
    },
]


def print_rows() -> None:
    """The rows as `trl-priority list` prints them, one per line."""
    print("\nTable 1 rows that are not a token weight (settings or trainers; recipes/<row>.yaml):")
    for row in ROWS:
        print(f"  {row['row']:<22}  {row['kind']:<11}  {row['how']}  [{row['paper']}]")
