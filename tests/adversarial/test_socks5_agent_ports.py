"""The agent's own ports are never a SOCKS5 destination on this host's addresses: a local
workload must not reach the admin port (`/quitquitquit`) or any other agent listener."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.adversarial._socks5_harness import ask, request_v4, request_v6, socks5_listener
from ztagent.names import AGENT_PORTS
from ztagent.socks5.handshake import Reply

pytestmark = pytest.mark.integration


def test_every_agent_port_is_in_the_list() -> None:
    assert {15000, 15001, 15006, 15008, 15020, 15021, 15053, 15080, 15090} <= AGENT_PORTS


@pytest.mark.parametrize("port", sorted(AGENT_PORTS))
@pytest.mark.parametrize(
    "request_for",
    [
        lambda p: request_v4("127.0.0.1", p),
        lambda p: request_v4("127.0.0.53", p),
        lambda p: request_v4("0.0.0.0", p),
        lambda p: request_v6("::1", p),
        lambda p: request_v6("::ffff:127.0.0.1", p),
    ],
    ids=["127.0.0.1", "127.0.0.53", "0.0.0.0", "::1", "::ffff:127.0.0.1"],
)
def test_agent_ports_on_own_addresses_are_refused(
    port: int, request_for: Callable[[int], bytes]
) -> None:
    with socks5_listener() as running:
        assert ask(running.port, request_for(port)) == Reply.NOT_ALLOWED
        assert running.handed_on == []


def test_other_ports_and_other_hosts_go_on() -> None:
    with socks5_listener() as running:
        assert ask(running.port, request_v4("127.0.0.1", 8080)) == Reply.SUCCEEDED
        # 15000 on an address that is not this host's is someone else's service.
        assert ask(running.port, request_v4("192.0.2.7", 15000)) == Reply.SUCCEEDED
        assert running.handed_on == [("127.0.0.1", 8080), ("192.0.2.7", 15000)]
