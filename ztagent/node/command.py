"""`ztagent node`: run the node agent."""

from __future__ import annotations

import argparse
from typing import Any

from ztagent.fdlimit import raise_nofile_limit
from ztagent.identity.manager import check_secret_ttl
from ztagent.node import settings as node_settings


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "node",
        help="run the node agent (the ambient data plane of one node)",
        description="Run the node agent: it reads workloads, services and policies (ztunnel's "
        "local-config YAML, watched), issues certificates for the local workloads from the "
        "embedded CA, carries their connections over HBONE (mTLS on 15008) and enforces L4 "
        "authorization. Every flag can also come from the environment variable named in its "
        "help; the flag wins.",
    )
    node_settings.add_flags(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import uvloop

    from ztagent.node.agent import NodeAgent
    from ztagent.telemetry.accesslog import configure_logging

    if args.cleanup:
        from ztagent.redirect import cleanup

        removed = cleanup()
        for item in removed:
            print(f"removed {item}")
        print(f"capture clean-up done: {len(removed)} item(s) removed")
        return 0
    settings = node_settings.from_args(args)
    check_secret_ttl(settings.secret_ttl)
    configure_logging(args.log_level, settings.log_format)
    raise_nofile_limit()

    async def main() -> int:
        return await NodeAgent(settings).run()

    result: int = uvloop.run(main())
    return result
