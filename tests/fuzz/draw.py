"""Structured values from fuzz bytes: the same bytes always give the same value.

A fuzzer mutates bytes; the parsers under test read YAML documents, Kubernetes objects,
header lists and tokens. `Draw` turns bytes into such values, so that a coverage-guided
fuzzer (atheris) and Hypothesis (`st.binary()`) drive the same target function. Running out
of bytes is not an error: every read then returns its smallest value.

Field names and enum words come from the string literals of the parser's own module
(`literals`), so random objects use the keys the parser looks for. `mutate` edits a valid seed
document at a random place, which reaches the checks deep inside an object far more often
than objects built from nothing.
"""

from __future__ import annotations

import ast
import copy
import functools
import inspect
from collections.abc import Sequence
from types import ModuleType
from typing import Any

INTERESTING_INTS = (
    0,
    1,
    -1,
    2,
    7,
    8,
    15,
    80,
    255,
    256,
    443,
    1024,
    9080,
    15008,
    65535,
    65536,
    2**31 - 1,
    2**31,
    2**32,
    2**63,
    -(2**63),
    10**30,
)
INTERESTING_FLOATS = (0.0, -0.0, 0.5, 1.5, -1.0, 1e300, float("inf"), float("-inf"), float("nan"))
INTERESTING_TEXT = (
    "",
    " ",
    "*",
    "/",
    "-",
    ".",
    ":",
    "0",
    "1",
    "10.0.0.1",
    "10.0.0.0/8",
    "::1",
    "fe80::1%eth0",
    "[::1]:80",
    "10.0.0.1:80",
    "1.2.3.4/33",
    "default",
    "shop",
    "reviews",
    "reviews.shop.svc.cluster.local",
    "*.example.com",
    "spiffe://cluster.local/ns/shop/sa/default",
    "cluster.local/ns/shop/sa/default",
    "1s",
    "1.5s",
    "-1s",
    "100ms",
    "1h2m3s",
    "99999999999999999999h",
    "GET",
    "CONNECT",
    "a" * 300,
    "\u00e9",
    "\x00",
    "\ud800",
    "(a+)+$",
    "[",
    "{",
    "$1",
    "%",
    "%zz",
)


@functools.cache
def literals(*modules: ModuleType) -> tuple[str, ...]:
    """The distinct short string constants in the source of `modules` (docstrings left out)."""
    found: dict[str, None] = {}
    for module in modules:
        tree = ast.parse(inspect.getsource(module))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
                and 0 < len(node.value) <= 64
                and "\n" not in node.value
            ):
                found[node.value] = None
    return tuple(found)


class Draw:
    """Reads choices from `data` front to back."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        value = self.data[self.pos]
        self.pos += 1
        return value

    def below(self, n: int) -> int:
        """An int in [0, n); n <= 65536."""
        if n <= 1:
            return 0
        if n <= 256:
            return self.byte() % n
        return ((self.byte() << 8) | self.byte()) % n

    def flag(self) -> bool:
        return bool(self.byte() & 1)

    def choice(self, options: Sequence[Any]) -> Any:
        return options[self.below(len(options))]

    def raw(self, limit: int = 32) -> bytes:
        n = min(self.below(limit + 1), self.left)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out

    def integer(self) -> int:
        kind = self.below(4)
        if kind == 0:
            return int(self.choice(INTERESTING_INTS))
        if kind == 1:
            return self.below(65536)
        if kind == 2:
            return self.byte()
        return int.from_bytes(self.raw(9), "big", signed=True)

    def text(self, words: Sequence[str] = ()) -> str:
        kind = self.below(8)
        if kind < 3 and words:
            return str(self.choice(words))
        if kind < 5:
            return str(self.choice(INTERESTING_TEXT))
        if kind == 5 and words:
            # Two words glued: "ns/name", "host:port", "prefix*"...
            sep = self.choice(("/", ".", ":", "-", "*", "", " ", "=", ","))
            return f"{self.choice(words)}{sep}{self.choice(words)}"
        raw = self.raw(24)
        return raw.decode("utf-8", "replace") if self.flag() else raw.decode("latin-1")

    def scalar(self, words: Sequence[str] = ()) -> Any:
        kind = self.below(8)
        if kind == 0:
            return None
        if kind == 1:
            return self.flag()
        if kind == 2:
            return self.integer()
        if kind == 3:
            return float(self.choice(INTERESTING_FLOATS))
        return self.text(words)

    def value(self, words: Sequence[str] = (), depth: int = 4) -> Any:
        """Any JSON/YAML-like value: None, bool, int, float, text, lists and mappings."""
        kind = self.below(8) if depth > 0 else 0
        if kind in (0, 1, 2, 3):
            return self.scalar(words)
        if kind == 4:
            return [self.value(words, depth - 1) for _ in range(self.below(4))]
        return {self.key(words): self.value(words, depth - 1) for _ in range(self.below(5))}

    def key(self, words: Sequence[str] = ()) -> Any:
        if self.below(16) == 0:
            return self.scalar(words)  # YAML allows any scalar as a key
        return self.text(words) if self.below(8) else str(self.choice(words or ("",)))

    def mutate(self, document: Any, words: Sequence[str] = (), edits: int = 3) -> Any:
        """A deep copy of `document` with up to `edits` random changes in random places."""
        document = copy.deepcopy(document)
        for _ in range(1 + self.below(edits)):
            document = self._edit(document, words, 0)
        return document

    def _edit(self, node: Any, words: Sequence[str], depth: int) -> Any:
        containers: list[tuple[Any, Any]] = []
        if isinstance(node, dict):
            containers = [(node, k) for k in node]
        elif isinstance(node, list):
            containers = [(node, i) for i in range(len(node))]
        # Go deeper while there is somewhere to go and the bytes say so.
        if containers and depth < 12 and self.below(4) != 0:
            parent, key = self.choice(containers)
            parent[key] = self._edit(parent[key], words, depth + 1)
            return node
        action = self.below(6)
        if action == 0:
            return self.value(words, 2)
        if action == 1 and isinstance(node, dict):
            if node:
                del node[self.choice(list(node))]
            return node
        if action == 2 and isinstance(node, dict):
            node[self.key(words)] = self.value(words, 2)
            return node
        if action == 3 and isinstance(node, list):
            if node and self.flag():
                node.append(copy.deepcopy(self.choice(node)))
            elif node:
                del node[self.below(len(node))]
            return node
        if action == 4:
            return self.scalar(words)
        return [node] if self.flag() else {self.key(words): node}
