"""RE2 regular expressions for Python's `re`: the translation of RE2 syntax, the rejection of
what RE2 lacks (backreferences, lookaround, atomic groups, possessive quantifiers), and RE2
rewrite substitutions (`\\0`..`\\9`), as Envoy reads them in routes."""

from __future__ import annotations

import re
from collections.abc import Callable

MAX_REGEX_LENGTH = 1024

_POSIX_CLASSES = {
    "alnum": "0-9A-Za-z",
    "alpha": "A-Za-z",
    "ascii": "\\x00-\\x7f",
    "blank": "\\t ",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "!-~",
    "lower": "a-z",
    "print": " -~",
    "punct": "!-/:-@\\[-`{-~",
    "space": "\\t\\n\\v\\f\\r ",
    "upper": "A-Z",
    "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}
_REPEAT = re.compile(r"\{(\d+)(?:(,)(\d*))?\}")
_RE2_MAX_REPEAT = 1000


def _re2_group(pattern: str, i: int) -> tuple[str, int]:
    """Translate the opening of a group at `pattern[i] == "("`; returns (text, next index)."""
    rest = pattern[i + 2 :] if pattern.startswith("(?", i) else None
    if rest is None:
        return "(", i + 1
    if rest.startswith(("=", "!", "<=", "<!")):
        raise ValueError("lookahead and lookbehind assertions are not supported by RE2")
    if rest.startswith(">"):
        raise ValueError("atomic groups (?>...) are not supported by RE2")
    if rest.startswith("("):
        raise ValueError("conditional groups are not supported by RE2")
    if rest.startswith("P="):
        raise ValueError("backreferences are not supported by RE2")
    if rest.startswith("#"):
        raise ValueError("comment groups (?#...) are not supported by RE2")
    if rest.startswith("P<"):
        return "(?P<", i + 4
    if rest.startswith("<"):
        return "(?P<", i + 3
    end = i + 2
    while end < len(pattern) and pattern[end] not in ":)":
        flag = pattern[end]
        if flag == "U":
            raise ValueError("the ungreedy flag U is not supported")
        if flag not in "ims-":
            raise ValueError(f"unknown group flag {flag!r}")
        end += 1
    return pattern[i:end], end


def re2_to_python(pattern: str) -> str:
    """Rewrite an RE2 pattern into Python `re` syntax with the same meaning.

    Raises ValueError for RE2 syntax errors this check sees and for Python-only constructs
    (RE2 would reject them); anything else is left to `re.compile`."""
    out: list[str] = []
    i, n = 0, len(pattern)
    in_class = False
    class_body = 0
    after_repeat = False
    while i < n:
        c = pattern[i]
        repeat = False
        if c == "\\":
            if i + 1 >= n:
                raise ValueError("trailing backslash")
            e = pattern[i + 1]
            if e in "123456789":
                raise ValueError("backreferences are not supported by RE2")
            if e in "pP":
                raise ValueError("Unicode classes (\\p, \\P) are not supported")
            if e in "QECNuU":
                raise ValueError(f"\\{e} is not supported")
            if e == "Z":
                raise ValueError("\\Z is not RE2 syntax (use \\z or $)")
            if e == "z" and not in_class:
                out.append("\\Z")
            elif e == "x" and pattern.startswith("{", i + 2):
                end = pattern.find("}", i + 3)
                digits = pattern[i + 3 : end] if end != -1 else ""
                if not digits or not re.fullmatch(r"[0-9A-Fa-f]{1,6}", digits):
                    raise ValueError("bad \\x{...} escape")
                code = int(digits, 16)
                if code > 0x10FFFF:
                    raise ValueError("bad \\x{...} escape")
                out.append(f"\\U{code:08x}")
                i = end + 1
                after_repeat = False
                continue
            else:
                out.append(pattern[i : i + 2])
            i += 2
        elif in_class:
            if c == "]" and i > class_body:
                in_class = False
                out.append(c)
            elif pattern.startswith("[:", i) and (end := pattern.find(":]", i + 2)) != -1:
                name = pattern[i + 2 : end]
                if name.startswith("^"):
                    raise ValueError("negated POSIX classes [:^name:] are not supported")
                if name not in _POSIX_CLASSES:
                    raise ValueError(f"unknown POSIX class [:{name}:]")
                out.append(_POSIX_CLASSES[name])
                i = end + 2
                continue
            elif c == "[":
                out.append("\\[")
            elif c in "&~|-" and pattern.startswith(c, i + 1):
                # Python reserves doubled set operators for future use; RE2 reads literals.
                out.append(c + "\\" + c)
                i += 2
                continue
            else:
                out.append(c)
            i += 1
        elif c == "[":
            in_class = True
            out.append(c)
            i += 1
            if pattern.startswith("^", i):
                out.append("^")
                i += 1
            if pattern.startswith("]", i):
                out.append("\\]")
                i += 1
            class_body = i
            after_repeat = False
            continue
        elif c == "(":
            text, i = _re2_group(pattern, i)
            out.append(text)
            after_repeat = False
            continue
        elif c in "*+?":
            if after_repeat and c == "+":
                raise ValueError("possessive quantifiers are not supported by RE2")
            repeat = not (after_repeat and c == "?")
            out.append(c)
            i += 1
        elif c == "{" and (m := _REPEAT.match(pattern, i)):
            if after_repeat:
                raise ValueError("bad repetition operator")
            low = int(m.group(1))
            high = int(m.group(3)) if m.group(3) else low
            if max(low, high) > _RE2_MAX_REPEAT:
                raise ValueError(f"repeat count above {_RE2_MAX_REPEAT}")
            out.append(m.group(0))
            i = m.end()
            repeat = True
        else:
            # RE2 reads a brace that opens no repetition (such as "{,3}") literally.
            out.append("\\{" if c == "{" else c)
            i += 1
        after_repeat = repeat
    if in_class:
        raise ValueError("missing closing ]")
    return "".join(out)


def compile_re2(pattern: str, *, ignore_case: bool = False) -> re.Pattern[str]:
    """Compile an RE2 pattern; ValueError with the reason when RE2 (or this check) rejects it.
    `\\d`, `\\w`, `\\s` and `\\b` are ASCII-only, as in RE2."""
    if not pattern:
        raise ValueError("regular expression must not be empty")
    if len(pattern) > MAX_REGEX_LENGTH:
        raise ValueError(f"regular expression is longer than {MAX_REGEX_LENGTH} characters")
    translated = re2_to_python(pattern)
    flags = re.ASCII | (re.IGNORECASE if ignore_case else 0)
    try:
        return re.compile(translated, flags)
    except re.error as exc:
        raise ValueError(f"not a valid RE2 regular expression: {exc.msg}") from None
    except (OverflowError, RecursionError):
        raise ValueError("regular expression is too complex") from None


def re2_substitution(template: str) -> Callable[[re.Match[str]], str]:
    """An RE2 substitution string (`\\0`..`\\9` groups, `\\\\` a backslash) as a function."""
    parts: list[str | int] = []
    literal: list[str] = []
    i = 0
    while i < len(template):
        c = template[i]
        if c == "\\":
            nxt = template[i + 1 : i + 2]
            if nxt.isdigit():
                parts.append("".join(literal))
                literal = []
                parts.append(int(nxt))
            elif nxt == "\\":
                literal.append("\\")
            else:
                raise ValueError(f"invalid escape \\{nxt} in rewrite (use \\0 to \\9 or \\\\)")
            i += 2
            continue
        literal.append(c)
        i += 1
    parts.append("".join(literal))

    def substitute(match: re.Match[str]) -> str:
        return "".join(p if isinstance(p, str) else (match.group(p) or "") for p in parts)

    return substitute
