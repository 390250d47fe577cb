"""RE2 patterns for Python's `re`: translation, rejection of what RE2 lacks, stability."""

from __future__ import annotations

import contextlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztagent.istio.routing.re2 import compile_re2, re2_to_python

# --- RE2 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "text", "matches"),
    [
        ("[[:digit:]]+", "123", True),
        ("[[:alpha:]_]+", "ab_c", True),
        ("[[:alpha:]]+", "a1", False),
        ("a\\z", "a", True),
        ("(?P<x>a)b", "ab", True),
        ("(?<x>a)b", "ab", True),
        ("(?i)abc", "ABC", True),
        ("\\x{41}", "A", True),
        ("[a&&b]+", "a&b", True),
        ("\\d+", "١٢", False),  # ASCII digits only, as RE2
        ("a{2,3}", "aaa", True),
        ("a{,3}", "a{,3}", True),  # not a repetition in RE2
        ("a{x}", "a{x}", True),
    ],
)
def test_re2_translation(pattern, text, matches):
    assert (compile_re2(pattern).fullmatch(text) is not None) is matches


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("(a)\\1", "backreferences"),
        ("(?P<n>a)(?P=n)", "backreferences"),
        ("a(?!b)", "lookahead"),
        ("(?<!a)b", "lookbehind"),
        ("a++", "possessive"),
        ("(?>ab)", "atomic"),
        ("(?(1)a|b)", "conditional"),
        ("(?#c)a", "comment"),
        ("\\pL", "Unicode classes"),
        ("a\\Z", "\\Z"),
        ("\\N{DIGIT ONE}", "\\N is not supported"),
        ("\\u0041", "\\u is not supported"),
        ("(?U)a*", "ungreedy"),
        ("a{1001}", "repeat count"),
        ("[[:^alpha:]]", "negated POSIX"),
        ("[[:bogus:]]", "unknown POSIX"),
        ("", "must not be empty"),
        ("a" * 1025, "longer than 1024"),
    ],
)
def test_re2_rejects(pattern, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        compile_re2(pattern)


@given(st.text(max_size=40))
def test_re2_check_raises_only_value_error(pattern):
    with contextlib.suppress(ValueError):
        compile_re2(pattern)


@given(st.text(alphabet="ab()[]{}*+?|\\^$.:-=!<>P123zZdwx,", max_size=20))
def test_re2_translation_is_stable_on_regex_alphabet(pattern):
    try:
        translated = re2_to_python(pattern)
    except ValueError:
        return
    assert isinstance(translated, str)
