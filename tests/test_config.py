"""PrioritySFTConfig: validation before anything is loaded, serialisation for loggers."""

from __future__ import annotations

import json

import pytest

from trl_priority import PriorityError, PrioritySFTConfig


def config(tmp_path, **kwargs) -> PrioritySFTConfig:
    return PrioritySFTConfig(output_dir=str(tmp_path / "out"), bf16=False, report_to="none", **kwargs)


def test_unset_priority_is_plain_sft(tmp_path):
    args = config(tmp_path)
    assert args.priority is None and args.priority_name is None


def test_unknown_method_lists_the_available_ones(tmp_path):
    with pytest.raises(PriorityError, match="Unknown priority 'dtf'. Did you mean 'dft'.*Available: .*prift_mass"):
        config(tmp_path, priority="dtf")
    assert not (tmp_path / "out").exists()  # nothing was written


@pytest.mark.parametrize(
    "priority, priority_args, message",
    [
        ("rho1", {"ratio": 0}, r"ratio=0.0 is outside \(0, 1\]"),
        ("rho1", {"top": 0.5}, r"Unknown priority_args \['top'\] for priority 'rho1'. Valid: ratio"),
        ("profit", {"strategy": "sideways"}, r"not one of \['higher', 'lower', 'middle'\]"),
        ("eaft", {"k": 2.5}, "has type float, expected int"),
        ("sft", {"anything": 1}, "it takes no arguments"),
    ],
)
def test_bad_priority_args_name_the_problem(tmp_path, priority, priority_args, message):
    with pytest.raises(PriorityError, match=message):
        config(tmp_path, priority=priority, priority_args=priority_args)


def test_priority_args_from_the_command_line_are_json(tmp_path):
    args = config(tmp_path, priority="profit", priority_args='{"tau": 0.2, "strategy": "lower"}')
    assert args.priority_args == {"tau": 0.2, "strategy": "lower"}
    with pytest.raises(ValueError, match="JSON object"):
        config(tmp_path, priority="profit", priority_args="tau=0.2")


def test_conflicting_settings(tmp_path):
    with pytest.raises(ValueError, match="priority='dft'"):
        config(tmp_path, priority="dft", loss_type="dft")
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        config(tmp_path, priority="dft", label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match="no `priority`"):
        config(tmp_path, priority_args={"tau": 0.1})


def test_a_callable_priority_serialises_by_name(tmp_path):
    def half(mask):
        return 0.5 * mask

    args = config(tmp_path, priority=half)
    assert args.priority_name == "half"
    assert json.loads(args.to_json_string())["priority"] == "half"
