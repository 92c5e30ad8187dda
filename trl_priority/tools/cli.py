"""The `trl-priority` command line.

    trl-priority sft --config recipes/<method>.yaml [--key value ...] [--accelerate_config multi_gpu|zero2|...]
    trl-priority precompute-ref --config recipes/<method>.yaml [--ref_cache_dir DIR] [--accelerate_config ...]
    trl-priority dpo --config recipes/fdpo.yaml [--key value ...]
    trl-priority list
    trl-priority inspect --config recipes/<method>.yaml --num-examples N [--output priorities.html] [--terminal]

`sft` parses the recipe with TRL's `TrlParser` (so a wrong key or priority argument fails at once), then launches
`trl_priority/scripts/sft.py` through `accelerate launch`, exactly as TRL's own `trl sft` launches its script.
`--accelerate_config NAME` takes the configs shipped in `trl_priority/accelerate_configs` (`multi_gpu`, `zero2`,
`zero3`, `fsdp2`), then TRL's (`fsdp1`, `zero1`, ...), then a file path (docs/distributed.md). `precompute-ref`
launches the same script with `--precompute_only`: it builds the trainer as `sft` does, which fills the reference
cache (`ref_cache_dir`, default `auto`: `~/.cache/trl-priority/ref`), and exits before training.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import signal
import subprocess
import sys
from importlib.resources import files

from trl_priority import beyond_tokens
from trl_priority import statistics as stats_vocab
from trl_priority.priorities import available_priorities, get_priority


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
        for spec in data:
            if spec.compute is not None:
                needs.append(f"{spec.column} made from each row's own fields")
            elif spec.derive is not None:
                needs.append(f"spans found in the text (or a column {spec.column})")
            else:
                needs.append(f"column {spec.column}" + (f" ({spec.level})" if spec.level != "token" else ""))
        if "state" in statistics:
            needs.append("state across steps")
        if "progress" in statistics or (priority.selection is not None and callable(priority.selection.fraction)):
            needs.append("training progress")
        if priority.selection is not None:
            needs.append("top-fraction selection")
        if priority.signal_switch:
            needs.append("signal: policy | reference")
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
    print(COMPOSING)
    beyond_tokens.print_rows()
    return 0


COMPOSING = """
Compose registered methods in a recipe (each part's hyperparameters under its name; trl_priority/priorities/composed.py):
  priority: {product: [verifier, prift_prob]}      # Φ = Φ_verifier · Φ_prift_prob   (recipes/verified_prift.yaml)
  priority: {min: [profit, faithful]}              # Φ = min(Φ_profit, Φ_faithful)
  priority: {sum: {dft: 0.5, sft: 0.5}}            # Φ = 0.5·Φ_dft + 0.5·Φ_sft
  priority_args: {verifier: {wrong_weight: -0.5}}
Signed if any part is; hard if every part is and the op is product or min. At most one part may select tokens;
methods with loss terms (asft, target_sft) do not compose."""


def without_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    """`items` without the ordered `subsequence` (each of its entries removed at its first match after the previous
    one's): the command line with the launcher's own arguments taken out. As TRL's CLI does it, written here since
    TRL's helper is private."""
    pending = iter(subsequence)
    current = next(pending, None)
    kept = []
    for item in items:
        if current is not None and item == current:
            current = next(pending, None)
        else:
            kept.append(item)
    return kept


def _run_sft(argv: list[str], command: str = "sft") -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser

    from trl_priority.scripts import dpo, sft

    # `dpo`: F-DPO / Factuality Preference (trl_priority.beyond_tokens.preference)
    script_module = dpo if command == "dpo" else sft
    if command == "precompute-ref":  # the same script, launched the same way, stopping before training
        argv = [*argv, "--precompute_only", "true"]
    parser = script_module.make_parser(prog=f"trl-priority {command}")
    # Parse here first: `-h`, an unknown method or a bad priority argument fail before anything is launched.
    *_, config_remaining, cli_remaining = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    launch_parser = launch_command_parser()
    _check_unknown_settings(parser, launch_parser, config_remaining, cli_remaining, command)
    launch_args = resolve_accelerate_config(config_remaining + cli_remaining)
    script_args = without_subsequence(argv, cli_remaining)
    script = str(files("trl_priority.scripts").joinpath(f"{script_module.__name__.rsplit('.', 1)[1]}.py"))
    with _forward_stop_signals():
        try:
            launch_command(launch_parser.parse_args(launch_args + [script] + script_args))
        except Exception as error:  # the launcher's ways of saying a training process stopped or failed
            code = launch_exit_code(error)
            if code is None:
                raise
            return code
    return 0


STOPPED = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # 130, 143: the training stopped cleanly on a signal


def launch_exit_code(error: BaseException) -> int | None:
    """The exit code of `trl-priority sft` when `accelerate launch` raised `error`: 130 / 143 when training was
    stopped by SIGINT / SIGTERM (cleanly, at a step end: `scripts/sft.py`), the failed process's code otherwise
    (its traceback is already printed); None for an error that is not the training's.

    One process: a `CalledProcessError`. Several processes (torch elastic, which replaces this command's signal
    handlers while it runs): a `SignalException` when the command itself was signalled (the agent then sends the
    signal on to every training process, which stop at their step end), or a `ChildFailedError` carrying each
    process's exit code (all 143 when the training processes themselves were sent SIGTERM).
    """
    if isinstance(error, subprocess.CalledProcessError):
        return error.returncode if error.returncode > 0 else 128 - error.returncode
    try:
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    except ImportError:  # pragma: no cover - torch without elastic
        return None
    if isinstance(error, SignalException):
        print(f"trl-priority: stopped by {signal.Signals(error.sigval).name}.", file=sys.stderr)
        return 128 + int(error.sigval)
    if isinstance(error, ChildFailedError):
        codes = [failure.exitcode for failure in error.failures.values()]
        codes = [code if code >= 0 else 128 - code for code in codes]  # killed by a signal: 128 + its number
        stopped = [code for code in codes if code in STOPPED]
        if stopped and len(stopped) == len(codes):
            return max(stopped)
        failed = [code for code in codes if code not in STOPPED]
        print(
            f"trl-priority: a training process failed (exit codes {codes}); its traceback is above.", file=sys.stderr
        )
        return failed[0] if failed and failed[0] > 0 else 1
    return None


def accelerate_config_path(name: str) -> str:
    """The file `--accelerate_config NAME` means: ours (`trl_priority/accelerate_configs/NAME.yaml`, set up for token
    priorities: see each file's header), else TRL's (`trl/accelerate_configs/NAME.yaml`: fsdp1, zero1, ...), else
    NAME as the path of an accelerate config file."""
    shipped = {}
    for package in ("trl_priority", "trl"):
        directory = files(package).joinpath("accelerate_configs")
        shipped[package] = sorted(f.name[:-5] for f in directory.iterdir() if f.name.endswith(".yaml"))
        if name in shipped[package]:
            return str(directory.joinpath(f"{name}.yaml"))
    if os.path.isfile(name):
        return name
    ours, trls = (", ".join(shipped[package]) for package in ("trl_priority", "trl"))
    raise SystemExit(
        f"--accelerate_config '{name}' is neither a config shipped with trl-priority ({ours}) or TRL ({trls}) nor a "
        "file. Pass one of these names, or the path of an accelerate config file (`accelerate config` writes one)."
    )


def resolve_accelerate_config(launch_args: list[str]) -> list[str]:
    """`--accelerate_config NAME` (or `=NAME`) in the launch arguments, replaced by `--config_file PATH`."""
    for index, arg in enumerate(launch_args):
        if arg == "--accelerate_config" or arg.startswith("--accelerate_config="):
            if "=" in arg:
                name, rest = arg.split("=", 1)[1], launch_args[index + 1 :]
            elif index + 1 < len(launch_args):
                name, rest = launch_args[index + 1], launch_args[index + 2 :]
            else:
                raise SystemExit("--accelerate_config needs a value: a config name (e.g. zero3) or a file path.")
            return ["--config_file", accelerate_config_path(name), *launch_args[:index], *rest]
    return launch_args


def _option_names(parser) -> set[str]:
    return {option.lstrip("-") for action in parser._actions for option in action.option_strings}


def _check_unknown_settings(
    parser, launch_parser, config_remaining: list[str], cli_remaining: list[str], command: str = "sft"
) -> None:
    """Settings that are neither the recipe's (TRL's and ours) nor `accelerate launch`'s are typos: name them before
    anything is launched, with the closest valid name, instead of an accelerate usage error."""
    launch = _option_names(launch_parser) | {"accelerate_config"}
    valid = sorted(_option_names(parser) | launch)
    for source, remaining in (("the recipe", config_remaining), ("the command line", cli_remaining)):
        for item in remaining:
            if not item.startswith("--"):
                continue
            name = item[2:].split("=", 1)[0]
            if name in launch or name.replace("-", "_") in launch:
                continue
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else " `trl-priority sft --help` lists the settings."
            raise SystemExit(f"trl-priority {command}: unknown setting '{name}' in {source}.{hint}")


def _children(pid: int) -> list[int]:
    """Direct child processes of `pid` (Linux /proc; empty elsewhere)."""
    children = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid:
                children.append(int(entry))
    return children


@contextlib.contextmanager
def _forward_stop_signals():
    """SIGINT and SIGTERM sent to this command reach the training process it launched, which stops cleanly (see
    `trl_priority.scripts.sft`): no training process is left running on its own, writing checkpoints."""

    def forward(signum, frame):
        for child in _children(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="trl-priority", description="Token-priority supervised fine-tuning.")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("sft", help="train with a token priority from a YAML recipe", add_help=False)
    commands.add_parser(
        "precompute-ref",
        help="compute a recipe's reference statistics once into `ref_cache_dir` (default: auto), without training",
        add_help=False,
    )
    commands.add_parser(
        "dpo", help="train F-DPO / Factuality Preference (a DPO pair loss with a token priority)", add_help=False
    )
    commands.add_parser("list", help="list the priority methods, their regime, signal source, needs and paper")
    commands.add_parser("inspect", help="show the Φ of a recipe on its first examples", add_help=False)
    args, _ = parser.parse_known_args(argv[:1])
    if args.command == "list":
        return _print_list()
    if args.command in ("sft", "precompute-ref", "dpo"):
        return _run_sft(argv[1:], args.command)
    if args.command == "inspect":
        from trl_priority.tools import viewer as inspect

        return inspect.main(argv[1:])
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
