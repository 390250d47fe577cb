"""Bounded fuzz runs of the config readers (local config, YAML streams, Istio resources).

The long runs use the same targets with atheris: `python -m tests.fuzz.run <target>`.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from .strategies import FUZZ_SETTINGS, inputs
from .targets import TARGETS, seeds

CONFIG = [
    "localconfig",
    "translate",
    "routes",
    "destination",
    "authorization",
    "request_authentication",
    "route_request",
    "authorization_request",
]


@pytest.mark.parametrize("name", CONFIG)
def test_seeds(name: str) -> None:
    for seed in seeds()[name]:
        TARGETS[name](seed)


@pytest.mark.parametrize("name", CONFIG)
@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz(name: str, data: st.DataObject) -> None:
    TARGETS[name](data.draw(inputs(name)))


def test_every_target_runs_in_ci() -> None:
    from .test_fuzz_wire import WIRE

    assert sorted(WIRE + CONFIG) == sorted(TARGETS)
