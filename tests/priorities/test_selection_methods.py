"""ssToken and Token Cleaning: hand-computed values and naive rank loops written from the papers' equations, the
per-example selection against a loop over examples, and both methods through `PrioritySFTTrainer`."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from tests.conftest import naive_kept_count, naive_top, naive_top_fraction, phi_of
from trl_priority import PrioritySFTTrainer, get_priority
from trl_priority.priorities.reference import cleaning_influence, retrospective_excess_loss
from trl_priority.priorities.selection import select_in_examples


# Two rows (one example each) × four positions; positions (0, 3) and (1, 0) are ignored
MASK = torch.tensor([[True, True, True, False], [False, True, True, True]])
LOGPS = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-0.1, -3.0, -1.0, -2.0]])
REF_LOGPS = torch.tensor([[-1.5, -1.0, -1.0, 0.0], [-5.0, -1.0, -2.0, -2.5]])


def naive_per_row(scores, mask, fraction) -> torch.Tensor:
    """Each row is one example: the top fraction of its own supervised tokens."""
    expected = torch.zeros(mask.shape)
    for b in range(mask.shape[0]):
        tokens = [(b, t) for t in range(mask.shape[1]) if mask[b, t]]
        for token in naive_top(scores, tokens, fraction):
            expected[token] = 1.0
    return expected


def selection_phi(method, logps, ref_logps, mask, **args):
    """Φ as the trainer forms it for one batch (`tests.conftest.phi_of`): the method's selection (per example or over
    the batch), then Φ."""
    return phi_of(method, {"logps": logps, "ref_logps": ref_logps, "mask": mask}, **args)


# ------------------------------------------------------------------------------------------------------------------
# ssToken
# ------------------------------------------------------------------------------------------------------------------
def test_sstoken_keeps_each_examples_highest_retrospective_excess_loss():
    # REL = L_his − L_θ = logps − ref_logps
    #   row 0: (0,0) = 0.5, (0,1) = −1.0, (0,2) = 0.5 | ignored (0,3) = −9.0
    #   row 1: ignored (1,0) = 4.9 | (1,1) = −2.0, (1,2) = 1.0, (1,3) = 0.5
    # data_prop 0.5 of 3 tokens per example → k = round(1.5) = 2 in each row
    phi = selection_phi("sstoken", LOGPS, REF_LOGPS, MASK, data_prop=0.5)
    assert phi.tolist() == [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]]
    # at least one per example; the tie 0.5 / 0.5 of row 0 goes to the earlier position
    assert selection_phi("sstoken", LOGPS, REF_LOGPS, MASK, data_prop=0.01).tolist() == [[1, 0, 0, 0], [0, 0, 1, 0]]
    # Over the whole batch instead: k = round(0.5 · 6) = 3, 1.0 then the two earliest 0.5
    step = selection_phi("sstoken", LOGPS, REF_LOGPS, MASK, data_prop=0.5, scope="step")
    assert step.tolist() == [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]]
    assert selection_phi("sstoken", LOGPS, REF_LOGPS, MASK, data_prop=1.0).tolist() == MASK.float().tolist()
    torch.testing.assert_close(
        retrospective_excess_loss(LOGPS, REF_LOGPS, MASK),
        torch.tensor([[0.5, -1.0, 0.5, 0.0], [0.0, -2.0, 1.0, 0.5]]),
    )


def test_sstoken_defaults_are_the_official_codes():
    assert get_priority("sstoken").resolve_args({}) == {"data_prop": 0.6, "scope": "example"}
    assert get_priority("sstoken").reference == "starting_model"  # the history model: the base before SFT


def test_sstoken_on_the_history_model_itself_keeps_each_examples_first_tokens():
    # At step 0 the policy is the history model: every REL is 0, and ties go to the earlier position
    mask = torch.tensor([[True, True, True, True, True, False], [False, False, True, True, True, True]])
    logps = -torch.rand(2, 6)
    phi = selection_phi("sstoken", logps, logps.clone(), mask, data_prop=0.6)
    # k = round(0.6 · 5) = 3 in row 0, round(0.6 · 4) = round(2.4) = 2 in row 1
    assert phi.tolist() == [[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0]]


@pytest.mark.parametrize("data_prop", [0.2, 0.5, 0.6, 0.9])
def test_sstoken_oracle_loop(data_prop):
    generator = torch.Generator().manual_seed(int(data_prop * 100))
    logps = -torch.rand(4, 9, generator=generator) * 5
    ref_logps = -torch.rand(4, 9, generator=generator) * 5
    logps[0, :5] = ref_logps[0, :5] + 0.25  # ties in REL, so the tie-break is exercised
    mask = torch.rand(4, 9, generator=generator) > 0.3
    mask[3] = False  # an example without a supervised token keeps nothing
    rel = {(b, t): logps[b, t].item() - ref_logps[b, t].item() for b in range(4) for t in range(9)}
    assert torch.equal(
        selection_phi("sstoken", logps, ref_logps, mask, data_prop=data_prop), naive_per_row(rel, mask, data_prop)
    )
    step = selection_phi("sstoken", logps, ref_logps, mask, data_prop=data_prop, scope="step")
    assert torch.equal(step, naive_top_fraction(rel, mask, data_prop))


# ------------------------------------------------------------------------------------------------------------------
# Token Cleaning
# ------------------------------------------------------------------------------------------------------------------
def test_token_cleaning_by_hand_global_and_per_sample():
    # fixed-model cleaning: policy = base, reference = tuned; Infl = L_base − L_tuned = ref_logps − logps
    #   row 0: (0,0) = −0.5, (0,1) = 1.0, (0,2) = −0.5 | row 1: (1,1) = 2.0, (1,2) = −1.0, (1,3) = −0.5
    torch.testing.assert_close(
        cleaning_influence(LOGPS, REF_LOGPS, MASK, pipeline="fixed_model"),
        torch.tensor([[-0.5, 1.0, -0.5, 0.0], [0.0, 2.0, -1.0, -0.5]]),
    )
    # global (the step): k = round(0.5 · 6) = 3: 2.0, 1.0, then the earliest of the three −0.5, (0,0)
    phi = selection_phi("token_cleaning", LOGPS, REF_LOGPS, MASK, data_prop=0.5)
    assert phi.tolist() == [[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    # sample: k = 2 in each row: row 0 keeps 1.0 and the earlier −0.5; row 1 keeps 2.0 and −0.5
    sample = selection_phi("token_cleaning", LOGPS, REF_LOGPS, MASK, data_prop=0.5, scope="example")
    assert sample.tolist() == [[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]]


def test_token_cleaning_self_evolving_swaps_the_roles():
    # Self-evolving round: the policy is the last round's model, the reference the original base, so
    # Infl = L_ref − L_θ = logps − ref_logps: fixed-model cleaning with the two models' places exchanged
    for scope in ("step", "example"):
        evolving = selection_phi("token_cleaning", LOGPS, REF_LOGPS, MASK, scope=scope, pipeline="self_evolving")
        swapped = selection_phi("token_cleaning", REF_LOGPS, LOGPS, MASK, scope=scope, pipeline="fixed_model")
        assert torch.equal(evolving, swapped)
    # ... which is ssToken's REL against the original base, per example
    evolving = selection_phi(
        "token_cleaning", LOGPS, REF_LOGPS, MASK, data_prop=0.5, scope="example", pipeline="self_evolving"
    )
    assert evolving.tolist() == [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]]


def test_token_cleaning_defaults_are_the_official_scripts():
    priority = get_priority("token_cleaning")
    assert priority.resolve_args({}) == {"data_prop": 0.6, "scope": "step", "pipeline": "fixed_model"}
    assert priority.reference == "explicit"


@pytest.mark.parametrize("data_prop", [0.3, 0.6])
@pytest.mark.parametrize("pipeline", ["fixed_model", "self_evolving"])
def test_token_cleaning_oracle_loops(data_prop, pipeline):
    generator = torch.Generator().manual_seed(7)
    logps = -torch.rand(3, 10, generator=generator) * 4
    ref_logps = -torch.rand(3, 10, generator=generator) * 4
    ref_logps[1, :4] = logps[1, :4] - 0.5  # ties
    mask = torch.rand(3, 10, generator=generator) > 0.25
    base, tuned = (logps, ref_logps) if pipeline == "fixed_model" else (ref_logps, logps)
    # Infl = L_base − L_tuned, with L = −log p
    influence = {(b, t): -base[b, t].item() + tuned[b, t].item() for b in range(3) for t in range(10)}
    args = {"data_prop": data_prop, "pipeline": pipeline}
    assert torch.equal(
        selection_phi("token_cleaning", logps, ref_logps, mask, **args), naive_top_fraction(influence, mask, data_prop)
    )
    per_sample = selection_phi("token_cleaning", logps, ref_logps, mask, scope="example", **args)
    assert torch.equal(per_sample, naive_per_row(influence, mask, data_prop))


# ------------------------------------------------------------------------------------------------------------------
# The per-example scope
# ------------------------------------------------------------------------------------------------------------------
def test_per_example_selection_in_packed_rows_matches_one_row_per_example():
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 3, 7, 1]
    scores = [torch.randn(n, generator=generator) + 10 * (i == 0) for i, n in enumerate(lengths)]
    masks = [torch.rand(n, generator=generator) > 0.2 for n in lengths]
    masks[1][:] = False  # an example without a supervised token
    # One row per example, padded
    width = max(lengths)
    padded_scores = torch.stack([torch.nn.functional.pad(s, (0, width - len(s)), value=99.0) for s in scores])
    padded_mask = torch.stack([torch.nn.functional.pad(m, (0, width - len(m))) for m in masks])
    expected = naive_per_row(
        {(b, t): padded_scores[b, t].item() for b in range(4) for t in range(width)}, padded_mask, 0.5
    )
    assert torch.equal(select_in_examples(padded_scores, padded_mask, 0.5).float(), expected)
    # The same examples packed: two rows (3 + 1 examples, then padding), the examples named by `example_index`
    packed_scores = torch.cat(scores[:3])[None], torch.cat([scores[3], torch.full((14,), 99.0)])[None]
    packed_mask = torch.cat(masks[:3])[None], torch.cat([masks[3], torch.zeros(14, dtype=torch.bool)])[None]
    index = [torch.cat([torch.full((n,), i) for i, n in enumerate(lengths[:3])])[None], torch.full((1, 15), -1)]
    index[1][0, 0] = 3
    packed = select_in_examples(torch.cat(packed_scores), torch.cat(packed_mask), 0.5, torch.cat(index))
    unpacked = [torch.cat([packed[0], packed[1]])[sum(lengths[:i]) : sum(lengths[: i + 1])] for i in range(4)]
    for i, n in enumerate(lengths):
        assert unpacked[i].float().tolist() == expected[i, :n].tolist()
    # Without `example_index` the packed row would be one example, whose high-scoring first example takes the kept
    # share of the others
    assert not torch.equal(select_in_examples(torch.cat(packed_scores), torch.cat(packed_mask), 0.5), packed)


def test_per_example_selection_edge_cases():
    scores = torch.tensor([[float("nan"), 1.0, 2.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [False, False, False]])
    assert select_in_examples(scores, mask, 0.34).tolist() == [[False, False, True], [False, False, False]]
    assert select_in_examples(scores, mask, 0.67).tolist() == [[False, True, True], [False, False, False]]  # NaN last
    assert torch.equal(select_in_examples(scores, mask, 1.0), mask)
    assert not select_in_examples(scores, torch.zeros_like(mask), 0.5).any()
    # An example cut across two rows (wrapped packing) is still one example
    index = torch.tensor([[0, 0, 0], [0, 0, 0]])
    both = torch.tensor([[True, True, False], [True, True, False]])
    scores = torch.tensor([[1.0, 4.0, 0.0], [3.0, 2.0, 0.0]])
    assert select_in_examples(scores, both, 0.5, index).tolist() == [[False, True, False], [True, False, False]]


# ------------------------------------------------------------------------------------------------------------------
# Through the trainer
# ------------------------------------------------------------------------------------------------------------------
class StatisticsRecorder(PrioritySFTTrainer):
    """Keeps, for every micro-batch Φ is computed on (training or not), Φ and the statistics it came from."""

    def _priority_of(self, statistics, selected=None, whole_step=False):
        phi = super()._priority_of(statistics, selected, whole_step)
        self.records.append(
            {
                "training": self.model.training,
                "phi": phi.clone(),
                "mask": statistics["mask"].clone(),
                "logps": statistics["logps"].clone(),
                "ref_logps": statistics["ref_logps"].clone(),
            }
        )
        return phi


def run(make_model, tokenizer, dataset, make_args, method, priority_args, batch=2, accumulation=2, steps=1, **kw):
    args = make_args(
        priority=method,
        priority_args=priority_args,
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
    )
    trainer = StatisticsRecorder(
        model=make_model(), args=args, train_dataset=dataset, processing_class=tokenizer, **kw
    )
    trainer.records = []
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return trainer, losses


def trained(records):
    return [record for record in records if record["training"]]


def test_token_cleaning_on_the_step_is_rho1_to_the_bit(make_model, tokenizer, datasets_, make_args):
    """Fixed-model cleaning online, over the step, is Rho-1's excess-loss rule: same reference, same fraction, same Φ
    and the same losses; the per-example level selects another set."""
    dataset = datasets_.prompt_completion(8)

    def cleaning(method, priority_args):
        return run(make_model, tokenizer, dataset, make_args, method, priority_args, steps=2, ref_model=make_model(1))

    rho1, rho1_losses = cleaning("rho1", {"ratio": 0.4})
    step, step_losses = cleaning("token_cleaning", {"data_prop": 0.4})
    sample, _ = cleaning("token_cleaning", {"data_prop": 0.4, "scope": "example"})
    assert step_losses == rho1_losses
    for a, b in zip(trained(rho1.records), trained(step.records), strict=True):
        assert torch.equal(a["phi"], b["phi"])
    assert not all(torch.equal(a["phi"], b["phi"]) for a, b in zip(trained(rho1.records), trained(sample.records)))


def test_per_example_selection_in_the_trainer_follows_each_examples_scores(
    make_model, tokenizer, datasets_, make_args
):
    """Token Cleaning at the sample level: in every trained micro-batch, each row (one example) keeps the top
    round(0.6 · n) of its own tokens by L_base − L_tuned, and the kept set does not depend on how the step is split."""
    dataset = datasets_.prompt_completion(4)
    settings = {"data_prop": 0.6, "scope": "example"}
    accumulated, _ = run(
        make_model, tokenizer, dataset, make_args, "token_cleaning", settings, ref_model=make_model(seed=1)
    )
    records = trained(accumulated.records)
    assert len(records) == 2
    for record in records:
        mask = record["mask"]
        influence = {
            (b, t): -record["logps"][b, t].item() + record["ref_logps"][b, t].item()  # L_θ − L_ref
            for b in range(mask.shape[0])
            for t in range(mask.shape[1])
        }
        assert torch.equal(record["phi"], naive_per_row(influence, mask, 0.6))
        assert record["phi"].sum(1).tolist() == [naive_kept_count(0.6, int(n)) for n in mask.sum(1)]
    one_batch, _ = run(
        make_model,
        tokenizer,
        dataset,
        make_args,
        "token_cleaning",
        settings,
        batch=4,
        accumulation=1,
        ref_model=make_model(seed=1),
    )

    def kept_per_example(records):
        return [row[m].tolist() for record in records for row, m in zip(record["phi"], record["mask"])]

    assert kept_per_example(records) == kept_per_example(trained(one_batch.records))


def test_per_example_selection_splits_padding_free_rows_by_example(make_model, tokenizer, datasets_, make_args):
    """Padding-free batches are one row of several examples: each example still keeps round(0.6 · n) of its own
    tokens, as in the padded batch."""
    dataset = datasets_.prompt_completion(4)
    settings = {"priority": "token_cleaning", "priority_args": {"scope": "example"}}
    padded = PrioritySFTTrainer(
        model=make_model(), args=make_args(**settings), train_dataset=dataset, processing_class=tokenizer,
        ref_model=make_model(seed=1),
    )  # fmt: skip
    free = PrioritySFTTrainer(
        model=make_model(), args=make_args(**settings, padding_free=True, max_length=None), train_dataset=dataset,
        processing_class=tokenizer, ref_model=make_model(seed=1),
    )  # fmt: skip
    rows = padded.train_dataset.select(range(4))
    phi_padded = padded.token_priorities(rows)
    batch = free.data_collator(list(free.train_dataset.select(range(4))))
    phi_free = free.token_priorities(dict(batch))
    assert phi_free.shape[0] == 1  # one flattened row

    lengths = [len(ids) for ids in rows["input_ids"]]
    mask_free = batch["labels"][0, 1:] != -100
    start = 0
    for i, n in enumerate(lengths):
        segment = slice(start, start + n - 1)  # the example's targets; the next position is the boundary
        supervised = int(mask_free[segment].sum())
        assert int(phi_free[0, segment].sum()) == naive_kept_count(0.6, supervised)
        assert int(phi_padded[i].sum()) == naive_kept_count(0.6, supervised)
        start += n
    free.train()


@pytest.mark.parametrize("lora", [False, True])
def test_sstoken_history_is_the_starting_model(lora, make_model, tokenizer, datasets_, make_args, label_logps):
    """ssToken's default history model is the model as training starts: before the first update every REL is 0 and
    each example keeps its first k tokens; after two updates the kept tokens are the top REL of each example."""
    dataset = datasets_.prompt_completion(4)
    peft = {"peft_config": LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")} if lora else {}
    trainer = StatisticsRecorder(
        model=make_model(), args=make_args(priority="sstoken", max_steps=2), train_dataset=dataset,
        processing_class=tokenizer, **peft,
    )  # fmt: skip
    trainer.records = []
    batch = trainer.data_collator(list(trainer.train_dataset.select(range(4))))
    phi = trainer.token_priorities(dict(batch))
    mask = batch["labels"][:, 1:] != -100
    # REL = 0 everywhere: the first round(0.6 · n) supervised tokens of each example
    first = torch.zeros(mask.shape)
    for b in range(mask.shape[0]):
        positions = mask[b].nonzero().flatten()[: naive_kept_count(0.6, int(mask[b].sum()))]
        first[b, positions] = 1.0
    assert torch.equal(phi, first)
    # The history model's log-probabilities are the starting model's, from its full logits
    starting = label_logps(make_model(), batch)
    torch.testing.assert_close(trainer.records[-1]["ref_logps"], starting, rtol=1e-5, atol=1e-5)

    trainer.train()
    phi = trainer.token_priorities(dict(batch))
    record = trainer.records[-1]
    rel = {
        (b, t): record["logps"][b, t].item() - record["ref_logps"][b, t].item()
        for b in range(mask.shape[0])
        for t in range(mask.shape[1])
    }
    assert torch.equal(phi, naive_per_row(rel, mask, 0.6))
    assert not torch.equal(phi, first)
    torch.testing.assert_close(record["ref_logps"], starting, rtol=1e-5, atol=1e-5)  # the history stays frozen


def test_one_self_evolving_round_is_sstoken_against_the_original_base(make_model, tokenizer, datasets_, make_args):
    """A self-evolving Token Cleaning round (policy: the last round's model, reference: the original base) at the sample
    level scores L_base − L_θ, ssToken's REL with the base as history model: the same Φ and losses."""
    dataset = datasets_.prompt_completion(4)
    base = make_model(seed=1)
    evolving, evolving_losses = run(
        make_model, tokenizer, dataset, make_args, "token_cleaning",
        {"scope": "example", "pipeline": "self_evolving"}, steps=2, ref_model=base,
    )  # fmt: skip
    history, history_losses = run(
        make_model, tokenizer, dataset, make_args, "sstoken", {}, steps=2, ref_model=make_model(seed=1)
    )
    assert evolving_losses == history_losses
    for a, b in zip(trained(evolving.records), trained(history.records), strict=True):
        assert torch.equal(a["phi"], b["phi"])


def test_token_cleaning_needs_a_trained_reference(make_model, tokenizer, datasets_, make_args):
    with pytest.raises(ValueError, match="Priority 'token_cleaning' compares the policy with a reference trained"):
        PrioritySFTTrainer(
            model=make_model(),
            args=make_args(priority="token_cleaning"),
            train_dataset=datasets_.prompt_completion(4),
            processing_class=tokenizer,
        )
