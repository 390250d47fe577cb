"""Istio's host names and ports, built in one place."""

from __future__ import annotations

from ztagent.names import (
    AGENT_PORTS,
    DEFAULT_DOMAIN_SUFFIX,
    HBONE_PORT,
    qualify_host,
    service_hostname,
)


def test_service_hostname() -> None:
    assert DEFAULT_DOMAIN_SUFFIX == "cluster.local"
    assert service_hostname("echo", "demo") == "echo.demo.svc.cluster.local"
    assert service_hostname("echo", "demo", "corp") == "echo.demo.svc.corp"


def test_short_names_resolve_in_the_objects_namespace() -> None:
    assert qualify_host("reviews", "bookinfo") == "reviews.bookinfo.svc.cluster.local"
    assert qualify_host("reviews.other.svc.cluster.local", "x") == "reviews.other.svc.cluster.local"
    assert qualify_host("example.com", "x") == "example.com"
    assert qualify_host("*", "x") == "*"
    assert qualify_host("fd00::1", "x") == "fd00::1"


def test_agent_ports_are_istios() -> None:
    assert HBONE_PORT == 15008
    assert {15000, 15001, 15006, 15008, 15020, 15021, 15053, 15080} <= AGENT_PORTS
