"""Hypothesis inputs for the fuzz targets: random bytes, and seeds with random bytes spliced in
(a seed keeps the parser past its first checks, so the edits land deep inside)."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from .targets import seeds

# Bounded for CI: every fuzz test together stays well under a minute on a loaded machine.
# The deadline catches runaway inputs (a regex or a loop gone quadratic), not slow machines.
FUZZ_SETTINGS = settings(
    max_examples=500,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _splice(seed: bytes, at: int, cut: int, insert: bytes) -> bytes:
    at = at % (len(seed) + 1)
    return seed[:at] + insert + seed[at + cut :]


def inputs(name: str) -> st.SearchStrategy[bytes]:
    spliced = st.builds(
        _splice,
        st.sampled_from(seeds()[name]),
        st.integers(0, 1 << 16),
        st.integers(0, 8),
        st.binary(max_size=16),
    )
    return st.one_of(st.binary(max_size=512), spliced)
