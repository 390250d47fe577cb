"""The state of one tunnel's app leg, and the transitions between states, without I/O.

A leg starts HOLDING: the tunnel is not up, so bytes the app sends are held and bytes the
tunnel delivers are kept, both for later. What happens next depends on the side:

    state      event          -> next state  when
    HOLDING    CONNECT_SENT   -> OPENING     client: the CONNECT is out; the app's bytes follow it
                                             (RFC 9113 8.5) before the response is in
    HOLDING    ACCEPTED       -> RELAYING    server: the CONNECT was answered 200
    OPENING    ESTABLISHED    -> RELAYING    client: the response is 200
    HOLDING    RELEASED       -> CLOSED      the leg left its connection (any reason: refused,
    OPENING    RELEASED       -> CLOSED      reset, both directions ended, the app or the
    RELAYING   RELEASED       -> CLOSED      connection went away)

Bytes flow in every state but HOLDING (the data path tests `state is not HOLDING`, once per
read or frame). CLOSED is final. Any other pair is a bug in the caller: `next_state` raises.
"""

from __future__ import annotations

import enum

from ztagent.errors import LocalError


class TunnelState(enum.Enum):
    HOLDING = "holding"
    OPENING = "opening"
    RELAYING = "relaying"
    CLOSED = "closed"


class TunnelEvent(enum.Enum):
    CONNECT_SENT = "connect sent"
    ACCEPTED = "accepted"
    ESTABLISHED = "established"
    RELEASED = "released"


HOLDING = TunnelState.HOLDING
OPENING = TunnelState.OPENING
RELAYING = TunnelState.RELAYING
CLOSED = TunnelState.CLOSED

TRANSITIONS: dict[tuple[TunnelState, TunnelEvent], TunnelState] = {
    (HOLDING, TunnelEvent.CONNECT_SENT): OPENING,
    (HOLDING, TunnelEvent.ACCEPTED): RELAYING,
    (OPENING, TunnelEvent.ESTABLISHED): RELAYING,
    (HOLDING, TunnelEvent.RELEASED): CLOSED,
    (OPENING, TunnelEvent.RELEASED): CLOSED,
    (RELAYING, TunnelEvent.RELEASED): CLOSED,
}


def next_state(state: TunnelState, event: TunnelEvent) -> TunnelState:
    """The state after `event`; raises `LocalError` for a pair the table does not allow."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise LocalError(f"HBONE tunnel: {event.value} when {state.value}") from None
