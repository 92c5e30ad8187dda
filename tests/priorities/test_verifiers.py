"""Checkers (`trl_priority.priorities.verifiers`): the arithmetic checker on hand-marked GSM8K solutions, and the registry."""

from __future__ import annotations

import json
import re
from importlib.resources import files

import pytest

from trl_priority.priorities.verifiers import CHECKERS, arithmetic, check, register_checker, verdict_spans


def gsm8k(limit: int | None = None) -> list[str]:
    """The worked solutions shipped with the package (GSM8K train, first 256 problems)."""
    lines = (files("trl_priority") / "assets" / "gsm8k_train_256.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["answer"] for line in lines if line.strip()][:limit]


def marked(text: str, spans, verdict: str) -> list[str]:
    return [text[start:end] for start, end, v in spans if v == verdict]


def at(text: str, needle: str, offset: int, length: int) -> tuple[int, int]:
    """The span of `length` characters starting `offset` characters into the first `needle` of `text`."""
    start = text.index(needle) + offset
    return start, start + length


NATALIA = gsm8k(1)[0]


def test_the_shipped_first_solution_is_what_the_hand_marks_below_assume():
    assert NATALIA == (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
        "#### 72"
    )


def test_a_correct_solution_is_verified_step_by_step():
    spans = arithmetic(NATALIA)
    expected = [
        (*at(NATALIA, "=24>>", 1, 2), "verified"),  # the result inside the annotation
        (*at(NATALIA, ">>24 ", 2, 2), "verified"),  # and shown after it
        (*at(NATALIA, "=72>>", 1, 2), "verified"),
        (*at(NATALIA, ">>72 ", 2, 2), "verified"),
        (*at(NATALIA, "#### 72", 5, 2), "verified"),  # the final answer is the last step's value
    ]
    assert spans == expected


def test_one_corrupted_step_is_marked_exactly_at_its_result():
    corrupted = NATALIA.replace("<<48/2=24>>24", "<<48/2=25>>25")
    spans = arithmetic(corrupted)
    wrong = [(start, end) for start, end, verdict in spans if verdict == "wrong"]
    assert wrong == [at(corrupted, "=25>>", 1, 2), at(corrupted, ">>25 ", 2, 2)]
    # Each step is judged on its own: 48+24=72 is right, so the final line is too
    assert marked(corrupted, spans, "verified") == ["72", "72", "72"]


def test_a_corrupted_final_answer_is_wrong_in_the_last_step_and_the_final_line():
    corrupted = NATALIA.replace("72", "75")  # what builtin:gsm8k-noisy does: the final answer, everywhere
    spans = arithmetic(corrupted)
    wrong = [(start, end) for start, end, verdict in spans if verdict == "wrong"]
    assert wrong == [at(corrupted, "=75>>", 1, 2), at(corrupted, ">>75 ", 2, 2), at(corrupted, "#### 75", 5, 2)]
    assert marked(corrupted, spans, "verified") == ["24", "24"]


def test_plain_text_steps_with_dollars_decimals_and_x():
    weng = re.sub(r"<<[^>]*>>", "", gsm8k(2)[1])  # the solution without its calculator annotations
    assert weng == "Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10.\n#### 10"
    spans = arithmetic(weng)
    assert spans == [
        (*at(weng, "$0.2 per", 1, 3), "verified"),
        (*at(weng, "$10.", 1, 2), "verified"),
        (*at(weng, "#### 10", 5, 2), "verified"),
    ]
    corrupted = weng.replace("= $10.", "= $12.")
    spans = arithmetic(corrupted)
    assert [(s, e) for s, e, v in spans if v == "wrong"] == [at(corrupted, "$12.", 1, 2)]
    assert marked(corrupted, spans, "verified") == ["0.2", "10"]  # the final 10 is the step's true value


def test_numbers_with_commas():
    text = "The farm sells 1,200 + 300 = 1,500 eggs.\n#### 1,500"
    assert arithmetic(text) == [(29, 34, "verified"), (46, 51, "verified")]
    wrong = text.replace("1,500", "1,600")
    assert arithmetic(wrong) == [(29, 34, "wrong"), (46, 51, "wrong")]
    assert wrong[29:34] == wrong[46:51] == "1,600"


@pytest.mark.parametrize(
    "text, verdicts",
    [
        ("10 / 3 = 3.33", ["verified"]),  # rounded to the places it is written with
        ("10 / 3 = 3.3", ["verified"]),
        ("10 / 3 = 3.4", ["wrong"]),
        ("10 / 3 = 3", ["unknown"]),  # floored to whole units: not an arithmetic question
        ("(3 + 4) * 2 = 14 and 3 + 4 * 2 = 11", ["verified", "verified"]),  # precedence, parentheses
        ("5 - 7 = -2", ["verified"]),
        ("-3 + 5 = 2", ["verified"]),  # a leading minus: the sign of -3 ...
        ("He ate 5 apples - 3 + 4 = 7 in all", ["verified"]),  # ... or a dash
        ("-3 + 5 = 9", ["wrong"]),
        ("1/4 = 25%", ["unknown"]),  # a percentage result
        ("50 * 20% = 10", ["unknown"]),
        ("x = 5, so 20% of 50 = 10", []),  # no `a op b` before the `=`: not a step
        ("3 apples + 4 apples = 7 apples", []),  # words between the numbers: not a step it can read
        ("The box 3 x 4 = 12 holds it", ["verified"]),  # the x of "box" is not an operator
        ("So, (12 + 3 = 15)", ["verified"]),
        ("2 / 0 = 1", ["unknown"]),
    ],
)
def test_arithmetic_verdicts(text, verdicts):
    assert [verdict for _, _, verdict in arithmetic(text)] == verdicts


# The arithmetic errors in the 256 shipped GSM8K solutions, each checked by hand: the statement, and what is wrong
GENUINE_ERRORS = {
    167: ("So it cost 192*100=$1920", ["1920", "1920"]),  # 192 × 100 = 19200; the final answer repeats 1920
    198: ("she should run for 6/3=.5 hour", [".5"]),  # 6/3 = 2 (3/6 was meant)
    224: ("4080 + 4080 / 2 = 4000 + 2040", ["4000 + 2040"]),  # 4080 + 2040 = 6120, not 6040: 4000 is a typo
}


def test_the_shipped_solutions_are_right_but_for_three_genuine_errors():
    """The checker must not cry wolf on GSM8K's own solutions, and must find the three real slips among them."""
    solutions = gsm8k()
    verified = 0
    for index, solution in enumerate(solutions):
        spans = arithmetic(solution)
        statement, expected = GENUINE_ERRORS.get(index, ("", []))
        assert statement in solution
        assert marked(solution, spans, "wrong") == expected, (index, solution, spans)
        verified += any(verdict == "verified" for _, _, verdict in spans)
    assert verified >= 250  # the others are algebra ("4 * x + 600 = 10000"), which it leaves alone


# Corrupted solutions whose corrupted answer no step computes in a form the checker reads: in prose
# ("3950 cases - 200 cases = 3754 cases") or in algebra ("192 / 1.2 = 1.2Y / 1.2 or 165 = Y")
UNREADABLE = {184, 193}


def test_the_corrupted_solutions_of_the_noisy_dataset_are_caught():
    from trl_priority.tools.builtin import load_dataset

    for index, row in enumerate(load_dataset("builtin:gsm8k-noisy")):
        text = row["completion"][0]["content"]
        wrong = marked(text, arithmetic(text), "wrong")
        if not row["noise"]:
            assert wrong == GENUINE_ERRORS.get(index, ("", []))[1], (index, text)
        elif index in UNREADABLE:
            assert not wrong, (index, text)
        else:
            made_up = text.rsplit("####", 1)[-1].strip()
            # The made-up number is caught where it is computed; replacing every copy of the true answer also breaks
            # steps that used it (7 x 8 = 40 when 56 was corrupted to 40), and those are marked too
            assert made_up in wrong, (index, text, wrong)


def test_checkers_are_registered_by_name_and_checked():
    def sevens(text):
        return [(m.start(), m.end(), "wrong") for m in re.finditer("7", text)]

    register_checker("sevens", sevens)
    try:
        assert check("3 + 4 = 7", "sevens") == [(8, 9, "wrong")]
        assert verdict_spans("7 and 7", {"checker": "sevens"}) == [[0, 1, -1.0], [6, 7, -1.0]]
        with pytest.raises(ValueError, match="already registered"):
            register_checker("sevens", sevens)
        register_checker("sevens", lambda text: [(0, 1, "maybe")], overwrite=True)
        with pytest.raises(ValueError, match=r"Checker 'sevens' returned \(0, 1, 'maybe'\)"):
            check("7", "sevens")
    finally:
        CHECKERS.pop("sevens", None)
    with pytest.raises(ValueError, match="Unknown checker 'arithmetc'. Did you mean 'arithmetic'"):
        check("1 + 1 = 2", "arithmetc")


def test_wrong_spans_win_where_spans_overlap():
    register_checker("overlapping", lambda text: [(0, 5, "wrong"), (0, 9, "verified"), (2, 3, "unknown")])
    try:
        assert verdict_spans("anything.", {"checker": "overlapping"}) == [[2, 3, 0.0], [0, 9, 1.0], [0, 5, -1.0]]
    finally:
        CHECKERS.pop("overlapping", None)
