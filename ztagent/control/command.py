"""`ztagent control`: run the control plane; `ztagent control token`: issue a caller token."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from ztagent.control.translate import DEFAULT_CLUSTER_ID
from ztagent.errors import LocalError
from ztagent.identity.spiffe import DEFAULT_TRUST_DOMAIN
from ztagent.names import (
    CONTROL_MONITORING_PORT,
    CONTROL_PORT,
    DEFAULT_DOMAIN_SUFFIX,
    DEFAULT_ROOT_NAMESPACE,
)

DEFAULT_CA_DIR = "/var/lib/ztagent/control-ca"
DEFAULT_TRUSTED_NODE_AGENTS = "istio-system/ztunnel,ztagent-system/ztagent"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "control",
        help="run the control plane (istiod-compatible workload xDS and CA)",
        description="Read Kubernetes and Istio resources (a watched directory of YAML, or the "
        "Kubernetes API with --kubernetes), validate and translate them, and serve them as "
        "istiod does to ztunnel: delta xDS (istio.workload.Address, istio.security."
        "Authorization) and the CA (IstioCertificateService) on one gRPC port with TLS. "
        "Callers authenticate with a bearer token: tokens made by `ztagent control token` in "
        "directory mode, Kubernetes service-account tokens (TokenReview) with --kubernetes. "
        "Monitoring port: /ready, /metrics, /debug/config_dump.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--config-dir",
        metavar="DIR",
        help="directory of Kubernetes/Istio YAML (multi-document files, watched; default "
        "$CONFIG_DIR or ./config)",
    )
    source.add_argument(
        "--kubernetes",
        action="store_true",
        help="watch the Kubernetes API (in-cluster config, else $KUBECONFIG)",
    )
    parser.add_argument(
        "--listen",
        default=f"0.0.0.0:{CONTROL_PORT}",
        metavar="HOST:PORT",
        help="gRPC (default %(default)s)",
    )
    parser.add_argument(
        "--admin",
        default=f"127.0.0.1:{CONTROL_MONITORING_PORT}",
        metavar="HOST:PORT",
        help="monitoring HTTP (default %(default)s)",
    )
    _ca_dir_flag(parser)
    parser.add_argument(
        "--serving-name",
        action="append",
        default=[],
        metavar="NAME",
        help="DNS name or IP for the gRPC serving certificate (repeatable; default localhost "
        "plus the --listen address)",
    )
    _trust_domain_flag(parser)
    parser.add_argument("--cluster-id", default=os.environ.get("CLUSTER_ID", DEFAULT_CLUSTER_ID))
    parser.add_argument("--root-namespace", default=DEFAULT_ROOT_NAMESPACE)
    parser.add_argument("--domain-suffix", default=DEFAULT_DOMAIN_SUFFIX)
    parser.add_argument(
        "--trusted-node-agents",
        default=DEFAULT_TRUSTED_NODE_AGENTS,
        metavar="NS/SA,...",
        help="service accounts allowed to request certificates for workloads on their node "
        "(default %(default)s)",
    )
    parser.set_defaults(handler=_serve)

    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    token = actions.add_parser(
        "token",
        help="issue a bearer token for a node agent or workload (directory mode)",
        description="Print (or write with -o) a token the control plane accepts, shaped like a "
        "Kubernetes projected service-account token: it names the service account and, for a "
        "node agent, the node it runs on.",
    )
    _ca_dir_flag(token)
    _trust_domain_flag(token)
    token.add_argument("--namespace", required=True)
    token.add_argument("--service-account", required=True)
    token.add_argument("--node", help="bind the token to this node (node agents)")
    token.add_argument("--pod", help="bind the token to this pod name")
    token.add_argument("--ttl", type=int, default=365 * 24 * 3600, help="seconds")
    token.add_argument("-o", "--output", metavar="FILE", help="write here (mode 0600)")
    token.set_defaults(handler=_token)


def _ca_dir_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ca-dir",
        default=DEFAULT_CA_DIR,
        metavar="DIR",
        help="CA material (istiod cacerts layout; created when empty) and the token signing "
        "key (default %(default)s)",
    )


def _trust_domain_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-domain", default=os.environ.get("TRUST_DOMAIN", DEFAULT_TRUST_DOMAIN)
    )


def _token(args: argparse.Namespace) -> int:
    from ztagent.control.auth import TOKEN_SIGNING_KEY, TokenSigner
    from ztagent.identity.ca import CertificateAuthority
    from ztagent.identity.certs import write_file

    ca_dir = Path(args.ca_dir)
    CertificateAuthority.load_or_create(ca_dir, args.trust_domain)
    signer = TokenSigner(ca_dir / TOKEN_SIGNING_KEY, trust_domain=args.trust_domain)
    token = signer.issue(
        args.namespace, args.service_account, node=args.node, pod=args.pod, ttl=args.ttl
    )
    if args.output:
        write_file(args.output, token.encode(), 0o600)
    else:
        sys.stdout.write(token + "\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    if getattr(args, "action", None):
        raise LocalError(f"unknown action {args.action}")
    from ztagent.control.server import ControlServer, ControlSettings

    config_dir = None
    if not args.kubernetes:
        config_dir = Path(args.config_dir or os.environ.get("CONFIG_DIR") or "config")
    trusted = frozenset(a.strip() for a in args.trusted_node_agents.split(",") if a.strip())
    for account in trusted:
        if account.count("/") != 1:
            raise LocalError(f"--trusted-node-agents: {account!r} is not NAMESPACE/SERVICEACCOUNT")
    settings = ControlSettings(
        config_dir=config_dir,
        kubernetes=args.kubernetes,
        listen=args.listen,
        admin=args.admin,
        ca_dir=Path(args.ca_dir),
        trust_domain=args.trust_domain,
        cluster_id=args.cluster_id,
        root_namespace=args.root_namespace,
        domain_suffix=args.domain_suffix,
        trusted_node_agents=trusted,
        serving_names=tuple(args.serving_name),
    )
    from ztagent.fdlimit import raise_nofile_limit

    raise_nofile_limit()
    asyncio.run(ControlServer(settings).run_forever())
    return 0
