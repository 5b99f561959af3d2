"""The A1111 prompt syntax parser (app.prompt_syntax): A1111's documented examples and rules,
written from its rules (the expected weights are the products of the factors, in the order the
brackets close), and the weights it refuses."""

from __future__ import annotations

import pytest

from app.prompt_syntax import PromptSyntaxError, is_plain, parse_prompt


def pairs(prompt: str) -> list[list]:
    return [["BREAK", -1] if p.is_break else [p.text, p.weight] for p in parse_prompt(prompt)]


R = 1.1  # (x)
S = 1 / 1.1  # [x]


@pytest.mark.parametrize(("prompt", "expected"), [
    # A1111's parse_prompt_attention docstring examples.
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1],
      ["hill", 0.55], [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
    # The rules.
    ("(x)", [["x", R]]),
    ("((x))", [["x", 1.0 * R * R]]),
    ("[x]", [["x", S]]),
    ("[[x]]", [["x", 1.0 * S * S]]),
    ("(x:1.5)", [["x", 1.5]]),
    ("(x:0)", [["x", 0.0]]),
    ("(x:-2)", [["x", -2.0]]),
    ("(x:.5)", [["x", 0.5]]),
    ("((x:2))", [["x", 1.0 * 2 * R]]),
    ("([x])", [["x", 1.0 * S * R]]),
    ("a (b [c] d:2) e", [["a ", 1.0], ["b ", 2.0], ["c", 1.0 * S * 2], [" d", 2.0], [" e", 1.0]]),
    ("\\(x\\) \\[y\\] \\\\z", [["(x) [y] \\z", 1.0]]),
    ("a\\b", [["ab", 1.0]]),  # a lone backslash is dropped, as in A1111
    ("x) y]", [["x) y]", 1.0]]),  # closing nothing: literal
    ("[x", [["x", S]]),
    ("((x", [["x", 1.0 * R * R]]),
    ("[(x", [["x", 1.0 * R * S]]),  # unclosed: round ones first, then square
    ("a: b", [["a: b", 1.0]]),
    ("(x: 1.5)", [["x: 1.5", R]]),  # a space before the weight makes it text, as in A1111
    ("a:1.2)", [["a:1.2)", 1.0]]),  # a weight with no "(" open is text
    ("", [["", 1.0]]),
    ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
    ("a BREAK", [["a", 1.0], ["BREAK", -1], ["", 1.0]]),
    ("BREAK a", [["", 1.0], ["BREAK", -1], ["a", 1.0]]),
    ("(a BREAK b)", [["a", R], ["BREAK", -1], ["b", R]]),
    ("a break b, aBREAK, BREAKs, BREAK_x", [["a break b, aBREAK, BREAKs, BREAK_x", 1.0]]),
    ("a,BREAK,b", [["a,", 1.0], ["BREAK", -1], [",b", 1.0]]),
])
def test_parse_by_a1111_rules(prompt: str, expected: list[list]) -> None:
    assert pairs(prompt) == expected


def test_deep_nesting_is_no_recursion_error() -> None:
    assert pairs("(" * 40 + "x" + ")" * 40) == [["x", pytest.approx(R ** 40)]]
    with pytest.raises(PromptSyntaxError) as caught:
        parse_prompt("(" * 500 + "x")
    assert caught.value.fragment == "x"
    assert "-100 to 100" in caught.value.rule
    assert pairs("(" * 500) == [["", 1.0]]
    assert pairs("[" * 5000 + "x" + "]" * 5000)[0][0] == "x"  # (weight ~0, allowed)


@pytest.mark.parametrize(("prompt", "fragment"), [
    ("a (x:1e400) b", "(x:1e400)"),
    ("(x:inf)", "(x:inf)"),
    ("(x:nan)", "(x:nan)"),
    ("(x:101)", "(x:101)"),
    ("(x:-100.5)", "(x:-100.5)"),
    ("(x:1.2.3)", "(x:1.2.3)"),
    ("((x:50):3)", "x"),
])
def test_weights_outside_the_range_are_refused_naming_the_fragment(prompt: str, fragment: str) -> None:
    with pytest.raises(PromptSyntaxError) as caught:
        parse_prompt(prompt)
    assert caught.value.fragment == fragment


def test_limits_are_allowed() -> None:
    assert pairs("(x:100) (y:-100)") == [["x", 100.0], [" ", 1.0], ["y", -100.0]]


@pytest.mark.parametrize(("prompt", "plain"), [
    ("a cat, on a mat: fine", True), ("", True), ("a (cat)", False), ("a\\(cat", False),
    ("a BREAK b", False), ("a (cat:1)", False),
])
def test_is_plain(prompt: str, plain: bool) -> None:
    assert is_plain(prompt, parse_prompt(prompt)) is plain
