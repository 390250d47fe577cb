"""The kustomize overlays render, validate against the Kubernetes API schema offline, and keep
the node agent's security settings, RBAC and drain timing as documented."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import OVERLAYS, VAGRANT, find
from ztagent.node import settings

kubernetes_validate = pytest.importorskip("kubernetes_validate")

KUBERNETES_VERSION = "1.30"  # the Vagrant lab's k3s; the manifests use nothing newer
CRD_GROUPS = {"networking.istio.io", "security.istio.io", "gateway.networking.k8s.io"}
DEMO = [VAGRANT / "demo" / "namespaces.yaml", VAGRANT / "demo" / "apps.yaml"]

# The node agent's capabilities and why (daemonset/base/node-agent.yaml): BPF and PERFMON to
# load the tc program, NET_ADMIN for tc, rules, routes, SO_MARK and IP_TRANSPARENT.
NODE_AGENT_CAPABILITIES = ["BPF", "NET_ADMIN", "PERFMON"]
DRAIN_MARGIN_SECONDS = 5


def _group(obj: dict[str, Any]) -> str:
    api = str(obj["apiVersion"])
    return api.split("/")[0] if "/" in api else ""


def _demo_objects() -> list[dict[str, Any]]:
    return [d for path in DEMO for d in yaml.safe_load_all(path.read_text()) if d]


def _node_agent(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return find(objects, "DaemonSet", "ztagent")


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    matches: list[dict[str, Any]] = [c for c in pod["containers"] if c["name"] == name]
    assert len(matches) == 1
    return matches[0]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_overlays_render_the_expected_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kinds = {name: sorted({o["kind"] for o in objs}) for name, objs in rendered.items()}
    assert kinds["with-istiod"] == ["DaemonSet", "ServiceAccount"]
    assert set(kinds["standalone"]) == {
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "DaemonSet",
        "Deployment",
        "Namespace",
        "Service",
        "ServiceAccount",
    }
    standalone = rendered["standalone"]
    for kind, name in [
        ("Deployment", "ztagent-control"),
        ("Service", "ztagent-control"),
        ("Deployment", "waypoint"),
        ("Service", "waypoint"),
        ("ServiceAccount", "ztagent"),
        ("ServiceAccount", "ztagent-control"),
        ("ServiceAccount", "waypoint"),
    ]:
        assert find(standalone, kind, name)["metadata"]["namespace"] == "ztagent-system"
    assert len([o for o in standalone if o["kind"] == "CustomResourceDefinition"]) == 8


@pytest.mark.parametrize("overlay", [*OVERLAYS, "demo"])
def test_objects_validate_against_the_kubernetes_schema(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    objects = _demo_objects() if overlay == "demo" else rendered[overlay]
    checked = 0
    for obj in objects:
        if _group(obj) in CRD_GROUPS:
            continue  # custom resources: test_crds.py validates them against our CRDs
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {exc.path}")
        checked += 1
    assert checked == len(objects) > 0


def test_validation_catches_a_broken_object(rendered: dict[str, list[dict[str, Any]]]) -> None:
    broken = yaml.safe_load(yaml.safe_dump(_node_agent(rendered["standalone"])))
    broken["spec"]["template"]["spec"]["hostNetwork"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", ["standalone", "with-istiod"])
def test_node_agent_security_settings(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    ds = _node_agent(rendered[overlay])
    pod = ds["spec"]["template"]["spec"]
    container = _container(pod, "node-agent")
    security = container["securityContext"]

    assert "privileged: true" not in yaml.safe_dump(ds)
    assert security["privileged"] is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["capabilities"]["add"] == NODE_AGENT_CAPABILITIES
    assert pod.get("hostPID") is not True and pod.get("hostIPC") is not True
    assert pod["securityContext"]["runAsUser"] == 0

    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["automountServiceAccountToken"] is False

    mounts = {m["name"]: m for m in container["volumeMounts"]}
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host == {
        "bpffs": "/sys/fs/bpf",
        "btf": "/sys/kernel/btf",
        "lib-modules": "/lib/modules",
        "usr-src": "/usr/src",
        "run": "/var/run/ztagent",
    }
    for name, path in host.items():
        assert mounts[name]["mountPath"] == path
        # Only bpffs (pinned maps) and run (the handover socket) are writable; the rest of the
        # host is read-only.
        assert mounts[name].get("readOnly", False) is (name not in ("bpffs", "run"))
    for name in ("istio-token", "root-cert"):
        assert mounts[name]["readOnly"] is True

    probe = container["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/healthz/ready", 15021)
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "15020",
        "prometheus.io/path": "/stats/prometheus",
    }
    tolerations = pod["tolerations"]
    assert {"operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert {"operator": "Exists", "effect": "NoExecute"} in tolerations
    assert {"key": "CriticalAddonsOnly", "operator": "Exists"} in tolerations
    strategy = ds["spec"]["updateStrategy"]
    # Hitless upgrade: the new pod beside the old one, taking over through the handover socket.
    assert strategy == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert "--handover-socket=/var/run/ztagent/handover.sock" in container["args"]
    # On the host network, declared ports are host ports: a surge pod could not be scheduled.
    assert "ports" not in container
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}

    env = _env(container)
    for name, field in [
        ("NODE_NAME", "spec.nodeName"),
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("INSTANCE_IP", "status.podIP"),
    ]:
        assert env[name] == {"fieldRef": {"fieldPath": field}}
    assert env["XDS_ROOT_CA"] == env["CA_ROOT_CA"] == "/var/run/secrets/istio/root-cert.pem"
    assert env["TOKEN_PATH"] == "/var/run/secrets/tokens/istio-token"
    assert env["CLUSTER_ID"] == "Kubernetes"
    assert "--capture" in container["args"]
    token = next(v for v in pod["volumes"] if v["name"] == "istio-token")
    assert token["projected"]["sources"] == [
        {
            "serviceAccountToken": {
                "audience": "istio-ca",
                "expirationSeconds": 43200,
                "path": "istio-token",
            }
        }
    ]
    assert mounts["istio-token"]["mountPath"] == "/var/run/secrets/tokens"
    assert mounts["root-cert"]["mountPath"] == "/var/run/secrets/istio"


@pytest.mark.parametrize("overlay", ["standalone", "with-istiod"])
def test_grace_period_matches_the_drain(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    pod = _node_agent(rendered[overlay])["spec"]["template"]["spec"]
    args = _container(pod, "node-agent")["args"]
    drains = [a for a in args if a.startswith("--drain-timeout=")]
    assert len(drains) == 1, "the drain must be passed explicitly"
    drain = float(drains[0].split("=", 1)[1])
    assert pod["terminationGracePeriodSeconds"] == drain + DRAIN_MARGIN_SECONDS


def test_standalone_wiring(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["standalone"]
    pod = _node_agent(objects)["spec"]["template"]["spec"]
    env = _env(_container(pod, "node-agent"))
    address = "https://ztagent-control.ztagent-system.svc:15012"
    assert env["XDS_ADDRESS"] == env["CA_ADDRESS"] == address
    assert pod["serviceAccountName"] == "ztagent"
    root = next(v for v in pod["volumes"] if v["name"] == "root-cert")
    assert root["configMap"]["name"] == "ztagent-ca-root-cert"

    service = find(objects, "Service", "ztagent-control")
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"grpc-xds": 15012, "http-monitoring": 15014}
    control = find(objects, "Deployment", "ztagent-control")["spec"]["template"]["spec"]
    container = _container(control, "control")
    assert container["args"][:2] == ["control", "--kubernetes"]
    assert "--trusted-node-agents=ztagent-system/ztagent,istio-system/ztunnel" in container["args"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 15014}
    assert control["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    volumes = {v["name"]: v for v in control["volumes"]}
    assert volumes["cacerts"]["secret"]["secretName"] == "cacerts"
    # --ca-dir is writable (the control plane keeps a token-signing key there), filled from the
    # Secret by the init container, and readable by the non-root user through fsGroup.
    assert "emptyDir" in volumes["ca-dir"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert "--ca-dir=" + mounts["ca-dir"] in container["args"]
    init = _container({"containers": control["initContainers"]}, "ca-dir")
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert init_mounts["ca-dir"] == mounts["ca-dir"]
    copied = {Path(a).name for a in init["command"][1:-1]}
    assert copied == {"ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"}
    assert all(a.startswith(init_mounts["cacerts"]) for a in init["command"][1:-1])
    assert control["securityContext"]["fsGroup"] == control["securityContext"]["runAsUser"]

    waypoint = find(objects, "Deployment", "waypoint")
    assert waypoint["spec"]["replicas"] == 0  # a template, copied into application namespaces
    wp = _container(waypoint["spec"]["template"]["spec"], "waypoint")
    assert wp["args"] == ["waypoint"]
    wp_ports = {p["port"] for p in find(objects, "Service", "waypoint")["spec"]["ports"]}
    assert wp_ports == {15008, 15021}


def test_with_istiod_wiring(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["with-istiod"]
    ds = _node_agent(objects)
    pod = ds["spec"]["template"]["spec"]
    env = _env(_container(pod, "node-agent"))
    assert ds["metadata"]["namespace"] == "istio-system"
    assert pod["serviceAccountName"] == "ztunnel"
    assert find(objects, "ServiceAccount", "ztunnel")["metadata"]["namespace"] == "istio-system"
    assert env["XDS_ADDRESS"] == env["CA_ADDRESS"] == "https://istiod.istio-system.svc:15012"
    root = next(v for v in pod["volumes"] if v["name"] == "root-cert")
    assert root["configMap"]["name"] == "istio-ca-root-cert"


def test_vagrant_overlay_uses_the_lab_network(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pod = _node_agent(rendered["vagrant"])["spec"]["template"]["spec"]
    assert _env(_container(pod, "node-agent"))["UPLINK"] == "eth1"


def test_rbac_is_least_privilege(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["standalone"]
    role = find(objects, "ClusterRole", "ztagent-control")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    read = {"get", "list", "watch"}
    expected = {
        (group, resource, verb)
        for group, resources in [
            ("", ["namespaces", "pods", "services"]),
            ("discovery.k8s.io", ["endpointslices"]),
            ("networking.istio.io", ["serviceentries", "virtualservices", "destinationrules"]),
            (
                "security.istio.io",
                ["authorizationpolicies", "peerauthentications", "requestauthentications"],
            ),
            ("gateway.networking.k8s.io", ["gateways", "httproutes"]),
        ]
        for resource in resources
        for verb in read
    } | {("authentication.k8s.io", "tokenreviews", "create")}
    assert granted == expected
    bindings = [o for o in objects if o["kind"] in ("ClusterRoleBinding", "RoleBinding")]
    subjects = [(s["kind"], s["name"]) for b in bindings for s in b["subjects"]]
    assert subjects == [("ServiceAccount", "ztagent-control")]
    assert not [o for o in rendered["with-istiod"] if "Role" in o["kind"]]


def test_demo_namespaces() -> None:
    namespaces = {
        d["metadata"]["name"]: d["metadata"].get("labels", {})
        for d in _demo_objects()
        if d["kind"] == "Namespace"
    }
    assert namespaces["demo"] == {"istio.io/dataplane-mode": "ambient"}
    assert "istio.io/dataplane-mode" not in namespaces["legacy"]


def test_every_manifest_file_is_rendered() -> None:
    """A YAML file under daemonset/ that no kustomization lists would never be applied."""
    listed: set[Path] = set()
    for kustomization in Path(OVERLAYS["standalone"]).parent.rglob("kustomization.yaml"):
        data = yaml.safe_load(kustomization.read_text())
        entries = list(data.get("resources", [])) + [
            p["path"] for p in data.get("patches", []) if "path" in p
        ]
        listed |= {(kustomization.parent / e).resolve() for e in entries}
    files = {
        p.resolve()
        for p in Path(OVERLAYS["standalone"]).parent.rglob("*.yaml")
        if p.name != "kustomization.yaml"
    }
    assert files - listed == set()


@pytest.mark.parametrize("overlay", ["standalone", "with-istiod", "vagrant"])
def test_node_agent_accepts_its_arguments_and_environment(
    overlay: str, rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DaemonSet's args and env, expanded as the kubelet does, are valid `ztagent node`
    settings with the values the manifests mean."""
    pod = _node_agent(rendered[overlay])["spec"]["template"]["spec"]
    container = _container(pod, "node-agent")
    downward = {
        "spec.nodeName": "node-1",
        "metadata.name": "ztagent-abcde",
        "metadata.namespace": "ns",
        "status.podIP": "192.0.2.10",
    }
    env: dict[str, str] = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            env[item["name"]] = downward[item["valueFrom"]["fieldRef"]["fieldPath"]]
    for key in ("LOCAL_XDS_PATH", "BCC_KERNEL_SOURCE", "TRUST_DOMAIN", "LOG_FORMAT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
    assert args[0] == "node"
    parser = argparse.ArgumentParser()
    settings.add_flags(parser)
    parsed = settings.from_args(parser.parse_args(args[1:]))
    assert parsed.capture is True
    assert parsed.drain_timeout + DRAIN_MARGIN_SECONDS == pod["terminationGracePeriodSeconds"]
    assert parsed.uplink == env["UPLINK"]
    assert parsed.node_name == "node-1"
    assert parsed.instance_ip == "192.0.2.10"
    assert parsed.ca_root_ca == "/var/run/secrets/istio/root-cert.pem"
    assert parsed.token_path == "/var/run/secrets/tokens/istio-token"
    assert parsed.xds_address and parsed.local_xds_path == ""
