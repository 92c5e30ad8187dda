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


def test_the_users_config_is_not_changed(make_model, tokenizer, datasets_, make_args):
    from trl_priority import PrioritySFTTrainer

    args = make_args(priority="wit")
    PrioritySFTTrainer(
        model=make_model(), args=args, train_dataset=datasets_.prompt_completion(2), processing_class=tokenizer
    )
    assert args.completion_only_loss is None  # the trainer turned it off on its own copy


def test_context_parallelism_is_refused(monkeypatch, make_model, tokenizer, datasets_, make_args):
    from types import SimpleNamespace

    from accelerate import Accelerator

    from trl_priority import PrioritySFTTrainer, checks

    trainer = PrioritySFTTrainer(
        model=make_model(), args=make_args(priority="dft"), train_dataset=datasets_.prompt_completion(2),
        processing_class=tokenizer,
    )  # fmt: skip
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    batch["shift_labels"] = batch["labels"][:, 1:]
    with pytest.raises(ValueError, match="pre-shifted `shift_labels`"):
        trainer.compute_loss(trainer.model, batch)
    config = SimpleNamespace(cp_enabled=True, sp_enabled=False, tp_size=1)
    monkeypatch.setattr(Accelerator, "parallelism_config", property(lambda self: config), raising=False)
    with pytest.raises(ValueError, match="does not support context or sequence parallelism"):
        # what __init__ runs right after SFTTrainer's set-up
        checks.check_parallelism(trainer.priority.name, trainer.accelerator.parallelism_config)


def test_priority_args_that_are_not_json_or_not_a_mapping(tmp_path):
    with pytest.raises(ValueError, match="`priority_args` is not valid JSON"):
        PrioritySFTConfig(str(tmp_path), priority="rho1", priority_args="{ratio: 0.5}")
    with pytest.raises(ValueError, match="`priority_args` must be a mapping"):
        PrioritySFTConfig(str(tmp_path), priority="rho1", priority_args="[0.5]")
    with pytest.raises(ValueError, match="negative_loss='ascend'"):
        PrioritySFTConfig(str(tmp_path), priority="sft", negative_loss="ascend")
