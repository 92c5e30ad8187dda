"""The `trl-priority` command line.

    trl-priority sft --config recipes/<method>.yaml [--key value ...] [--accelerate_config multi_gpu|zero2|...]
    trl-priority list

`sft` parses the recipe with TRL's `TrlParser` (so a wrong key or priority argument fails at once), then launches
`trl_priority/scripts/sft.py` through `accelerate launch`, exactly as TRL's own `trl sft` launches its script; the
accelerate configs TRL ships (`multi_gpu`, `zero2`, `zero3`, `fsdp2`, ...) are accepted by name.
"""

from __future__ import annotations

import argparse
import sys
from importlib.resources import files

from . import statistics as stats_vocab
from .priorities import available_priorities, get_priority


def describe_priorities() -> list[dict[str, str]]:
    """One row per registered method: what `trl-priority list` and the README table show."""
    rows = []
    for name in available_priorities():
        priority = get_priority(name)
        needs = []
        if priority.needs_reference:
            needs.append("trained reference" if priority.reference == "explicit" else "reference (starting model)")
        statistics = priority.all_statistics
        if any(stat.removeprefix("ref_") in stats_vocab.DISTRIBUTION_STATISTICS for stat in statistics):
            needs.append("full distribution (chunked)")
        if priority.distribution_terms:
            needs.append("distribution term (chunked, with gradient)")
        data = [stats_vocab.DATA_STATISTICS[s] for s in statistics if stats_vocab.source_of(s) == "data"]
        needs += [f"column {spec.column}" + (f" ({spec.level})" if spec.level != "token" else "") for spec in data]
        if "state" in statistics:
            needs.append("state across steps")
        if "progress" in statistics or (priority.selection is not None and callable(priority.selection.fraction)):
            needs.append("training progress")
        if priority.selection is not None:
            needs.append("top-fraction selection")
        defaults = ", ".join(f"{hp.name}={hp.default}" for hp in priority.hyperparameters.values())
        rows.append(
            {
                "method": name,
                "regime": priority.regime,
                "source": priority.source,
                "needs": ", ".join(needs) or "-",
                "defaults": defaults or "-",
                "paper": priority.paper,
            }
        )
    return rows


def _print_list() -> int:
    rows = describe_priorities()
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in columns[:-1]}  # the paper runs to the end
    for row in [dict(zip(columns, columns)), *rows]:
        print("  ".join(row[c].ljust(widths.get(c, 0)) for c in columns).rstrip())
    print("\nEach method's docstring gives its formula and choices: help(trl_priority.get_priority('<method>').fn)")
    return 0


def _run_sft(argv: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from trl.cli.accelerate_config import resolve_accelerate_config_argument
    from trl.cli.commands.training import _subtract_subsequence

    from .scripts import sft

    parser = sft.make_parser(prog="trl-priority sft")
    # Parse here first: `-h`, an unknown method or a bad priority argument fail before anything is launched.
    *_, config_remaining, cli_remaining = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    launch_args = resolve_accelerate_config_argument(config_remaining + cli_remaining)
    script_args = _subtract_subsequence(argv, cli_remaining)
    script = str(files("trl_priority.scripts").joinpath("sft.py"))
    launch_command(launch_command_parser().parse_args(launch_args + [script] + script_args))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="trl-priority", description="Token-priority supervised fine-tuning.")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("sft", help="train with a token priority from a YAML recipe", add_help=False)
    commands.add_parser("list", help="list the priority methods, their regime, signal source, needs and paper")
    args, _ = parser.parse_known_args(argv[:1])
    if args.command == "list":
        return _print_list()
    if args.command == "sft":
        return _run_sft(argv[1:])
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
