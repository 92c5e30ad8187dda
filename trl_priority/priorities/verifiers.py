"""Checkers: programs that read a completion and say which of its spans are right, wrong or undecided.

A checker is a plain function of the completion text:

    checker(completion: str) -> list of (start, end, verdict),   verdict in {"verified", "wrong", "unknown"}

with `[start, end)` character offsets into the text it was given. The `verifier` priority
(`trl_priority.priorities.external.verifier`, veridical priority, arXiv 2602.01227 appendix A.2) runs the checker
named by its hyperparameter `checker` over every completion as the model sees it (its tokens decoded, the end token
included) and weights the tokens of each span by its verdict.

```python
from trl_priority.priorities.verifiers import register_checker

def no_negative_money(text):  # a checker of your own: every "$-..." amount is wrong
    return [(m.start(), m.end(), "wrong") for m in re.finditer(r"\\$-\\d+", text)]

register_checker("no_negative_money", no_negative_money)
PrioritySFTConfig(..., priority="verifier", priority_args={"checker": "no_negative_money"})
```

One checker ships: `arithmetic`, which recomputes every `a op b = c` step of a worked solution (see `arithmetic`).
"""

from __future__ import annotations

import difflib
import numbers
import re
from collections.abc import Callable
from fractions import Fraction


VERDICTS = ("verified", "wrong", "unknown")
# How a verdict is stored per token (the `verdict` span statistic); text no span covers reads 0 = unknown.
VERDICT_CODES = {"verified": 1.0, "wrong": -1.0, "unknown": 0.0}

Checker = Callable[[str], list]
CHECKERS: dict[str, Checker] = {}


def register_checker(name: str, fn: Checker, *, overwrite: bool = False) -> Checker:
    """Make `fn(completion_text) -> [(start, end, verdict), ...]` available as `priority_args={"checker": name}`."""
    if not callable(fn):
        raise TypeError(f"Checker '{name}' must be a function of the completion text, got {type(fn).__name__}.")
    if name in CHECKERS and not overwrite:
        raise ValueError(f"A checker named '{name}' is already registered; pass `overwrite=True` to replace it.")
    CHECKERS[name] = fn
    return fn


def available_checkers() -> list[str]:
    return sorted(CHECKERS)


def unknown_checker_message(name: str) -> str | None:
    """None when `name` is a registered checker; otherwise the error to show, with the closest name."""
    if name in CHECKERS:
        return None
    close = difflib.get_close_matches(name, CHECKERS, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return (
        f"Unknown checker '{name}'.{hint} Registered checkers: {', '.join(available_checkers())}. Add your own with "
        "`trl_priority.priorities.verifiers.register_checker(name, fn)` before the config is made."
    )


def check(text: str, name: str) -> list[tuple[int, int, str]]:
    """Run the checker `name` over `text` and validate what it returns."""
    message = unknown_checker_message(name)
    if message is not None:
        raise ValueError(message)
    spans = []
    for span in CHECKERS[name](text):
        ok = isinstance(span, list | tuple) and len(span) == 3 and span[2] in VERDICTS
        ok = ok and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in span[:2])
        ok = ok and 0 <= span[0] <= span[1]
        if not ok:
            raise ValueError(
                f"Checker '{name}' returned {span!r}; a checker returns (start, end, verdict) with 0 <= start <= end "
                f"character offsets and verdict one of {list(VERDICTS)}."
            )
        spans.append((int(span[0]), int(span[1]), span[2]))
    return spans


def verdict_spans(text: str, args) -> list[list[float]]:
    """The `verdict` statistic's spans: `[start, end, code]` per checker span, wrong ones last so that a token
    touched by a wrong span reads wrong (later spans win where spans overlap)."""
    spans = check(text, args.get("checker", "arithmetic"))
    order = {"unknown": 0, "verified": 1, "wrong": 2}
    spans.sort(key=lambda span: order[span[2]])
    return [[start, end, VERDICT_CODES[verdict]] for start, end, verdict in spans]


# ------------------------------------------------------------------------------------------------------------------
# The arithmetic checker
# ------------------------------------------------------------------------------------------------------------------
NUMBER = r"\d+(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+"  # 1,200 | 12 | 0.5 | .5
_TOKEN = re.compile(rf"\s*(?:(?P<number>{NUMBER})|(?P<op>[-+*/×÷xX])|(?P<paren>[()])|(?P<skip>\$)|(?P<percent>%))")
_ANNOTATION = re.compile(r"<<([^<>]*)=([^<>=]*)>>")  # GSM8K's calculator annotation <<a*b=c>>
_RESULT = re.compile(rf"[ \t]*\$?[ \t]*(?P<value>-?(?:{NUMBER}))(?![\d])")
_SHOWN = re.compile(rf"(?:{NUMBER})(?![\d])")  # the result repeated right after an annotation
_FINAL = re.compile(rf"####\s*\$?\s*(?P<value>-?(?:{NUMBER}))")
_EXPRESSION_CHARS = set("0123456789.$%()+-*/×÷xX \t")


def _number(text: str) -> Fraction:
    return Fraction(text.replace(",", ""))


def _decimals(text: str) -> int:
    return len(text.split(".", 1)[1]) if "." in text else 0


class _Unparsable(ValueError):
    pass


def _tokens(expression: str, ends: list[int] | None = None) -> list[tuple[str, str]]:
    """`(kind, text)` tokens of an arithmetic expression; `_Unparsable` on anything else (a word, a stray comma).
    `ends`, when given, receives the end offset of each token."""
    tokens, at = [], 0
    while at < len(expression):
        if expression[at:].isspace():
            break
        match = _TOKEN.match(expression, at)
        if match is None:
            raise _Unparsable(expression)
        kind = match.lastgroup
        if kind != "skip":
            tokens.append((kind, match.group(kind)))
            if ends is not None:
                ends.append(match.end())
        at = match.end()
    return tokens


def _scan(text: str, start: int, step: int) -> int:
    """From `start`, move over arithmetic characters (and commas inside numbers) left (step −1) or right (+1); return
    where the run stops (exclusive on the left: the run is text[result:start], or text[start:result] on the right)."""
    at = start
    while 0 < at if step < 0 else at < len(text):
        i = at - 1 if step < 0 else at
        ch = text[i]
        inside_number = ch == "," and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit()
        if ch not in _EXPRESSION_CHARS and not inside_number:
            break
        at += step
    return at


def _right_expression(text: str, start: int) -> tuple[int, list[tuple[str, str]]] | None:
    """An expression (two numbers or more) that continues from the result at `start`: "= 4000 + 2040 = ...",
    "= 3/4"; its end offset and tokens, or None when the result stands alone."""
    end = _scan(text, start, +1)
    ends: list[int] = []
    try:
        tokens = _tokens(text[start:end], ends)
    except _Unparsable:
        return None
    while tokens and (tokens[-1][0] in ("op", "percent") or tokens[-1][1] == "("):
        tokens, ends = tokens[:-1], ends[:-1]  # "= 7 x" from "7 xylophones": an operator cannot close it
    while tokens and tokens[-1][1] == ")" and sum(t == ")" for _, t in tokens) > sum(t == "(" for _, t in tokens):
        tokens, ends = tokens[:-1], ends[:-1]  # "(12 + 3 = 15)": the parenthesis closes the aside
    if not _is_step(tokens) or any(kind == "percent" for kind, _ in tokens):
        return None
    return start + ends[-1], tokens


def _evaluate(tokens: list[tuple[str, str]]) -> Fraction:
    """Exact value of `tokens` (+ − × ÷ with the usual precedence, parentheses, unary minus), as a fraction."""
    position = 0

    def peek():
        return tokens[position] if position < len(tokens) else (None, None)

    def take():
        nonlocal position
        position += 1
        return tokens[position - 1]

    def expression():
        value = term()
        while peek()[1] in ("+", "-"):
            value = value + term() if take()[1] == "+" else value - term()
        return value

    def term():
        value = factor()
        while peek()[1] in ("*", "/", "×", "÷", "x", "X"):
            op = take()[1]
            right = factor()
            if op in ("/", "÷"):
                if right == 0:
                    raise _Unparsable("division by zero")
                value = value / right
            else:
                value = value * right
        return value

    def factor():
        kind, text = peek()
        if text == "-":
            take()
            return -factor()
        if kind == "number":
            take()
            return _number(text)
        if text == "(":
            take()
            value = expression()
            if take()[1] != ")":
                raise _Unparsable("unbalanced parenthesis")
            return value
        raise _Unparsable(f"unexpected {text!r}")

    if not tokens:
        raise _Unparsable("empty")
    try:
        value = expression()
    except IndexError:
        raise _Unparsable("truncated") from None
    if position != len(tokens):
        raise _Unparsable("trailing tokens")
    return value


def _is_step(tokens: list[tuple[str, str]]) -> bool:
    """At least two numbers and one binary operator: `a op b`, not a bare `x = 5`."""
    operands = sum(kind == "number" for kind, _ in tokens)
    binary = any(kind == "op" and i > 0 for i, (kind, _) in enumerate(tokens))
    return operands >= 2 and binary


def _verdict(tokens: list[tuple[str, str]], written: str) -> tuple[str, Fraction | None]:
    """("verified" | "wrong" | "unknown", the expression's value) for `expression = written`."""
    if any(kind == "percent" for kind, _ in tokens):
        return "unknown", None  # 20% of ... : a percentage is read in too many ways to recompute
    try:
        value = _evaluate(tokens)
    except _Unparsable:
        return "unknown", None
    result = _number(written)
    places = _decimals(written)
    if value == result:
        return "verified", value
    if places > 0:  # a decimal result may be rounded to the places it is written with
        return ("verified" if abs(value - result) <= Fraction(1, 2 * 10**places) else "wrong"), value
    if value.denominator != 1 and abs(value - result) < 1:  # 10/3 = 3: rounded or floored to whole units
        return "unknown", value
    return "wrong", value


def _left_expression(text: str, equals: int) -> list[list[tuple[str, str]]]:
    """The readings of the arithmetic expression that ends right before `text[equals] == "="`: its tokens, and also
    with a leading minus when one stands before it (a negative number, or a dash between words); [] if no step."""
    start = _scan(text, equals, -1)
    try:
        tokens = _tokens(text[start:equals])
    except _Unparsable:
        return []
    # Words stop the scan, so it may start inside one ("box 3 x 4": the x of box): drop what cannot open an operand
    minus = False
    while tokens and not (tokens[0][0] == "number" or tokens[0][1] == "("):
        minus = tokens[0][1] == "-"
        tokens = tokens[1:]
    while tokens and tokens[0][1] == "(" and sum(t == "(" for _, t in tokens) > sum(t == ")" for _, t in tokens):
        minus = False
        tokens = tokens[1:]  # "(3 + 4 = 7)": the parenthesis opens the sentence's aside, not the expression
    if not _is_step(tokens):
        return []
    return [tokens, [("op", "-"), *tokens]] if minus else [tokens]


def arithmetic(text: str) -> list[tuple[int, int, str]]:
    """Recompute every arithmetic step `a op b = c` of a worked solution and judge its result `c`.

    Steps are found in two forms, as GSM8K writes them:
    - calculator annotations `<<a*b=c>>c`: the expression inside is recomputed, and both the `c` inside the
      annotation and the `c` shown right after it are marked;
    - plain text `a op b = c` (also `a x b`, `a × b`, `a ÷ b`, `$` signs, commas in numbers, decimals, parentheses,
      unary minus): the longest run of numbers and operators before an `=` (outside annotations), with at least two
      numbers and one operator, and the number right after it. A minus that opens the run is read both as a sign and
      as a dash ("apples - 3 + 4 = 7"): the step is verified if either reading gives its result. When an expression
      follows the `=` ("4080 + 2040 = 4000 + 2080", "3 * 1/4 = 3/4"), the step is verified if its first number is
      the value (a running chain, "2 + 3 = 5 + 1 = 6") or if the whole expression is; otherwise the whole right-hand
      expression is marked. A result glued to a letter (`5A`: algebra) or to `%` is "unknown".
    The value is exact (fractions). A result written with decimals may be rounded to its places (10/3 = 3.33 is
    verified); a whole-number result must be exact, except a non-integer value within 1 of it (10/3 = 3: rounding or
    flooring to whole units is a reasoning step, not an arithmetic one), which is "unknown", as is an expression with
    `%` or one that cannot be parsed. The final line `#### N` is judged against the last recomputed step: "verified"
    when N is that step's true value, "wrong" when N repeats its wrong written result, "unknown" otherwise.

    Each step is judged on its own: a wrong result carried into later steps makes only the step that computed it
    wrong. Returns `(start, end, verdict)` spans over the results, in text order.
    """
    spans: list[tuple[int, int, str]] = []
    steps: list[tuple[int, str, Fraction | None, str]] = []  # (position, verdict, value, written result)
    covered = []
    for match in _ANNOTATION.finditer(text):
        covered.append((match.start(), match.end()))
        result = _RESULT.fullmatch(match.group(2))
        if result is None:
            continue
        written = result.group("value")
        start = match.start(2) + result.start("value")
        try:
            tokens = _tokens(match.group(1))
        except _Unparsable:
            tokens = []
        verdict, value = _verdict(tokens, written) if tokens else ("unknown", None)
        spans.append((start, start + len(written), verdict))
        shown = _SHOWN.match(text, match.end())
        if shown is not None and _number(shown.group()) == _number(written):
            spans.append((shown.start(), shown.end(), verdict))
        steps.append((match.start(), verdict, value, written))
    for equals in (i for i, ch in enumerate(text) if ch == "="):
        if any(start <= equals < end for start, end in covered):
            continue
        readings = _left_expression(text, equals)
        result = _RESULT.match(text, equals + 1)
        if not readings or result is None:
            continue
        written = result.group("value")
        span = result.span("value")
        judged = [_verdict(reading, written) for reading in readings]
        verdict, value = next((j for j in judged if j[0] == "verified"), judged[0])  # "-3 + 5 = 2": a sign
        right = _right_expression(text, span[0])
        if verdict != "verified" and right is not None:
            # "a + b = c + d": the result is the expression on the right, not its first number
            try:
                right_value = _evaluate(right[1])
            except _Unparsable:
                right_value = None
            values = [v for _, v in judged if v is not None]
            if right_value is not None and right_value in values:
                verdict, value = "verified", right_value
            span = (span[0], right[0]) if verdict != "unknown" else span
        if text[span[1] : span[1] + 1] == "%":
            verdict, value = "unknown", None  # 1/4 = 25%: a percentage result, read in too many ways
        elif text[span[1] : span[1] + 1].isalpha():
            verdict, value = "unknown", None  # 100/5 = 5A/5: algebra (or a unit glued to the number)
        spans.append((*span, verdict))
        steps.append((equals, verdict, value, written))
    finals = list(_FINAL.finditer(text))
    if finals:
        final = finals[-1]
        before = sorted(
            (step for step in steps if step[0] < final.start() and step[2] is not None), key=lambda s: s[0]
        )
        verdict = "unknown"
        if before:
            _, step_verdict, value, written = before[-1]
            answer = _number(final.group("value"))
            if answer == value or (step_verdict == "verified" and answer == _number(written)):
                verdict = "verified"
            elif step_verdict == "wrong" and answer == _number(written):
                verdict = "wrong"
        spans.append((final.start("value"), final.end("value"), verdict))
    return sorted(spans)


register_checker("arithmetic", arithmetic)
