"""The client address a CONNECT carries in its `forwarded` header."""

from __future__ import annotations

import pytest

from ztagent.hbone.server import InboundRequest
from ztagent.identity.spiffe import Identity


def request(forwarded: str | None) -> InboundRequest:
    headers = [("forwarded", forwarded)] if forwarded is not None else []
    return InboundRequest(
        1,
        "10.0.0.2:80",
        ("10.0.0.2", 80),
        headers,
        Identity("cluster.local", "a", "b"),
        ("10.0.0.2", 15008),
        ("10.0.0.1", 40000),
    )


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('for="10.1.2.3:5000"', "10.1.2.3"),
        ('for="10.1.2.3:5000";host=echo.prod.svc.cluster.local', "10.1.2.3"),
        ('for="[fd00::7]:5000"', "fd00::7"),
        ("for=10.1.2.3", "10.1.2.3"),
        ('host=x;for="[fd00::7]"', "fd00::7"),
        ('for="not-an-address"', None),
        ("proto=https", None),
        (None, None),
    ],
)
def test_forwarded_for(header: str | None, expected: str | None) -> None:
    assert request(header).forwarded_client_ip() == expected
