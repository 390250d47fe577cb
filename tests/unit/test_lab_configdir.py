"""The files `lab up` and `lab demo` write: YAML replaced whole, the CA and tokens, the demo's
signing keys and scenario files, removed on the way out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest

from ztagent.lab import configdir
from ztagent.lab.topology import LabError, Plan, Settings, make_plan


@pytest.fixture
def plan(tmp_path: Path) -> Plan:
    return make_plan(Settings(directory=tmp_path / "lab"))


def test_resources_round_trip_and_bad_files_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "config" / "a.yaml"
    documents: list[dict[str, Any]] = [
        {"kind": "Namespace", "metadata": {"name": "demo"}},
        {"kind": "Pod"},
    ]
    configdir.write_resources(path, documents)
    assert configdir.read_resources(path) == documents
    assert [p.name for p in path.parent.iterdir()] == ["a.yaml"]  # no temporary file left
    path.write_text("- a list\n")
    with pytest.raises(LabError, match="every document must be a mapping"):
        configdir.read_resources(path)
    with pytest.raises(LabError, match="cannot read"):
        configdir.read_resources(tmp_path / "missing.yaml")


def test_write_config_makes_the_ca_objects_and_tokens(plan: Plan) -> None:
    plan.ca_dir.mkdir(parents=True)  # an empty CA directory (a failed run) is made again
    configdir.write_config(plan)
    assert sorted(p.name for p in plan.resources_dir.iterdir()) == [
        "namespaces.yaml",
        "pods.yaml",
        "services.yaml",
        "waypoint.yaml",
    ]
    nodes = {node.name: node.name for node in plan.nodes}
    pod = plan.waypoint
    for name, node in [*nodes.items(), (pod.key, pod.node)]:
        path = plan.token_path(name)
        assert path.stat().st_mode & 0o777 == 0o600
        claims = pyjwt.decode(path.read_text(), options={"verify_signature": False})
        assert claims["kubernetes.io"]["node"]["name"] == node
    assert claims["sub"] == f"system:serviceaccount:{pod.namespace}:{pod.service_account}"
    made = sorted((p.name, p.read_bytes()) for p in plan.ca_dir.iterdir() if p.is_file())
    configdir.write_config(plan)  # again: the same CA
    assert sorted((p.name, p.read_bytes()) for p in plan.ca_dir.iterdir() if p.is_file()) == made


def test_signing_keys_persist(tmp_path: Path) -> None:
    one = configdir.jwt_signer(tmp_path / "jwt", "key.pem", "lab")
    again = configdir.jwt_signer(tmp_path / "jwt", "key.pem", "lab")
    assert one.jwks() == again.jwks()
    assert (tmp_path / "jwt" / "key.pem").stat().st_mode & 0o777 == 0o600


def test_scenario_files_are_removed_on_the_way_out(plan: Plan) -> None:
    jwks = configdir.jwt_signer(plan.jwt_dir, "key.pem", "lab").jwks()
    with pytest.raises(RuntimeError), configdir.scenario_files(plan, jwks) as rewrite:
        written = sorted(p.name for p in plan.resources_dir.iterdir())
        assert written and all(name.startswith("l7-") for name in written)
        rewrite(True)
        rewrite(False)
        raise RuntimeError("a check failed")
    assert list(plan.resources_dir.iterdir()) == []
