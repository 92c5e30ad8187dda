"""A resume must continue the run it resumes: every setting Φ depends on is guarded, and the reference's values kept
per token (the epoch cache) are served only to a run of the same reference.

Each test failed on the code before (named in its docstring).
"""

from __future__ import annotations

import pytest

from tests.conftest import StopAfter
from tests.references.test_disk_cache import counted_reference, make_trainer


def _stopped_and_resumed(make_model, tokenizer, datasets_, make_args, tmp_path, ref_seed=1, **changes):
    """Train 4 rows (2 steps an epoch, 2 epochs) and stop after step 2 (checkpoint-2, the end of epoch 1); resume it
    with `changes` (and a reference of seed `ref_seed`). Returns (resumed trainer, reference forwards it ran)."""
    settings = dict(num_train_epochs=2, max_steps=-1, save_strategy="steps", save_steps=2, output_dir=str(tmp_path))
    first = make_trainer(make_model, tokenizer, datasets_, make_args, make_model(seed=1), n=4, **settings)
    first.add_callback(StopAfter(2))
    first.train()
    ref, counter = counted_reference(make_model, seed=ref_seed)
    resumed = make_trainer(make_model, tokenizer, datasets_, make_args, ref, n=4, **{**settings, **changes})
    counter.calls = 0
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    return resumed, counter.calls


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"priority_warmup_ratio": 0.5}, "priority_warmup_ratio"),
        ({"priority_granularity": "word"}, "priority_granularity"),
        ({"priority_pooling": "mean"}, "priority_pooling"),
        ({"ref_seed": 2}, "reference"),
    ],
    ids=["warmup", "granularity", "pooling", "reference"],
)
def test_a_resume_that_changes_what_phi_depends_on_is_refused(
    changes, named, make_model, tokenizer, datasets_, make_args, tmp_path
):
    """`priority.json` guarded only the method, its arguments and `negative_loss`: these resumes were accepted."""
    changes = dict(changes)
    ref_seed = changes.pop("ref_seed", 1)
    with pytest.raises(ValueError, match=rf"other priority settings \({named}") as error:
        _stopped_and_resumed(make_model, tokenizer, datasets_, make_args, tmp_path, ref_seed=ref_seed, **changes)
    assert "allow_priority_change" in str(error.value)


def test_a_resume_that_changes_the_schedule_is_refused(make_model, tokenizer, datasets_, make_args, tmp_path):
    """A `priority_schedule` added on resume was accepted (it needs a method with a numeric argument: rho1)."""
    settings = dict(num_train_epochs=2, max_steps=-1, save_strategy="steps", save_steps=2, output_dir=str(tmp_path))
    first = make_trainer(
        make_model, tokenizer, datasets_, make_args, make_model(seed=1), n=4, method="rho1", **settings
    )
    first.add_callback(StopAfter(2))
    first.train()
    schedule = {"ratio": {"start": 0.2, "end": 0.8}}
    resumed = make_trainer(
        make_model, tokenizer, datasets_, make_args, make_model(seed=1), n=4, method="rho1", priority_schedule=schedule,
        **settings,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"priority_schedule.ratio null → "):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_the_epoch_cache_of_another_reference_is_not_served(make_model, tokenizer, datasets_, make_args, tmp_path):
    """The restored epoch cache had no key: a resume with another reference (`allow_priority_change=True`) read the
    first reference's values for every token of epoch 2, and never ran its own reference."""
    same, forwards = _stopped_and_resumed(make_model, tokenizer, datasets_, make_args, tmp_path / "same")
    assert forwards == 0  # the same reference: every value of epoch 2 restored from the checkpoint
    other, forwards = _stopped_and_resumed(
        make_model, tokenizer, datasets_, make_args, tmp_path / "other", ref_seed=2, allow_priority_change=True
    )
    assert forwards == 2  # another reference: its own values, computed again


def test_evaluation_reads_no_training_history(make_model, tokenizer, datasets_, make_args):
    """`t3s` keys its history by example index: evaluation example i was given training example i's history (its
    anchors decided, so Φ = 0 on tokens it never trained on). Evaluated with the history or with an empty one, the
    evaluation loss must be the same, and the history unchanged."""
    from trl_priority import PrioritySFTTrainer
    from trl_priority.statistics.state import TokenState

    rows = datasets_.prompt_completion(8)
    args = make_args(priority="t3s", priority_args={"threshold": -1e9}, max_steps=4, eval_strategy="no")
    trainer = PrioritySFTTrainer(
        model=make_model(), args=args, train_dataset=rows.select(range(4)), eval_dataset=rows.select(range(4, 8)),
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    history = trainer.priority_state.state_dict()
    assert any(key.startswith("anchor/") and (row == 1).any() for key, row in history.items())  # anchors decided
    with_history = trainer.evaluate()["eval_loss"]
    assert trainer.priority_state.state_dict().keys() == history.keys()
    trainer.priority_state = TokenState()
    without = trainer.evaluate()["eval_loss"]
    assert with_history == pytest.approx(without, rel=1e-6)


def test_the_epoch_cache_refuses_a_schedule_on_a_statistic_hyperparameter(make_model, tokenizer, datasets_, make_args):
    """EAFT on the reference's top-k entropy with `k` scheduled: epoch 1's values (computed with k = 5) were served in
    epoch 2 (when k had moved). `ref_cache_dir` refused it; the epoch cache accepted it."""
    settings = dict(
        method="eaft", priority_args={"signal": "reference"}, priority_schedule={"k": {"start": 5, "end": 2}},
        num_train_epochs=2, max_steps=-1,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"moves \['k'\].*ref_epoch_cache='none'"):
        make_trainer(make_model, tokenizer, datasets_, make_args, make_model(seed=1), **settings)
    trainer = make_trainer(
        make_model, tokenizer, datasets_, make_args, make_model(seed=1), ref_epoch_cache="none", **settings
    )
    assert trainer._epoch_cache is None
