"""Every mistake a user makes is named early, and no run is lost to one.

`MISTAKES` is the promise as a table: the input, the error it must raise, and a phrase its message must contain, so
that a regression in any error message fails here. The tests after it cover what a table cannot: saving and resuming
with any callable priority, statistics that a priority cannot falsify, and a run killed while saving.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from datasets import Dataset

from trl_priority import PriorityError, PrioritySFTConfig, PrioritySFTTrainer, register_priority
from trl_priority.priorities import registry


@pytest.fixture
def world(tmp_path, make_model, tokenizer, datasets_, make_args, model_dir):
    """What every case needs, in one object."""

    class World:
        def trainer(self, model=None, dataset=None, **kwargs):
            args = kwargs.pop("args", None) or make_args(**kwargs.pop("settings", {"priority": "dft"}))
            return PrioritySFTTrainer(
                model=model if model is not None else make_model(),
                args=args,
                train_dataset=dataset if dataset is not None else datasets_.prompt_completion(4),
                processing_class=tokenizer,
                **kwargs,
            )

    world = World()
    world.tmp_path, world.make_model, world.make_args, world.model_dir = tmp_path, make_model, make_args, model_dir
    world.datasets, world.tokenizer = datasets_, tokenizer
    return world


def _hard_half(mask):
    """Φ = 1/2: not a hard selection"""
    return mask.float() * 0.5


def _callback_returning_nll(batch):
    return torch.full(batch["labels"][:, 1:].shape, 2.3)  # −log p instead of log p


def _resume_with_other_settings(world):
    first = world.trainer(
        settings={"priority": "profit", "priority_args": {"tau": 0.001}, "save_strategy": "steps", "save_steps": 1}
    )
    first.train()
    second = world.trainer(settings={"priority": "profit", "priority_args": {"tau": 0.2}})
    second.train(resume_from_checkpoint=os.path.join(first.args.output_dir, "checkpoint-1"))


def _incomplete_checkpoint(world):
    first = world.trainer(settings={"priority": "sft", "save_strategy": "steps", "save_steps": 1})
    first.train()
    last = os.path.join(first.args.output_dir, "checkpoint-2")
    os.remove(os.path.join(last, "trainer_state.json"))
    world.trainer(settings={"priority": "sft"}).train(resume_from_checkpoint=last)


def _diverged(world, priority):
    """A model whose weights hold a NaN, trained with `priority`: an error, and no NaN weights saved."""
    model = world.make_model()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    trainer = world.trainer(model=model, settings={"priority": priority, "save_strategy": "steps", "save_steps": 1})
    try:
        trainer.train()
    finally:
        assert not os.path.exists(os.path.join(trainer.args.output_dir, "checkpoint-1"))


def _rows(**columns):
    return Dataset.from_dict(columns)


MISTAKES = {
    # The method and its settings, caught before any model loads
    "misspelt method": (lambda w: w.make_args(priority="dtf"), PriorityError, "Did you mean 'dft'?"),
    "out-of-range argument": (
        lambda w: w.make_args(priority="rho1", priority_args={"ratio": 1.5}),
        PriorityError,
        "ratio=1.5 is outside (0, 1]",
    ),
    "unknown argument": (
        lambda w: w.make_args(priority="rho1", priority_args={"ration": 0.5}),
        PriorityError,
        "Unknown priority_args",
    ),
    "priority_args not JSON": (
        lambda w: w.make_args(priority="rho1", priority_args="{ratio: 0.5}"),
        ValueError,
        "is not valid JSON",
    ),
    "priority_args not a mapping": (
        lambda w: w.make_args(priority="rho1", priority_args="[0.5]"),
        ValueError,
        "must be a mapping",
    ),
    "priority_args without priority": (
        lambda w: w.make_args(priority_args={"ratio": 0.5}),
        ValueError,
        "but no `priority`",
    ),
    "loss_type and priority": (lambda w: w.make_args(priority="dft", loss_type="dft"), ValueError, "priority='dft'"),
    "label smoothing and priority": (
        lambda w: w.make_args(priority="dft", label_smoothing_factor=0.1),
        ValueError,
        "label_smoothing_factor",
    ),
    "negative_loss misspelt": (
        lambda w: w.make_args(priority="dft", negative_loss="ascend"),
        ValueError,
        "negative_loss='ascend'",
    ),
    "WIT training nothing": (
        lambda w: w.make_args(priority="wit", priority_args={"prompt_weight": 0, "response_weight": 0}),
        PriorityError,
        "no token would train",
    ),
    "WIT with a weight far out of range": (
        lambda w: w.make_args(priority="wit", priority_args={"prompt_weight": 1e9}),
        PriorityError,
        "prompt_weight=1000000000.0 is outside [0, 1]",
    ),
    "ref_model_init_kwargs not JSON": (
        lambda w: w.make_args(priority="prift_prob", ref_model_init_kwargs="{dtype: bfloat16}"),
        ValueError,
        "`ref_model_init_kwargs` is not valid JSON",
    ),
    "ref_model_init_kwargs not a mapping": (
        lambda w: w.make_args(priority="prift_prob", ref_model_init_kwargs='["bfloat16"]'),
        ValueError,
        "`ref_model_init_kwargs` must be a mapping",
    ),
    "ref_model_init_kwargs misspelt": (
        lambda w: w.make_args(priority="prift_prob", ref_model_init_kwargs={"dtpye": "float32"}),
        ValueError,
        "unknown key 'dtpye': it is neither a keyword of `from_pretrained` nor an attribute of the model's "
        "configuration. Did you mean 'dtype'?",
    ),
    "ref_model_init_kwargs with a misspelt config attribute": (
        lambda w: w.make_args(
            priority="prift_prob", ref_model_name_or_path=w.model_dir(1), ref_model_init_kwargs={"rms_norm_epss": 1e-5}
        ),
        ValueError,
        "Did you mean 'rms_norm_eps'?",
    ),
    "ref_model_init_kwargs with an unknown dtype": (
        lambda w: w.make_args(priority="prift_prob", ref_model_init_kwargs='{"dtype": "bf16"}'),
        ValueError,
        "dtype='bf16'; it must be one of ['auto', 'bfloat16', 'float16', 'float32']. Did you mean 'bfloat16'?",
    ),
    # Models and references, caught before the policy loads
    "model path that does not exist": (
        lambda w: w.trainer(model=str(w.tmp_path / "no-such-model")),
        ValueError,
        "The model path",
    ),
    "empty reference folder": (
        lambda w: w.trainer(settings={"priority": "prift_prob"}, ref_model=str(w.tmp_path)),
        ValueError,
        "reference model folder",
    ),
    "reference path equal to the policy's": (
        lambda w: (path := w.model_dir(0)) and w.trainer(model=path, settings={"priority": "rho1"}, ref_model=path),
        ValueError,
        "is the policy's own starting model",
    ),
    "reference object equal to the policy": (
        lambda w: (m := w.make_model()) and w.trainer(model=m, settings={"priority": "rho1"}, ref_model=m),
        ValueError,
        "same object",
    ),
    "trained reference missing": (
        lambda w: w.trainer(settings={"priority": "rho1"}),
        ValueError,
        "compares the policy with a reference trained",
    ),
    "reference with another vocabulary": (
        lambda w: w.trainer(settings={"priority": "prift_prob"}, ref_model=w.make_model(vocab_size=77)),
        ValueError,
        "vocabulary has 77 entries",
    ),
    "a loss function and a priority": (
        lambda w: w.trainer(compute_loss_func=lambda *a, **k: 0),
        ValueError,
        "replaces the loss",
    ),
    # Data
    "empty training dataset": (
        lambda w: w.trainer(dataset=Dataset.from_dict({"prompt": [], "completion": []})),
        ValueError,
        "training dataset is empty",
    ),
    "a column the method reads is missing": (
        lambda w: w.trainer(settings={"priority": "robustft"}),
        ValueError,
        "reads the column 'noise'",
    ),
    "an example-level value that is not a number": (
        lambda w: w.trainer(
            settings={"priority": "robustft"},
            dataset=w.datasets.prompt_completion(2).add_column("noise", [0.0, float("nan")]),
        ),
        ValueError,
        "Example 1: column 'noise' holds one number per example",
    ),
    # Raw rows, checked before tokenizing: the column, the row and the expected format
    "columns in no SFT format": (
        lambda w: w.trainer(dataset=_rows(question=["2 + 2?"], answer=["4"])),
        ValueError,
        "rename_columns({'question': 'prompt', 'answer': 'completion'})",
    ),
    "a prompt that is not a string": (
        lambda w: w.trainer(dataset=_rows(prompt=[1, 2], completion=["a", "b"])),
        ValueError,
        "The column 'prompt' of the train dataset holds int64 values (row 0: 1), but it must hold a string",
    ),
    "a missing completion": (
        lambda w: w.trainer(dataset=_rows(prompt=["a", "b"], completion=["x", None])),
        ValueError,
        "Row 1 of the train dataset has no value (None) in the column 'completion'",
    ),
    "a completion_mask holding 2": (
        lambda w: w.trainer(dataset=_rows(input_ids=[[5, 6, 7, 8], [5, 6]], completion_mask=[[0, 1, 1, 1], [0, 2]])),
        ValueError,
        "Row 1 of the train dataset has 2 at token 1 of 'completion_mask', which must hold 0 or 1",
    ),
    "an eval dataset in no SFT format": (
        lambda w: w.trainer(eval_dataset=_rows(input=["a"], output=["b"])),
        ValueError,
        "The eval dataset has the columns ['input', 'output']",
    ),
    # At training time: a diverged model, whatever the method
    "a diverged model trained with sft": (
        lambda w: _diverged(w, "sft"),
        PriorityError,
        "non-finite NLL −log π_θ(y_t) on 24 of 24 supervised tokens. Check its statistics for inf/NaN (a model or "
        "reference that diverged",
    ),
    "a diverged model trained with wit": (lambda w: _diverged(w, "wit"), PriorityError, "reference that diverged"),
    "a diverged model trained with dft": (lambda w: _diverged(w, "dft"), PriorityError, "reference that diverged"),
    # At training time: what a priority or a callback returns
    "callback returning the NLL": (
        lambda w: w.trainer(settings={"priority": "prift_prob"}, ref_model=_callback_returning_nll).train(),
        ValueError,
        "Did it return the NLL",
    ),
    "a hard priority returning 0.5": (
        lambda w: w.trainer(settings={"priority": "hard_half"}).train(),
        PriorityError,
        'registered `regime="hard"`',
    ),
    "a non-signed priority returning Φ < 0": (
        lambda w: w.trainer(settings={"priority": lambda mask: -mask.float()}).train(),
        PriorityError,
        "not declared signed",
    ),
    "a non-finite Φ": (
        lambda w: w.trainer(settings={"priority": lambda mask: mask.float() / 0}).train(),
        PriorityError,
        "non-finite Φ",
    ),
    # Resuming
    "resuming with other priority settings": (
        _resume_with_other_settings,
        ValueError,
        "trained with other priority settings (priority_args",
    ),
    "resuming an incomplete checkpoint": (_incomplete_checkpoint, ValueError, "is incomplete"),
    # Inspecting Φ
    "token_priorities on raw rows": (
        lambda w: w.trainer().token_priorities(list(w.datasets.prompt_completion(2))),
        ValueError,
        "raw examples are not tokenized",
    ),
    "token_priorities without labels": (
        lambda w: (t := w.trainer()).token_priorities(
            {k: v for k, v in t.data_collator(list(t.train_dataset)).items() if k != "labels"}
        ),
        ValueError,
        "without `labels`",
    ),
}


@pytest.fixture
def hard_half():
    register_priority(_hard_half, name="hard_half", regime="hard", paper="a test")
    yield
    registry._REGISTRY.pop("hard_half")


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_mistake_is_named_with_its_fix(mistake, world, hard_half):
    make, error, phrase = MISTAKES[mistake]
    with pytest.raises(error) as raised:
        make(world)
    assert phrase in str(raised.value), str(raised.value)


def test_settings_are_checked_before_the_policy_loads(world, monkeypatch):
    """A wrong reference path is reported before the policy is loaded (a 7B load wasted otherwise)."""
    import trl_priority.trainer as trainer_module

    loads = []
    monkeypatch.setattr(trainer_module.SFTTrainer, "__init__", lambda *a, **k: loads.append(1))
    with pytest.raises(ValueError, match="reference model path"):
        world.trainer(model=world.model_dir(0), settings={"priority": "prift_prob"}, ref_model="./missing-reference")
    assert loads == []


def test_truncated_completions_are_reported_for_methods_that_train_prompts(world):
    long_prompt = " ".join(["apples"] * 80)
    dataset = Dataset.from_dict({"prompt": [long_prompt, "Q "], "completion": ["7", "A"]})
    with pytest.warns(UserWarning, match="1 of 2 train examples have no completion token left"):
        world.trainer(dataset=dataset, settings={"priority": "wit", "max_length": 32})


# ----------------------------------------------------------------------------------------------------------------
# No run lost
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lambda", "local function"])
def test_any_callable_priority_saves_checkpoints_and_resumes(kind, world):
    def local_half(mask):
        return mask.float() * 0.5

    priority = (lambda mask: mask.float() * 0.5) if kind == "lambda" else local_half
    settings = {"priority": priority, "max_steps": 3, "save_strategy": "steps", "save_steps": 1}
    trainer = world.trainer(settings=settings)
    trainer.train()
    output = trainer.args.output_dir
    for step in (1, 2, 3):
        assert os.path.isfile(os.path.join(output, f"checkpoint-{step}", "trainer_state.json"))
    trainer.save_model(os.path.join(output, "final"))
    saved = torch.load(os.path.join(output, "final", "training_args.bin"), weights_only=False)
    assert "not picklable" in saved.priority and ("lambda" in saved.priority or "local_half" in saved.priority)
    assert trainer.args.priority is priority  # restored after saving

    resumed = world.trainer(settings={**settings, "priority": priority})
    resumed.train(resume_from_checkpoint=os.path.join(output, "checkpoint-2"))
    assert resumed.state.global_step == 3


def test_a_priority_editing_its_statistics_in_place_cannot_falsify_the_loss(world, label_logps):
    def vandal(logps, mask):
        logps.mul_(0)  # edits its input in place
        return mask.float()

    trainer = world.trainer(settings={"priority": vandal})
    batch = trainer.data_collator(list(trainer.train_dataset))
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(dict(batch)))
    logps = label_logps(trainer.model, batch)
    mask = batch["labels"][:, 1:] != -100
    expected = -logps[mask].mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)
    assert trainer._metrics["train"]["nll"][-1] == pytest.approx(expected.item(), rel=1e-4)


def test_a_run_killed_while_saving_resumes_from_the_last_complete_checkpoint(world):
    settings = {"priority": "dft", "max_steps": 3, "save_strategy": "steps", "save_steps": 1}
    trainer = world.trainer(settings=settings)
    trainer.train()
    output = trainer.args.output_dir
    # Killed while writing checkpoint-3: the weights are there, the state that marks it complete is not
    os.remove(os.path.join(output, "checkpoint-3", "trainer_state.json"))
    with pytest.warns(UserWarning, match="Skipping the incomplete checkpoint .*checkpoint-3"):
        resumed = world.trainer(settings={**settings, "max_steps": 3})
        resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3  # steps 3 retrained from checkpoint-2
    logged = [log for log in resumed.state.log_history if "loss" in log]
    assert logged[-1]["step"] == 3
    shutil.rmtree(output)


def test_priority_change_on_resume_can_be_allowed(world):
    first = world.trainer(settings={"priority": "dft", "save_strategy": "steps", "save_steps": 1})
    first.train()
    args = world.make_args(priority="sft", allow_priority_change=True)
    second = world.trainer(args=args)
    second.train(resume_from_checkpoint=os.path.join(first.args.output_dir, "checkpoint-1"))
    assert second.state.global_step == 2


def test_config_rejects_nothing_it_should_accept(tmp_path):
    # A JSON object string is fine on the command line, and a dict in Python
    config = PrioritySFTConfig(str(tmp_path), priority="rho1", priority_args='{"ratio": 0.5}', bf16=False)
    assert config.priority_args == {"ratio": 0.5}
    # Loading keywords and configuration attributes (the reference's own when its config.json is readable)
    kwargs = '{"dtype": "float32", "quantization_config": null, "attn_implementation": "sdpa", "use_cache": false}'
    config = PrioritySFTConfig(str(tmp_path), priority="prift_prob", ref_model_init_kwargs=kwargs, bf16=False)
    assert config.ref_model_init_kwargs["quantization_config"] is None
    config = PrioritySFTConfig(
        str(tmp_path), priority="prift_prob", ref_model_init_kwargs={"rope_theta": 1e4}, bf16=False
    )
    assert config.ref_model_init_kwargs == {"rope_theta": 1e4}  # a model's own attribute, its config not read here


def test_rows_are_checked_before_the_policy_loads(world, monkeypatch):
    import trl_priority.trainer as trainer_module

    loads = []
    monkeypatch.setattr(trainer_module.SFTTrainer, "__init__", lambda *a, **k: loads.append(1))
    with pytest.raises(ValueError, match="no value \\(None\\) in the column 'completion'"):
        world.trainer(model=world.model_dir(0), dataset=_rows(prompt=["a"], completion=[None]))
    assert loads == []


def test_rows_in_every_sft_format_pass_the_checks(world):
    from trl_priority.checks import check_raw_rows

    for make in (world.datasets.text, world.datasets.messages, world.datasets.prompt_completion):
        check_raw_rows(make(2), "train")
    check_raw_rows(world.datasets.conversational_prompt_completion(2), "train")
    check_raw_rows(_rows(input_ids=[[5, 6]], completion_mask=[[False, True]]), "train")
    check_raw_rows(_rows(content=["a"]), "train", text_field="content")  # `dataset_text_field`
    check_raw_rows(_rows(text=["a"], completion=["b"]), "train")  # TRL reads `text` when there is no `prompt`
    # Rows as the dataset shows them, after a filter or a shuffle (an indices mapping over the stored rows)
    with_none = _rows(prompt=["a", "b", "c"], completion=["x", None, "z"])
    check_raw_rows(with_none.filter(lambda row: row["completion"] is not None), "train")
    with pytest.raises(ValueError, match="Row 2 of the train dataset has no value"):
        check_raw_rows(with_none.select([0, 2, 1]), "train")
    with pytest.raises(ValueError, match="has \\['completion'\\] but no \\['prompt'\\]"):
        check_raw_rows(_rows(completion=["b"]), "train")


# ----------------------------------------------------------------------------------------------------------------
# Less trained than asked: said once, with counts
# ----------------------------------------------------------------------------------------------------------------
def test_a_priority_that_trains_nothing_is_reported_once(world):
    trainer = world.trainer(settings={"priority": lambda mask: mask.float() * 0, "max_steps": 3})
    with pytest.warns(UserWarning, match="gave Φ = 0 to all 24 supervised tokens of a batch at step 0") as record:
        trainer.train()
    assert sum("gave Φ = 0" in str(w.message) for w in record) == 1
    assert trainer.run_guard.zero_batches == 3


def test_phi_zero_is_not_reported_when_declared_terms_train(world, recwarn):
    """Target-SFT without trust (α = 0) is self-distillation: Φ = 0, its soft-target term trains every token."""
    args = {"alpha": "constant", "alpha_value": 0.0, "prior": "reference"}
    trainer = world.trainer(settings={"priority": "target_sft", "priority_args": args}, ref_model=world.make_model(1))
    trainer.train()
    assert trainer.state.log_history[0]["loss"] > 0
    assert not [w for w in recwarn if "gave Φ = 0" in str(w.message)]


def test_a_float64_priority_that_underflows_is_reported(world):
    trainer = world.trainer(settings={"priority": lambda mask: mask.double() * 1e-300})
    with pytest.warns(UserWarning, match="Φ = 0 to all .* a float64 Φ below ~1e-45 rounds to 0"):
        trainer.train()


def test_empty_completions_are_counted(world):
    dataset = _rows(prompt=["Tom has 3 apples. ", "A box holds 6 pens. ", "Ann reads. "], completion=["", "7", ""])
    with pytest.warns(UserWarning, match="2 of 3 train examples have an empty completion"):
        world.trainer(dataset=dataset, settings={"priority": "sft"})
    conversational = _rows(
        prompt=[[{"role": "user", "content": "a"}]] * 2,
        completion=[[{"role": "assistant", "content": ""}], [{"role": "assistant", "content": "b"}]],
    )
    with pytest.warns(UserWarning, match="1 of 2 train examples have an empty completion"):
        world.trainer(dataset=conversational, settings={"priority": "sft"})


@pytest.mark.parametrize("priority", ["dft", "robustft"])
def test_examples_dropped_by_truncation_are_counted(world, priority):
    long_prompt = " ".join(["apples"] * 80)
    dataset = _rows(prompt=[long_prompt, "Q ", "R "], completion=["7", "A", "B"], noise=[0.0, 0.0, 1.0])
    with pytest.warns(UserWarning, match="1 of 3 train examples were dropped: after truncation to max_length=32"):
        world.trainer(dataset=dataset, settings={"priority": priority, "max_length": 32})


# ----------------------------------------------------------------------------------------------------------------
# The command line: what the recipe asks for is checked before a model loads
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def no_model_loads(monkeypatch):
    """Records every `SFTTrainer.__init__` (where the policy loads) instead of running it."""
    import trl_priority.trainer as trainer_module

    loads = []
    monkeypatch.setattr(trainer_module.SFTTrainer, "__init__", lambda *a, **k: loads.append(1))
    return loads


def _recipe(world, name, *overrides):
    from pathlib import Path

    from trl_priority.scripts import sft

    recipe = Path(__file__).parents[1] / "recipes" / f"{name}.yaml"
    model = ["--model_name_or_path", world.model_dir(0), "--output_dir", str(world.tmp_path / "run")]
    return sft, sft.make_parser().parse_args_and_config(["--config", str(recipe), *model, *overrides])


def test_a_column_the_data_lacks_is_named_before_the_model_loads(world, no_model_loads):
    sft, parsed = _recipe(world, "robustft", "--dataset_name", "builtin:gsm8k")
    with pytest.raises(
        ValueError, match="reads the column 'noise', which the train dataset lacks.*builtin:gsm8k-noisy"
    ):
        sft.main(*parsed)
    assert no_model_loads == []


@pytest.mark.parametrize("flag", ["true", "True"])
def test_resuming_with_no_checkpoint_is_named_before_the_model_loads(world, no_model_loads, flag):
    sft, parsed = _recipe(world, "sft", "--resume_from_checkpoint", flag)
    with pytest.raises(
        ValueError, match="holds no complete checkpoint .* Remove the flag to start a new run, or point"
    ):
        sft.main(*parsed)
    assert no_model_loads == []


def test_resuming_from_a_recipe_true_with_no_checkpoint(world, no_model_loads):
    from trl_priority.checks import check_resume

    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        check_resume(True, str(world.tmp_path / "empty"))  # YAML `true` arrives as a bool
    with pytest.raises(ValueError, match="'missing/checkpoint-3', which is no folder"):
        check_resume("missing/checkpoint-3", str(world.tmp_path))
    check_resume(None, str(world.tmp_path))
    check_resume(False, str(world.tmp_path))


def test_a_second_run_into_a_finished_run_is_warned(world):
    first = world.trainer(settings={"priority": "sft", "save_strategy": "steps", "save_steps": 1})
    first.train()
    first.save_model(first.args.output_dir)
    with pytest.warns(
        UserWarning, match=r"already holds a saved model \(model.safetensors, training_args.bin\) and 2"
    ):
        world.trainer(settings={"priority": "sft"})
