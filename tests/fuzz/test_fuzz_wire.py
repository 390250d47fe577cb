"""Bounded fuzz runs of the wire parsers (HBONE, SOCKS5, xDS, trace context, JWT).

The long runs use the same targets with atheris: `python -m tests.fuzz.run <target>`.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from .strategies import FUZZ_SETTINGS, inputs
from .targets import TARGETS, seeds

WIRE = [
    "hbone_server",
    "hbone_client",
    "hbone_headers",
    "forwarded",
    "waypoint_http1",
    "admin_http",
    "socks5",
    "xds_address",
    "xds_authorization",
    "xds_l7",
    "traceparent",
    "jwt",
    "jwks",
]


@pytest.mark.parametrize("name", WIRE)
def test_seeds(name: str) -> None:
    for seed in seeds()[name]:
        TARGETS[name](seed)


@pytest.mark.parametrize("name", WIRE)
@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz(name: str, data: st.DataObject) -> None:
    TARGETS[name](data.draw(inputs(name)))
