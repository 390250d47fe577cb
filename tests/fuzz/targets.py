"""Every fuzz target by name, and its seed inputs.

A target is `fuzz_<name>(data: bytes) -> None`: it returns when the parser produced a value or
refused the input with its documented error, and lets anything else escape. The same function
runs under Hypothesis in CI (`test_fuzz_*.py`, bounded) and under atheris for long runs
(`python -m tests.fuzz.run <name> -runs=1000000`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from . import targets_config as config
from . import targets_request as request
from . import targets_wire as wire

Target = Callable[[bytes], None]

TARGETS: dict[str, Target] = {
    "hbone_server": wire.fuzz_hbone_server,
    "hbone_client": wire.fuzz_hbone_client,
    "hbone_headers": wire.fuzz_hbone_headers,
    "forwarded": wire.fuzz_forwarded,
    "waypoint_http1": wire.fuzz_waypoint_http1,
    "admin_http": wire.fuzz_admin_http,
    "socks5": wire.fuzz_socks5,
    "xds_address": wire.fuzz_xds_address,
    "xds_authorization": wire.fuzz_xds_authorization,
    "xds_l7": wire.fuzz_xds_l7,
    "traceparent": wire.fuzz_traceparent,
    "jwt": wire.fuzz_jwt,
    "jwks": wire.fuzz_jwks,
    "localconfig": config.fuzz_localconfig,
    "translate": config.fuzz_translate,
    "routes": config.fuzz_routes,
    "destination": config.fuzz_destination,
    "authorization": config.fuzz_authorization,
    "request_authentication": config.fuzz_request_authentication,
    "route_request": request.fuzz_route_request,
    "authorization_request": request.fuzz_authorization_request,
}


@functools.cache
def seeds() -> dict[str, list[bytes]]:
    """Valid inputs to start from, per target (each target also accepts any bytes)."""
    found = {**wire.wire_seeds(), **config.config_seeds(), **request.request_seeds()}
    assert set(found) == set(TARGETS), set(found) ^ set(TARGETS)
    return found
