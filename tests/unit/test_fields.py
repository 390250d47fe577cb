"""The shared field readers: one reading of each kind of value, the same error wording."""

from __future__ import annotations

import ipaddress
from fractions import Fraction

import pytest

from ztagent.fields import (
    Invalid,
    boolean,
    cidr,
    duration,
    gateway_duration,
    integer,
    ip,
    number,
    parse_go_duration,
    port,
)


@pytest.mark.parametrize(("value", "expected"), [(80, 80), ("8080", 8080), (65535, 65535)])
def test_port_reads_integers_and_ascii_digit_strings(value: object, expected: int) -> None:
    assert port(value, "p") == expected


@pytest.mark.parametrize(
    "value", [0, 65536, -1, True, "\uff18\uff10", "80a", "", "123456", 8.0, None]
)
def test_port_refuses_everything_else(value: object) -> None:
    with pytest.raises(Invalid, match="is not a port number"):
        port(value, "spec.port")


def test_port_low_bound_is_the_callers() -> None:
    assert port(0, "p", low=0) == 0
    with pytest.raises(Invalid, match=r"\(0-65535\)"):
        port(-1, "p", low=0)


def test_integer_and_number_ranges() -> None:
    assert integer(5, "n", 0, 10) == 5
    with pytest.raises(Invalid, match="must be an integer, got a boolean"):
        integer(True, "n", 0, 10)
    with pytest.raises(Invalid, match="11 is not in 0-10"):
        integer(11, "n", 0, 10)
    assert number(2.5, "n", 0, 10) == 2.5
    with pytest.raises(Invalid, match="must be a number, got a string"):
        number("1", "n", 0, 10)


def test_ip_and_cidr() -> None:
    assert ip("10.0.0.1", "a") == ipaddress.ip_address("10.0.0.1")
    assert cidr("10.0.0.7/8", "a") == ipaddress.ip_network("10.0.0.0/8")
    assert cidr("fd00::1", "a") == ipaddress.ip_network("fd00::1/128")
    with pytest.raises(Invalid, match="is not an IP address"):
        ip("10.0.0", "a")
    with pytest.raises(Invalid, match="must be an IP or CIDR string, got a number"):
        cidr(10, "a")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", Fraction(0)),
        ("1.5s", Fraction(3, 2)),
        ("100ms", Fraction(1, 10)),
        ("1h30m", Fraction(5400)),
        ("+2s", Fraction(2)),
        ("250us", Fraction(1, 4000)),
        ("250µs", Fraction(1, 4000)),
        ("250μs", Fraction(1, 4000)),
        (".5s", Fraction(1, 2)),
    ],
)
def test_go_durations(text: str, seconds: Fraction) -> None:
    assert parse_go_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "-1s", "1", "1x", "\u0661s", "1.5", "s", "+"])
def test_go_durations_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


def test_duration_field_follows_istio_validation() -> None:
    assert duration("1.5s", "t") == 1.5
    with pytest.raises(Invalid, match="at least 1ms"):
        duration("500us", "t")
    with pytest.raises(Invalid, match="whole milliseconds"):
        duration("1.0005s", "t")
    with pytest.raises(Invalid, match="is not a duration"):
        duration("soon", "t")
    with pytest.raises(Invalid, match="must be a duration string"):
        duration(5, "t")
    assert duration("0", "t", minimum=Fraction(0)) == 0.0


def test_port_typed_integer_refuses_digit_strings_in_integer_wording() -> None:
    assert port(8080, "p", digit_strings=False) == 8080
    with pytest.raises(Invalid, match="must be an integer, got a string"):
        port("8080", "p", digit_strings=False)
    with pytest.raises(Invalid, match="70000 is not in 1-65535"):
        port(70000, "p", digit_strings=False)


def test_boolean() -> None:
    assert boolean(None, "b") is False
    assert boolean(True, "b") is True
    with pytest.raises(Invalid, match="must be a boolean, got a string"):
        boolean("true", "b")


@pytest.mark.parametrize(
    ("text", "seconds"), [("10s", 10.0), ("500ms", 0.5), ("1h30m", 5400.0), ("0s", 0.0)]
)
def test_gateway_durations(text: str, seconds: float) -> None:
    assert gateway_duration(text, "t") == seconds


@pytest.mark.parametrize("text", ["1.5s", "-1s", "+1s", "123456s", "1d", "1s1s1s1s1s", "\u0661s"])
def test_gateway_durations_refused(text: str) -> None:
    with pytest.raises(Invalid, match="is not a Gateway API duration"):
        gateway_duration(text, "t")
