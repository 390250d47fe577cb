"""`ztagent lab up | demo | status | down`: a two-node ambient mesh in network namespaces.

The command line: which lab (prefix, ranges, directory, or those recorded in its state file)
and which action (`lifecycle.up`/`down`, `status.print_status`, `demo.run`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ztagent.errors import ZtagentError
from ztagent.lab import lifecycle, state
from ztagent.lab.status import print_status
from ztagent.lab.topology import (
    DEFAULT_POD_CIDR,
    DEFAULT_PREFIX,
    DEFAULT_UNDERLAY_CIDR,
    LabError,
    Plan,
    Settings,
    make_plan,
)

SYSTEM_DIR = Path("/var/lib/ztagent-lab")


def default_dir() -> Path:
    """/var/lib/ztagent-lab when it can be used (root), else ./.lab."""
    if os.geteuid() == 0 and (SYSTEM_DIR.exists() or SYSTEM_DIR.parent.is_dir()):
        return SYSTEM_DIR
    return Path(".lab")


def _plan(args: argparse.Namespace) -> Plan:
    directory = Path(args.dir) if args.dir else default_dir()
    settings = Settings(args.prefix, args.pod_cidr, args.underlay_cidr, directory)
    st = state.load(directory / "state.json")
    if st is not None and (st.prefix, st.pod_cidr, st.underlay_cidr) != (
        settings.prefix,
        settings.pod_cidr,
        settings.underlay_cidr,
    ):
        if args.lab_command in ("up", "demo", "status") and _explicit(args):
            raise LabError(
                f"{directory} holds a lab with prefix {st.prefix!r}, pods {st.pod_cidr}, "
                f"underlay {st.underlay_cidr}: run `ztagent lab down --dir {directory}` first"
            )
        settings = Settings(st.prefix, st.pod_cidr, st.underlay_cidr, directory)
    return make_plan(settings)


def _explicit(args: argparse.Namespace) -> bool:
    return bool(args.explicit_settings)


class _Setting(argparse.Action):
    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.explicit_settings = True


def _run(args: argparse.Namespace) -> int:
    from ztagent.lab import demo  # the checks load gRPC (the echo app's client)

    plan = _plan(args)
    if args.lab_command == "up":
        return lifecycle.up(plan)
    if args.lab_command == "down":
        return lifecycle.down(plan)
    if args.lab_command == "status":
        return print_status(plan)
    if args.lab_command == "upgrade":
        return lifecycle.upgrade(plan, args.nodes)
    return demo.run(plan)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "lab",
        help="a two-node ambient mesh on this host, in network namespaces (root)",
        description=(
            "Build, check and remove a two-node ambient mesh on this Linux host: an underlay "
            "namespace with a bridge, two node namespaces each running `ztagent node`, and pods "
            "(namespaces with veths and /32 routes) running an HTTP echo app."
        ),
    )
    lab_sub = parser.add_subparsers(dest="lab_command", metavar="ACTION", required=True)
    helps = {
        "up": "build the lab and start the agents (takes down a previous one first)",
        "demo": "run the checks: PASS/FAIL per line, exit 0 only when all pass",
        "status": "nodes, pods, enrolment and agent health",
        "down": "stop every lab process and remove every lab namespace (also after a crash)",
        "upgrade": (
            "replace node agents without dropping a connection: a new agent takes over from "
            "each running one, which drains its connections and exits"
        ),
    }
    for name, text in helps.items():
        sub = lab_sub.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=_run, explicit_settings=False)
        sub.add_argument(
            "--prefix",
            default=DEFAULT_PREFIX,
            action=_Setting,
            help=f"name prefix of every namespace and link (default {DEFAULT_PREFIX})",
        )
        sub.add_argument(
            "--pod-cidr",
            default=DEFAULT_POD_CIDR,
            action=_Setting,
            help=f"pod and service range, /22 or larger (default {DEFAULT_POD_CIDR})",
        )
        sub.add_argument(
            "--underlay-cidr",
            default=DEFAULT_UNDERLAY_CIDR,
            action=_Setting,
            help=f"node range (default {DEFAULT_UNDERLAY_CIDR})",
        )
        if name == "upgrade":
            sub.add_argument(
                "nodes", nargs="*", metavar="NODE", help="nodes to upgrade (default: all)"
            )
        sub.add_argument(
            "--dir",
            default=None,
            help=f"state, config, CA and logs (default {SYSTEM_DIR} as root, else ./.lab)",
        )


def main(argv: list[str] | None = None) -> int:
    """`python -m ztagent.lab.command ACTION ...`: the same as `ztagent lab ACTION ...`."""
    parser = argparse.ArgumentParser(prog="ztagent")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["lab", *(sys.argv[1:] if argv is None else argv)])
    try:
        result: int = args.handler(args)
    except ZtagentError as exc:
        print(f"ztagent: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
