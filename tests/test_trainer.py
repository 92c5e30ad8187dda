"""PrioritySFTTrainer end to end on a tiny model: exactness against TRL, accumulation, learning, errors, metrics."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from peft import LoraConfig
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from trl_priority import PriorityError, PrioritySFTTrainer, available_priorities, get_priority


class GradientRecorder(TrainerCallback):
    """Keeps a copy of every parameter gradient just before each optimizer step (after clipping)."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def train(trainer_cls, args, model, dataset, tokenizer, **kwargs):
    recorder = GradientRecorder()
    trainer = trainer_cls(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[recorder], **kwargs
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return trainer, losses, recorder.steps


def sft_config(priority_args, **overrides) -> SFTConfig:
    """A plain TRL SFTConfig with the same settings as a PrioritySFTConfig."""
    values = {f.name: getattr(priority_args, f.name) for f in dataclasses.fields(SFTConfig) if f.init}
    return SFTConfig(**{**values, **overrides})


# Methods that need something beyond the defaults to have signal on an untrained tiny model
TEST_ARGS = {"profit": {"tau": 0.001}}


def extra_kwargs(method, make_model):
    return {"ref_model": make_model(seed=1)} if get_priority(method).reference == "explicit" else {}


@pytest.mark.parametrize("method", [None, "sft"])
def test_sft_and_unset_priority_reproduce_sft_trainer_exactly(method, make_model, tokenizer, datasets_, make_args):
    dataset = datasets_.prompt_completion(8)
    args = make_args(priority=method, max_steps=3)
    _, expected_losses, expected_grads = train(SFTTrainer, sft_config(args), make_model(), dataset, tokenizer)
    trainer, losses, grads = train(PrioritySFTTrainer, args, make_model(), dataset, tokenizer)

    assert losses == expected_losses  # bitwise, not approximately
    assert len(grads) == len(expected_grads) == 3
    for step, expected in zip(grads, expected_grads):
        assert step.keys() == expected.keys()
        for name in expected:
            assert torch.equal(step[name], expected[name]), name


def test_dft_matches_trl_loss_type_dft_exactly(make_model, tokenizer, datasets_, make_args):
    dataset = datasets_.conversational_prompt_completion(8)
    args = make_args(priority="dft", max_steps=3)
    trl_args = sft_config(args, loss_type="dft")
    _, expected_losses, expected_grads = train(SFTTrainer, trl_args, make_model(), dataset, tokenizer)
    _, losses, grads = train(PrioritySFTTrainer, args, make_model(), dataset, tokenizer)

    assert losses == expected_losses
    for step, expected in zip(grads, expected_grads):
        for name in expected:
            assert torch.equal(step[name], expected[name]), name


@pytest.mark.parametrize("method", ["sft", "dft", "prift_prob"])
@pytest.mark.parametrize("lora", [False, True])
def test_gradient_accumulation_matches_a_larger_batch(method, lora, make_model, tokenizer, datasets_, make_args):
    dataset = datasets_.prompt_completion(4)
    peft = {"peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])} if lora else {}
    accumulated = make_args(priority=method, max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    single = make_args(priority=method, max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    _, losses_ga, grads_ga = train(PrioritySFTTrainer, accumulated, make_model(), dataset, tokenizer, **peft)
    _, losses_one, grads_one = train(PrioritySFTTrainer, single, make_model(), dataset, tokenizer, **peft)

    assert losses_ga == pytest.approx(losses_one, rel=1e-5)
    assert grads_ga[0].keys() == grads_one[0].keys()
    for name in grads_one[0]:
        torch.testing.assert_close(grads_ga[0][name], grads_one[0][name], rtol=1e-4, atol=1e-6, msg=name)


def with_every_data_column(dataset, tokenizer):
    """The dataset plus a value for every registered example-level data statistic (alternating 0 and 1), for
    every span statistic given by the data (alternating no span and the completion's first four characters), and for
    every token-level statistic the data must bring (placeholders in [0, 1], one per token of the `input_ids` the
    trainer makes from the row: the raw rows are tokenized as the trainer tokenizes them)."""
    from trl_priority.statistics import DATA_STATISTICS
    from trl_priority.tools.token_scores import tokenize_like_trainer

    tokenized = None
    for spec in DATA_STATISTICS.values():
        if spec.generated or spec.column in dataset.column_names:
            continue
        if spec.level == "example":
            dataset = dataset.add_column(spec.column, [float(i % 2) for i in range(len(dataset))])
        elif spec.level == "span":
            dataset = dataset.add_column(spec.column, [[[0, 4]] if i % 2 else [] for i in range(len(dataset))])
        else:
            if tokenized is None:
                tokenized = tokenize_like_trainer(dataset, tokenizer)
            if spec.column not in tokenized.column_names:  # not one that the tokenization makes (completion_mask)
                lengths = [len(ids) for ids in tokenized["input_ids"]]
                values = [[(i + j) % 5 / 4 for j in range(n)] for i, n in enumerate(lengths)]
                dataset = dataset.add_column(spec.column, values)
    return dataset


# Methods that read a vision-language model's attention to the image (PAINT) are checked on a VLM in test_multimodal
TEXT_METHODS = [m for m in available_priorities() if "image_attention" not in get_priority(m).all_statistics]


@pytest.mark.parametrize("method", TEXT_METHODS)
@pytest.mark.parametrize("lora", [False, True])
def test_every_method_loss_is_its_objective_on_the_full_logits(
    method, lora, make_model, tokenizer, datasets_, make_args, label_logps
):
    """For every registered method: the loss the trainer optimises equals the objective written from its definition,
    [Σ_{Φ≥0} Φ·(−log p) + Σ_{Φ<0} |Φ|·U(p)] / N plus its declared terms, with log p from the model's own full logits
    (not the fused head the trainer uses) and Φ as `token_priorities` reports it; and it carries a gradient."""
    from trl_priority.objectives import unlikelihood

    dataset = with_every_data_column(datasets_.prompt_completion(4), tokenizer)
    peft = {"peft_config": LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")} if lora else {}
    args = make_args(priority=method, priority_args=TEST_ARGS.get(method), per_device_train_batch_size=4)
    trainer = PrioritySFTTrainer(
        model=make_model(),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        **peft,
        **extra_kwargs(method, make_model),
    )
    batch = trainer.data_collator(list(trainer.train_dataset))
    phi = trainer.token_priorities(dict(batch))
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(dict(batch)))
    loss.backward()

    logps = label_logps(trainer.model, batch)  # (B, T-1) from the full logits
    mask = batch["labels"][:, 1:] != -100
    positive = torch.where(phi > 0, phi * -logps, 0.0)
    negative = torch.where(phi < 0, -phi * unlikelihood(logps), 0.0)
    expected = (positive + negative).sum() / mask.sum()
    # U on the negatives is computed in the LM-head pass and logged as `loss/unlikelihood`: it is checked against the
    # full-logit value here, not added twice
    metrics = trainer._metrics["train"]
    terms = [name for name in metrics if name.startswith("loss/") and name != "loss/unlikelihood"]
    expected = expected + sum(metrics[name][-1] for name in terms)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)
    if "loss/unlikelihood" in metrics:
        assert metrics["loss/unlikelihood"][-1] == pytest.approx(
            (negative.sum() / mask.sum()).item(), rel=1e-4, abs=1e-7
        )
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.parameters())


def test_all_zero_priority_gives_a_finite_zero_loss_and_no_update(make_model, tokenizer, datasets_, make_args):
    # ProFit keeps p > tau: with tau = 1 no token is ever kept
    args = make_args(priority="profit", priority_args={"tau": 1.0}, max_steps=2)
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer, losses, grads = train(PrioritySFTTrainer, args, model, datasets_.prompt_completion(4), tokenizer)

    assert losses == [0.0, 0.0]
    assert all(torch.count_nonzero(g) == 0 for step in grads for g in step.values())
    # AdamW without gradient signal and without weight decay leaves every weight where it was
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert logs[0]["priority/kept_fraction"] == 0.0 and logs[0]["priority/effective_tokens"] == 0.0


def test_non_finite_priority_is_an_error_naming_the_method(make_model, tokenizer, datasets_, make_args):
    def exploding_priority(logps, mask):
        return torch.where(logps < -1, torch.inf, 1.0) * mask

    args = make_args(priority=exploding_priority)
    trainer = PrioritySFTTrainer(
        model=make_model(), args=args, train_dataset=datasets_.prompt_completion(4), processing_class=tokenizer
    )
    with pytest.raises(PriorityError, match="exploding_priority.*non-finite"):
        trainer.train()


def test_metrics_are_logged_and_match_phi(make_model, tokenizer, datasets_, make_args):
    dataset = datasets_.prompt_completion(4)
    args = make_args(priority="profit", priority_args={"tau": 0.0031}, max_steps=1, per_device_train_batch_size=4)
    trainer = PrioritySFTTrainer(model=make_model(), args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    phi = trainer.token_priorities(batch)
    mask = batch["labels"][:, 1:] != -100
    trainer.train()
    log = next(log for log in trainer.state.log_history if "loss" in log)

    assert set(phi.unique().tolist()) <= {0.0, 1.0}
    assert 0 < log["priority/kept_fraction"] < 1  # the threshold splits the tokens of an untrained model
    assert log["priority/kept_fraction"] == pytest.approx((phi[mask] > 0).float().mean().item())
    assert log["priority/mean"] == pytest.approx(phi[mask].mean().item())
    assert log["priority/effective_tokens"] == pytest.approx(phi.abs().sum().item())
    assert log["priority/negative_fraction"] == 0.0
    for key in ("entropy", "mean_token_accuracy", "num_tokens", "nll"):
        assert key in log


def test_token_priorities_layout_and_input_forms(label_logps, make_model, tokenizer, datasets_, make_args):
    args = make_args(priority="dft")
    trainer = PrioritySFTTrainer(
        model=make_model(), args=args, train_dataset=datasets_.prompt_completion(4), processing_class=tokenizer
    )
    rows = trainer.train_dataset.select(range(3))
    batch = trainer.data_collator(list(rows))
    phi = trainer.token_priorities(batch)

    assert phi.shape == (3, batch["input_ids"].shape[1] - 1)
    assert not phi.requires_grad
    mask = batch["labels"][:, 1:] != -100
    assert torch.all(phi[~mask] == 0) and torch.all(phi[mask] > 0)
    # Φ_t = p(labels[:, t + 1]): recompute from the full logits of the same model
    expected = label_logps(trainer.model, batch).exp() * mask
    torch.testing.assert_close(phi, expected, rtol=1e-5, atol=1e-6)
    # Dataset rows and a list of rows give the same Φ as the collated batch
    torch.testing.assert_close(trainer.token_priorities(rows), phi)
    torch.testing.assert_close(trainer.token_priorities(list(rows)), phi)


@pytest.mark.parametrize("dataset_kind", ["text", "messages", "conversational_prompt_completion"])
def test_dataset_formats_train(dataset_kind, make_model, tokenizer, datasets_, make_args):
    args = make_args(priority="dft", assistant_only_loss=dataset_kind == "messages")
    trainer = PrioritySFTTrainer(
        model=make_model(), args=args, train_dataset=getattr(datasets_, dataset_kind)(4), processing_class=tokenizer
    )
    trainer.train()
    assert all(math.isfinite(log["loss"]) for log in trainer.state.log_history if "loss" in log)


def test_packing_and_padding_free_train(make_model, tokenizer, datasets_, make_args):
    args = make_args(priority="prift_prob", packing=True, max_length=64)
    trainer = PrioritySFTTrainer(
        model=make_model(), args=args, train_dataset=datasets_.prompt_completion(8), processing_class=tokenizer
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert "position_ids" in batch and batch["input_ids"].shape[0] == 1  # padding-free: one packed row
    trainer.train()
    assert all(math.isfinite(log["loss"]) for log in trainer.state.log_history if "loss" in log)


def test_incompatible_settings_fail_before_training(make_model, tokenizer, datasets_, make_args):
    dataset = datasets_.prompt_completion(4)
    with pytest.raises(ValueError, match="compute_loss_func"):
        PrioritySFTTrainer(
            model=make_model(),
            args=make_args(priority="dft"),
            train_dataset=dataset,
            processing_class=tokenizer,
            compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.loss,
        )


@pytest.mark.parametrize(
    "method", ["eaft", "prift_mass"]
)  # distribution statistics, from the policy and the reference
@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_losses(method, lora, make_model, tokenizer, datasets_, make_args):
    # TRL turns gradient checkpointing on by default; the hidden-state capture and the reference must not care
    peft = {"peft_config": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")} if lora else {}
    runs = []
    for checkpointing in (True, False):
        args = make_args(priority=method, gradient_checkpointing=checkpointing, max_steps=2)
        _, losses, _ = train(PrioritySFTTrainer, args, make_model(), datasets_.prompt_completion(4), tokenizer, **peft)
        runs.append(losses)
    assert runs[0] == pytest.approx(runs[1], rel=1e-6)


def test_metrics_reach_tensorboard_and_checkpoints_resume(tmp_path, make_model, tokenizer, datasets_, make_args):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = make_args(
        priority="prift_prob",
        max_steps=4,
        report_to="tensorboard",
        save_strategy="steps",
        save_steps=2,
    )
    dataset = datasets_.prompt_completion(8)
    trainer = PrioritySFTTrainer(model=make_model(), args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/priority/mean", "train/priority/kept_fraction", "train/nll", "train/loss"} <= tags
    assert len(events.Scalars("train/priority/effective_tokens")) == 4

    # A checkpoint written mid-run resumes to the same final loss
    resumed = PrioritySFTTrainer(model=make_model(), args=args, train_dataset=dataset, processing_class=tokenizer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    final = [log["loss"] for log in trainer.state.log_history if "loss" in log][-1]
    assert [log["loss"] for log in resumed.state.log_history if "loss" in log][-1] == pytest.approx(final, rel=1e-5)


class RecordingTrainer(PrioritySFTTrainer):
    """Keeps Φ of every training micro-batch, on the supervised tokens, in order."""

    def _priority_of(self, statistics, selected=None, whole_step=False):
        phi = super()._priority_of(statistics, selected, whole_step)
        if self.model.training:
            self.recorded.append(phi[statistics["mask"]].clone())
        return phi


def rho1_run(make_model, tokenizer, dataset, make_args, scope, batch, accumulation):
    args = make_args(
        priority="rho1",
        priority_args={"ratio": 0.3, "scope": scope},
        max_steps=1,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
    )
    reference = make_model(seed=1)
    trainer = RecordingTrainer(
        model=make_model(), args=args, train_dataset=dataset, processing_class=tokenizer, ref_model=reference
    )
    trainer.recorded = []
    scoring_passes = []
    score_ahead = trainer._select_over_step
    trainer._select_over_step = lambda batches: scoring_passes.append(len(batches)) or score_ahead(batches)
    trainer.train()
    return torch.cat(trainer.recorded), scoring_passes


def test_rho1_step_selection_does_not_depend_on_accumulation(make_model, tokenizer, datasets_, make_args):
    dataset = datasets_.prompt_completion(4)  # examples of different lengths: the micro-batches pad differently
    one_batch, passes_one = rho1_run(make_model, tokenizer, dataset, make_args, "step", batch=4, accumulation=1)
    accumulated, passes_ga = rho1_run(make_model, tokenizer, dataset, make_args, "step", batch=2, accumulation=2)
    per_micro_batch, _ = rho1_run(make_model, tokenizer, dataset, make_args, "micro_batch", batch=2, accumulation=2)

    # A step of one micro-batch selects in its training forward; two are scored ahead, both at once
    assert passes_one == [] and passes_ga == [2]
    assert torch.equal(accumulated, one_batch)  # 2 accumulation steps of 2 select exactly what a batch of 4 does
    assert one_batch.sum() == int(0.3 * one_batch.numel() + 0.5)
    # Selecting within each micro-batch instead keeps round(0.3 n) of each half: another set, so the test can fail
    assert not torch.equal(per_micro_batch, one_batch)


@pytest.mark.parametrize("lora", [False, True])
def test_dft_on_the_reference_signal_is_prift_prob_to_the_bit(lora, make_model, tokenizer, datasets_, make_args):
    """PriFT's finding as a switch: `dft` with `signal="reference"` weights by the frozen starting model's probability,
    which is exactly `prift_prob`."""
    dataset = datasets_.prompt_completion(8)
    peft = {"peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])} if lora else {}
    switched = make_args(priority="dft", priority_args={"signal": "reference"}, max_steps=3)
    trainer_a, losses_a, grads_a = train(PrioritySFTTrainer, switched, make_model(), dataset, tokenizer, **peft)
    trainer_b, losses_b, grads_b = train(
        PrioritySFTTrainer, make_args(priority="prift_prob", max_steps=3), make_model(), dataset, tokenizer, **peft
    )
    assert trainer_a.reference is not None and trainer_a.reference.description == trainer_b.reference.description
    assert losses_a == losses_b
    for step_a, step_b in zip(grads_a, grads_b):
        for name in step_b:
            assert torch.equal(step_a[name], step_b[name]), name
    # and it is not dft on the policy: the weights differ once the policy has moved
    batch = trainer_a.train_dataset.select(range(2))
    policy_signal = make_args(priority="dft")
    plain = PrioritySFTTrainer(
        model=trainer_a.model, args=policy_signal, train_dataset=dataset, processing_class=tokenizer
    )
    assert not torch.equal(plain.token_priorities(batch), trainer_a.token_priorities(batch))


def test_signal_switch_reads_the_reference_statistic(make_model, tokenizer, datasets_, make_args):
    priority = get_priority("eaft")
    args = priority.resolve_args({"signal": "reference"})
    assert priority.statistics_from("reference", args) == ("ref_topk_entropy",)
    assert priority.statistics_from("policy", args) == ()
    assert priority.reference_used(args) and not priority.reference_used(priority.resolve_args({}))
    with pytest.raises(PriorityError, match="signal='teacher' is not one of"):
        priority.resolve_args({"signal": "teacher"})
