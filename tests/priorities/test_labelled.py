"""Data-labelled priorities (SFTKey, faithful, ignorance, verifier) against hand-computed values, and their Φ through
the trainer: labelled character spans land on exactly the tokens that overlap them, in standard and conversational
data."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from trl_priority import PriorityError, PrioritySFTTrainer, get_priority
from trl_priority.priorities.external import _key_spans, faithful, sftkey, verifier
from trl_priority.priorities.signed import ignorance
from trl_priority.priorities.verifiers import CHECKERS, register_checker


MASK = torch.tensor([[True, True, True, True, False], [False, True, True, True, True]])


# ----------------------------------------------------------------------------------------------------------------
# By hand
# ----------------------------------------------------------------------------------------------------------------
def test_sftkey_is_sft_then_the_key_tokens():
    key = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])  # the second row has no marker
    stage_one = sftkey(key, torch.tensor(0.49), MASK, key_from=0.5)
    assert stage_one.tolist() == MASK.float().tolist()
    stage_two = sftkey(key, torch.tensor(0.5), MASK, key_from=0.5)
    assert stage_two.tolist() == [[0.0, 0.0, 1.0, 1.0, 0.0], [0.0] * 5]
    assert sftkey(key, torch.tensor(0.0), MASK, key_from=0.0).tolist() == stage_two.tolist()  # stage 2 alone


def test_the_key_portion_runs_from_the_last_marker_to_the_end():
    text = "12 + 5 = 17. Check: #### no.\n#### 17<|im_end|>"
    start = text.rindex("####")
    assert _key_spans(text, {"marker": "####", "include_marker": True}) == [[start, len(text)]]
    assert _key_spans(text, {"marker": "####", "include_marker": False}) == [[start + 4, len(text)]]
    tagged = "<Thinking>12 + 5 = 17</Thinking><Answer>17</Answer>"
    assert _key_spans(tagged, {"marker": "<Answer>", "include_marker": True}) == [[32, len(tagged)]]
    assert _key_spans("no answer line", {"marker": "####"}) == []


def test_faithful_masks_or_down_weights_the_labelled_spans():
    nonfactual = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0, 0.0]])
    assert faithful(nonfactual, MASK).tolist() == [[1.0, 0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0, 1.0]]
    phi = faithful(nonfactual, MASK, nonfactual_weight=0.25)
    assert phi.tolist() == [[1.0, 0.25, 0.25, 1.0, 0.0], [0.0, 1.0, 1.0, 0.25, 1.0]]


def test_ignorance_unlearns_the_made_up_spans():
    made_up = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert ignorance(made_up, MASK).tolist() == [[1.0, -1.0, -1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0, 1.0]]
    assert ignorance(made_up, MASK, weight=0.3)[0, 1].item() == pytest.approx(-0.3)
    assert get_priority("ignorance").signed


def test_verifier_weights_each_verdict():
    verdict = torch.tensor([[1.0, -1.0, 0.0, 1.0, -1.0], [0.0, 0.0, -1.0, 1.0, 1.0]])  # verified 1, wrong −1
    assert verifier(verdict, MASK).tolist() == [[1.0, 0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0, 1.0]]
    phi = verifier(verdict, MASK, wrong_weight=-0.5, verified_weight=2.0, unknown_weight=0.0)
    assert phi.tolist() == [[2.0, -0.5, 0.0, 2.0, 0.0], [0.0, 0.0, -0.5, 2.0, 2.0]]


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("verifier", {"checker": "arithmetc"}, "Unknown checker 'arithmetc'. Did you mean 'arithmetic'"),
        ("verifier", {"wrong_weight": -2.0}, r"wrong_weight=-2.0 is outside \[-1, 1\]"),
        ("sftkey", {"marker": ""}, "`marker` is empty"),
        ("sftkey", {"key_from": 1.5}, "key_from=1.5 is outside"),
        ("faithful", {"nonfactual_weight": 2.0}, "nonfactual_weight=2.0 is outside"),
        ("ignorance", {"weight": -1.0}, "weight=-1.0 is outside"),
    ],
)
def test_bad_settings_fail_when_the_config_is_made(name, args, message, make_args):
    with pytest.raises(PriorityError, match=message):
        make_args(priority=name, priority_args=args)


# ----------------------------------------------------------------------------------------------------------------
# Through the trainer: spans on the right tokens
# ----------------------------------------------------------------------------------------------------------------
def token_phi(trainer, index: int = 0) -> list[tuple[str, float]]:
    """(token text, Φ) for every supervised target token of one prepared example, in order."""
    row = trainer.train_dataset[index]
    phi = trainer.token_priorities(trainer.train_dataset.select([index]))[0]
    tokenizer = trainer.processing_class
    ids, labels = row["input_ids"], row["labels"]
    return [(tokenizer.decode([ids[t]]), phi[t - 1].item()) for t in range(1, len(ids)) if labels[t] != -100]


def completion_offsets(pieces: list[str]) -> list[tuple[int, int]]:
    """Character span of each completion token in the completion text: the pieces laid end to end."""
    spans, at = [], 0
    for piece in pieces:
        spans.append((at, at + len(piece)))
        at += len(piece)
    return spans


def dataset_of(kind: str, completion: str, **columns) -> Dataset:
    if kind == "conversational":
        data = {
            "prompt": [[{"role": "user", "content": "Total?"}]],
            "completion": [[{"role": "assistant", "content": completion}]],
        }
    else:
        data = {"prompt": ["Total? "], "completion": [completion]}
    return Dataset.from_dict({**data, **{name: [value] for name, value in columns.items()}})


def make_trainer(make_model, tokenizer, make_args, dataset, priority, **args):
    config = make_args(priority=priority, priority_args=args or None, max_length=256)
    return PrioritySFTTrainer(model=make_model(), args=config, train_dataset=dataset, processing_class=tokenizer)


def expected_from_spans(pieces, spans, inside, outside=1.0):
    """Φ of each completion token by a naive loop: `inside` when it overlaps a labelled span, else `outside`."""
    offsets = completion_offsets(pieces)
    return [inside if any(start < end_of_token and start_of_token < end for start, end in spans) else outside
            for start_of_token, end_of_token in offsets]  # fmt: skip


SOLUTION = "3 + 4 = 7 apples.\n#### 7"


@pytest.mark.parametrize("kind", ["standard", "conversational"])
def test_sftkey_keeps_the_answer_line_and_switches_stage(kind, make_model, tokenizer, make_args):
    trainer = make_trainer(make_model, tokenizer, make_args, dataset_of(kind, SOLUTION), "sftkey", key_from=0.0)
    tokens = token_phi(trainer)
    kept = "".join(piece for piece, phi in tokens if phi == 1.0)
    assert kept.replace("<|im_end|>", "").strip() == "#### 7"  # the marker, the answer, and the end of the turn
    assert tokens[-1][1] == 1.0  # the last supervised token (the end of the completion) is part of the Key
    assert all(phi in (0.0, 1.0) for _, phi in tokens)
    stage_one = make_trainer(make_model, tokenizer, make_args, dataset_of(kind, SOLUTION), "sftkey", key_from=0.5)
    assert all(phi == 1.0 for _, phi in token_phi(stage_one))  # progress 0: plain SFT


def test_sftkey_switches_during_training(make_model, tokenizer, datasets_, make_args):
    config = make_args(priority="sftkey", priority_args={"key_from": 0.5}, max_steps=2)
    trainer = PrioritySFTTrainer(
        model=make_model(), args=config, train_dataset=datasets_.conversational_prompt_completion(4),
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    kept = [log["priority/kept_fraction"] for log in trainer.state.log_history if "loss" in log]
    assert kept[0] == 1.0 and 0 < kept[1] < 0.5  # step 0 trains everything, step 1 (progress 0.5) the answers


def test_sftkey_reads_given_spans_before_the_marker(make_model, tokenizer, make_args):
    """A `key_spans` column overrides the marker where it is given (here: the first equation)."""
    dataset = Dataset.from_dict(
        {"prompt": ["Total? ", "Total? "], "completion": [SOLUTION, SOLUTION], "key_spans": [[[0, 9]], None]}
    )
    trainer = make_trainer(make_model, tokenizer, make_args, dataset, "sftkey", key_from=0.0)
    given = "".join(piece for piece, phi in token_phi(trainer, 0) if phi == 1.0)
    found = "".join(piece for piece, phi in token_phi(trainer, 1) if phi == 1.0)
    assert given.strip() == "3 + 4 = 7"
    assert found.replace("<|im_end|>", "").strip() == "#### 7"


@pytest.mark.parametrize("kind", ["standard", "conversational"])
@pytest.mark.parametrize("weight", [0.0, 0.25])
def test_faithful_spans_land_on_the_overlapping_tokens(kind, weight, make_model, tokenizer, make_args):
    spans = [[8, 9], [23, 24]]  # the two 7s: "= 7 apples" and "#### 7"
    assert [SOLUTION[s:e] for s, e in spans] == ["7", "7"]
    dataset = dataset_of(kind, SOLUTION, nonfactual=spans)
    trainer = make_trainer(make_model, tokenizer, make_args, dataset, "faithful", nonfactual_weight=weight)
    tokens = token_phi(trainer)
    expected = expected_from_spans([piece for piece, _ in tokens], spans, weight)
    assert [phi for _, phi in tokens] == pytest.approx(expected)
    assert "".join(p for p, phi in tokens if phi == pytest.approx(weight)).count("7") == 2  # both 7s, no other


def test_ignorance_unlearns_the_made_up_tokens_in_the_loss(make_model, tokenizer, make_args, label_logps):
    from trl_priority.objectives import unlikelihood

    spans = [[23, 24]]  # the final answer is made up
    dataset = dataset_of("conversational", SOLUTION, made_up=spans)
    trainer = make_trainer(make_model, tokenizer, make_args, dataset, "ignorance")
    tokens = token_phi(trainer)
    assert [phi for _, phi in tokens] == expected_from_spans([piece for piece, _ in tokens], spans, -1.0)
    batch = trainer.data_collator(list(trainer.train_dataset))
    phi = trainer.token_priorities(dict(batch))
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(dict(batch)))
    logps = label_logps(trainer.model, batch)  # (B, T-1), full logits
    mask = batch["labels"][:, 1:] != -100
    expected = torch.where(phi > 0, -logps, 0.0) + torch.where(phi < 0, unlikelihood(logps), 0.0)
    torch.testing.assert_close(loss.detach(), expected.sum() / mask.sum(), rtol=1e-5, atol=1e-7)


def test_a_whole_made_up_answer_leaves_the_end_of_turn_learned(make_model, tokenizer, make_args):
    dataset = dataset_of("conversational", SOLUTION, made_up=[[0, len(SOLUTION)]])
    tokens = token_phi(make_trainer(make_model, tokenizer, make_args, dataset, "ignorance"))
    assert "".join(p for p, phi in tokens if phi < 0) == SOLUTION
    learned = "".join(p for p, phi in tokens if phi == 1.0)
    assert learned.startswith("<|im_end|>")


GSM8K_CORRUPTED = (
    "Natalia sold 48/2 = <<48/2=25>>25 clips in May.\n"  # hand-corrupted: 48/2 is 24
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)


@pytest.mark.parametrize("kind", ["standard", "conversational"])
def test_verifier_marks_the_wrong_result_tokens(kind, make_model, tokenizer, make_args):
    wrong = [[27, 29], [31, 33]]  # the 25 in the annotation and the 25 shown after it
    assert [GSM8K_CORRUPTED[s:e] for s, e in wrong] == ["25", "25"]
    dataset = dataset_of(kind, GSM8K_CORRUPTED)
    trainer = make_trainer(make_model, tokenizer, make_args, dataset, "verifier", wrong_weight=-0.5)
    tokens = token_phi(trainer)
    assert [phi for _, phi in tokens] == expected_from_spans([piece for piece, _ in tokens], wrong, -0.5)
    # Only what was verified: the three 72s (the last step's result, shown again, and the final answer)
    verified = [[i, i + 2] for i in (GSM8K_CORRUPTED.index("=72>>") + 1, GSM8K_CORRUPTED.index(">>72") + 2)]
    verified.append([GSM8K_CORRUPTED.index("#### 72") + 5, len(GSM8K_CORRUPTED)])
    assert [GSM8K_CORRUPTED[s:e] for s, e in verified] == ["72", "72", "72"]
    only_verified = make_trainer(make_model, tokenizer, make_args, dataset, "verifier", unknown_weight=0.0)
    tokens = token_phi(only_verified)
    assert [phi for _, phi in tokens] == expected_from_spans([p for p, _ in tokens], verified, 1.0, outside=0.0)


def test_verifier_runs_a_registered_checker(make_model, tokenizer, make_args):
    register_checker("no_sevens", lambda text: [(i, i + 1, "wrong") for i, ch in enumerate(text) if ch == "7"])
    try:
        dataset = dataset_of("standard", SOLUTION)
        trainer = make_trainer(make_model, tokenizer, make_args, dataset, "verifier", checker="no_sevens")
        tokens = token_phi(trainer)
        assert [phi for _, phi in tokens] == expected_from_spans([p for p, _ in tokens], [[8, 9], [23, 24]], 0.0)
    finally:
        CHECKERS.pop("no_sevens", None)


# ----------------------------------------------------------------------------------------------------------------
# The built-in labelled data
# ----------------------------------------------------------------------------------------------------------------
def test_builtin_noisy_spans_mark_exactly_what_the_corruption_changed():
    from trl_priority.tools import builtin

    clean = builtin.load_dataset("builtin:gsm8k")
    labelled = builtin.load_dataset("builtin:gsm8k-noisy-spans")
    assert labelled["noise"] == builtin.load_dataset("builtin:gsm8k-noisy")["noise"]
    for before, after in zip(clean, labelled):
        text = after["completion"][0]["content"]
        spans = after["nonfactual"]
        assert after["made_up"] == spans
        assert bool(spans) == (after["noise"] == 1.0)
        if not spans:
            assert text == before["completion"][0]["content"]
            continue
        final = before["completion"][0]["content"].rsplit("####", 1)[-1].strip()
        wrong = text.rsplit("####", 1)[-1].strip()
        assert {text[s:e] for s, e in spans} == {wrong}
        # Putting the right answer back into the marked spans gives the clean solution, character for character
        restored, at = "", 0
        for s, e in spans:
            restored += text[at:s] + final
            at = e
        assert restored + text[at:] == before["completion"][0]["content"]
