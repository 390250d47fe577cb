"""The single `ztagent` command. Each feature module registers its own sub-commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ztagent import __version__
from ztagent.errors import ZtagentError
from ztagent.telemetry.accesslog import configure_logging

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    from ztagent import ctl as ctl_command
    from ztagent.control import analyze as analyze_command
    from ztagent.control import command as control_command
    from ztagent.hbone import command as hbone_command
    from ztagent.identity import command as ca_command
    from ztagent.lab import command as lab_command
    from ztagent.node import command as node_command
    from ztagent.waypoint import command as waypoint_command

    parser = argparse.ArgumentParser(
        prog="ztagent",
        description=(
            "ztagent: a sidecarless (ambient) service-mesh node agent. Captured pod traffic is "
            "carried between nodes in HBONE tunnels (HTTP/2 CONNECT over mutual TLS with "
            "SPIFFE identities)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"ztagent {__version__}")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default: info)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    ca_command.register(sub)
    hbone_command.register(sub)
    node_command.register(sub)
    waypoint_command.register(sub)
    control_command.register(sub)
    ctl_command.register(sub)
    lab_command.register(sub)
    analyze_command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)  # text, or JSON when LOG_FORMAT=json
    handler: Handler = args.handler
    try:
        return handler(args)
    except ZtagentError as exc:
        print(f"ztagent: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
