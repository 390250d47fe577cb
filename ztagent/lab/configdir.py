"""The files the lab writes for the control plane and its processes: the Kubernetes and Istio
objects (YAML files, each replaced whole), the CA, the node agents' and the waypoint's tokens,
and the demo's JWT signing keys and L7 scenario files.

`write_config` is step 1 of `lab up`; the demo adds and removes its own objects with
`write_resources` and `scenario_files`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from ztagent.control.auth import TOKEN_SIGNING_KEY, TokenSigner
from ztagent.identity.ca import CertificateAuthority
from ztagent.identity.certs import write_file
from ztagent.lab.resources import JwtSigner, lab_resources, scenario_resources
from ztagent.lab.topology import (
    AGENT_NAMESPACE,
    AGENT_SERVICE_ACCOUNT,
    TRUST_DOMAIN,
    LabError,
    Plan,
)


def write_config(plan: Plan) -> None:
    """The CA (made once; an empty directory is made again), every object of `lab_resources`
    in the control plane's directory, and the tokens."""
    if plan.ca_dir.exists() and not any(plan.ca_dir.iterdir()):
        plan.ca_dir.rmdir()
    CertificateAuthority.load_or_create(plan.ca_dir, TRUST_DOMAIN)
    for name, documents in lab_resources(plan).items():
        write_resources(plan.resources_dir / name, documents)
    issue_tokens(plan)


def write_resources(path: Path, documents: list[dict[str, Any]]) -> None:
    """Replace one YAML file at once, so the control plane never reads half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    os.replace(tmp, path)


def read_resources(path: Path) -> list[dict[str, Any]]:
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as exc:
        raise LabError(f"cannot read {path}: {exc}") from None
    if not all(isinstance(d, dict) for d in documents):
        raise LabError(f"{path}: every document must be a mapping")
    return documents


def issue_tokens(plan: Plan) -> None:
    """One token per node agent, bound to its node (the CA lets it ask for that node's pods),
    and the waypoint's, for its own service account and pod (what `ztagent control token
    --namespace demo --service-account waypoint --node node-b --pod b-waypt` writes)."""
    signer = TokenSigner(plan.ca_dir / TOKEN_SIGNING_KEY, trust_domain=TRUST_DOMAIN)
    tokens: list[tuple[str, str]] = []
    for node in plan.nodes:
        token = signer.issue(
            AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT, node=node.name, pod=f"ztagent-{node.name}"
        )
        tokens.append((node.name, token))
    waypoint = plan.waypoint
    token = signer.issue(
        waypoint.namespace, waypoint.service_account, node=waypoint.node, pod=waypoint.key
    )
    tokens.append((waypoint.key, token))
    for name, token in tokens:
        path = plan.token_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, token.encode(), 0o600)


def jwt_signer(directory: Path, name: str, kid: str) -> JwtSigner:
    """The key in `directory/name`, made on first use."""
    path = directory / name
    if path.exists():
        return JwtSigner.from_pem(path.read_bytes(), kid)
    key = JwtSigner.generate(kid)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, key.pem(), 0o600)
    return key


def _files(plan: Plan, outlier: bool, jwks: str) -> list[Path]:
    paths = []
    for name, documents in scenario_resources(plan, jwks, outlier).items():
        path = plan.resources_dir / name
        write_resources(path, documents)
        paths.append(path)
    return paths


@contextmanager
def scenario_files(plan: Plan, jwks: str) -> Iterator[Callable[[bool], None]]:
    """Write the L7 objects (outlier detection off); yield a function that rewrites them with
    it on or off; remove them on the way out."""
    written = _files(plan, False, jwks)
    try:
        yield lambda outlier: written.extend(_files(plan, outlier, jwks))
    finally:
        for path in set(written):
            path.unlink(missing_ok=True)
