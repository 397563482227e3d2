"""Prompt editing and alternation, as AUTOMATIC1111 reads them: which prompt text conditions each step.

    [from:to:when]   `from` until step `when`, then `to`      [to:when]  nothing, then `to`
    [from::when]     `from`, then nothing                      [a|b|c]    a, b, c, a, … one per step

`when` with a decimal point is a fraction of the steps (`0.3` of 20 is step 6), without one a step number; the
text switches after that step. Brackets nest, and each part may hold weights, `(word:1.2)`, escapes and
concepts: the text of a step is then read like any prompt. Brackets that do not form one of these are kept as
written: `[word]` (less weight), `(word)`, and unbalanced ones. A prompt that A1111's grammar cannot read at
all (a `|` outside brackets) is used as written for every step, as A1111 does.

Composable diffusion, `a red circle AND a blue square :0.7`: `composable_parts` splits a positive prompt on the
word AND into sub-prompts, each with its weight (`:number` at its end, 1 when absent), as A1111's
`get_multicond_prompt_list` does; each part has its own conditioning and its own schedule, and the sampler is
guided by uncond + cfg * sum(weight * (cond - uncond)). A1111 reads that weight on every positive prompt, with
or without AND (`a red circle :1.5` is a red circle guided 1.5 times as hard); negative prompts are not split.

`prompt_schedule(prompt, steps)` gives [(last_step, text), …]: `text` conditions steps up to and including
`last_step` (1-based). It follows A1111's modules/prompt_parser.py (its Lark grammar, `collect_steps` and
`at_step`); this is our own recursive-descent reading of that grammar, checked against a table of cases in
tests/test_schedule.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

_PLAIN = re.compile(r"(?:[^\\\[\]():|\s]|\\.)+")  # A1111's `plain`, split from its WHITESPACE tokens
_SPACE = re.compile(r"\s+")
_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))\s*\]")
_LITERAL = "[]():"  # what A1111's grammar takes as plain characters at the top level when nothing else fits


@dataclass(frozen=True)
class _Scheduled:
    before: tuple | None
    after: tuple
    when: str


@dataclass(frozen=True)
class _Alternate:
    options: tuple


class _NoParse(Exception):
    pass


def _prompt(text: str, i: int) -> tuple[list, int]:
    """A1111's `prompt`: plain text, whitespace, emphasis and brackets, as far as they go."""
    nodes: list = []
    while i < len(text):
        match = _PLAIN.match(text, i) or _SPACE.match(text, i)
        if match:
            nodes.append(match.group(0))
            i = match.end()
        elif text[i] == "(":
            node, j = _emphasis(text, i)
            if node is None:
                break
            nodes.append(node)
            i = j
        elif text[i] == "[":
            node, j = _bracket(text, i)
            if node is None:
                break
            nodes.append(node)
            i = j
        else:
            break
    return nodes, i


def _emphasis(text: str, i: int) -> tuple[tuple | None, int]:
    """ "(" prompt ")" or "(" prompt ":" prompt ")"; kept as written, with any schedules inside read."""
    inner, j = _prompt(text, i + 1)
    if j < len(text) and text[j] == ")":
        return ("(", *inner, ")"), j + 1
    if j < len(text) and text[j] == ":":
        weight, k = _prompt(text, j + 1)
        if k < len(text) and text[k] == ")":
            return ("(", *inner, ":", *weight, ")"), k + 1
    return None, i


def _bracket(text: str, i: int) -> tuple[object | None, int]:
    """ "[" … "]": scheduled, alternate, or emphasis (less weight); None if none of them fits."""
    first, j = _prompt(text, i + 1)
    if j >= len(text):
        return None, i
    if text[j] == "]":
        return ("[", *first, "]"), j + 1
    if text[j] == "|":
        options = [tuple(first)]
        while j < len(text) and text[j] == "|":
            option, j = _prompt(text, j + 1)
            options.append(tuple(option))
        if j < len(text) and text[j] == "]":
            return _Alternate(tuple(options)), j + 1
        return None, i
    if text[j] == ":":
        number = _NUMBER.match(text, j + 1)
        if number:  # [to:when]
            return _Scheduled(None, tuple(first), number.group(1)), number.end()
        second, k = _prompt(text, j + 1)
        if k < len(text) and text[k] == ":":
            number = _NUMBER.match(text, k + 1)
            if number:  # [from:to:when]
                return _Scheduled(tuple(first), tuple(second), number.group(1)), number.end()
    return None, i


def _parse(text: str) -> tuple:
    """A1111's `start`: prompts, with unmatched brackets, parentheses and colons as plain characters."""
    nodes: list = []
    i = 0
    while i < len(text):
        found, j = _prompt(text, i)
        nodes += found
        i = j
        if i < len(text):
            if text[i] not in _LITERAL:
                raise _NoParse  # a '|' outside brackets: A1111's grammar has no reading of it
            nodes.append(text[i])
            i += 1
    return tuple(nodes)


def _when(number: str, steps: int) -> int:
    """The last step of the `from` part: a fraction of the steps if written with a decimal point."""
    value = float(number)
    value = value * steps if "." in number else value
    return min(steps, int(value))


def _boundaries(nodes: tuple, steps: int, found: set[int]) -> None:
    for node in nodes:
        if isinstance(node, _Scheduled):
            when = _when(node.when, steps)
            if when >= 1:
                found.add(when)
            _boundaries(node.before or (), steps, found)
            _boundaries(node.after, steps, found)
        elif isinstance(node, _Alternate):
            found.update(range(1, steps + 1))
            for option in node.options:
                _boundaries(option, steps, found)
        elif isinstance(node, tuple):
            _boundaries(node, steps, found)


def _text_at(nodes: tuple, step: int, steps: int) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Scheduled):
            chosen = (node.before or ()) if step <= _when(node.when, steps) else node.after
            parts.append(_text_at(chosen, step, steps))
        elif isinstance(node, _Alternate):
            parts.append(_text_at(node.options[(step - 1) % len(node.options)], step, steps))
        else:
            parts.append(_text_at(node, step, steps))
    return "".join(parts)


_AND = re.compile(r"\bAND\b")  # A1111's re_AND
_PART_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")  # A1111's re_weight
MAX_PARTS = 16  # sub-prompts of one prompt: each is one more UNet pass per step


@lru_cache(maxsize=256)
def composable_parts(prompt: str) -> tuple[tuple[str, float], ...]:
    """((text, weight), …): the sub-prompts of a positive prompt, split on AND, each with its weight. A prompt
    without AND and without a trailing `:weight` is one part, itself, weight 1."""
    parts, weighted = [], False
    for part in _AND.split(prompt):
        match = _PART_WEIGHT.match(part)
        text, weight = match.group(1), match.group(2)
        weighted = weighted or weight is not None
        parts.append((text, float(weight) if weight is not None else 1.0))
    if len(parts) == 1 and not weighted:
        return ((prompt, 1.0),)  # as written (trailing spaces and all), so plain prompts encode as they always did
    return tuple(parts)  # a trailing `:1` is read as a weight and leaves the text, as in A1111


def is_composable(prompt: str) -> bool:
    """Whether the prompt needs composable guidance (several parts, or one with a weight other than 1)."""
    parts = composable_parts(prompt)
    return len(parts) > 1 or parts[0][1] != 1.0


@lru_cache(maxsize=256)
def prompt_schedule(prompt: str, steps: int) -> tuple[tuple[int, str], ...]:
    """((last_step, text), …) for `steps` steps: text conditions every step up to and including last_step."""
    try:
        tree = _parse(prompt)
    except _NoParse:
        return ((steps, prompt),)
    found = {steps}
    _boundaries(tree, steps, found)
    return tuple((step, _text_at(tree, step, steps)) for step in sorted(found))


def text_at_step(schedule: tuple[tuple[int, str], ...], step: int) -> str:
    """The text of 1-based `step` (a step past the last boundary keeps the last text, as A1111 does)."""
    for last, text in schedule:
        if step <= last:
            return text
    return schedule[-1][1]


def is_scheduled(prompt: str, steps: int) -> bool:
    """Whether the prompt's text changes between steps (else it is encoded once, as written)."""
    schedule = prompt_schedule(prompt, steps)
    return len({text for _, text in schedule}) > 1 or schedule[0][1] != prompt
