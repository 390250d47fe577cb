"""eBPF capture on real namespaces: a node, two pods on routed veths, a transparent "agent".

    ztt-pod1 10.233.1.1 --veth ztt-p1 / ztt-p1h--+
                                                  ztt-node (forwarding, agent on 15001/15006/15008)
    ztt-pod2 10.233.2.1 --veth ztt-p2 / ztt-p2h--+

The agent is a small Python process in ztt-node with IP_TRANSPARENT listeners that answers each
connection with the port it listened on and the accepted socket's local (original destination)
and peer address. pod2 runs a plain server on 8080 that answers the same way. Every namespace
and process is removed in `finally`, even when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

NODE, POD1, POD2 = "ztt-node", "ztt-pod1", "ztt-pod2"
POD1_IP, POD2_IP, GATEWAY = "10.233.1.1", "10.233.2.1", "10.233.0.1"
SERVER_PORT = 8080

HELPER = textwrap.dedent(
    """
    import socket, sys, threading

    def serve(sock, label):
        while True:
            conn, peer = sock.accept()
            port = sock.getsockname()[1]
            local = conn.getsockname()
            line = f"{label} {port} local={local[0]}:{local[1]} peer={peer[0]}:{peer[1]}"
            print(line, flush=True)
            try:
                conn.sendall((line + "\\n").encode())
            finally:
                conn.close()

    mode = sys.argv[1]
    if mode == "listen":
        label = sys.argv[2]
        threads = []
        for port in sys.argv[3:]:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
            s.bind(("0.0.0.0", int(port)))
            s.listen(64)
            t = threading.Thread(target=serve, args=(s, label), daemon=True)
            t.start()
            threads.append(t)
        print("ready", flush=True)
        for t in threads:
            t.join()
    elif mode == "connect":
        try:
            timeout = float(sys.argv[4])
            c = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=timeout)
            c.settimeout(timeout)
            data = b""
            while not data.endswith(b"\\n"):
                chunk = c.recv(4096)
                if not chunk:
                    break
                data += chunk
            print(data.decode().strip() or "EMPTY")
        except OSError as exc:
            print(f"ERROR {type(exc).__name__} {exc}")
    """
)


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=30)


def _ns(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run("ip", "netns", "exec", ns, *args, check=check)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not Path("/sys/kernel/btf/vmlinux").is_file():
        return "the kernel has no BTF (/sys/kernel/btf/vmlinux)"
    from ztagent.redirect.bccenv import ensure_bcc_importable, kernel_build_tree
    from ztagent.redirect.errors import CaptureError

    try:
        ensure_bcc_importable()
    except CaptureError as exc:
        return f"BCC unavailable: {exc}"
    try:
        kernel_build_tree()
    except CaptureError as exc:
        return f"kernel headers unavailable: {exc}"
    return None


class Lab:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.helper = workdir / "helper.py"
        self.helper.write_text(HELPER)
        self.procs: list[subprocess.Popen[str]] = []
        self.agent: subprocess.Popen[str] | None = None
        self.server_log = workdir / "server.log"

    # ---------------------------------------------------------------- topology

    def build(self) -> None:
        for ns in (NODE, POD1, POD2):
            _run("ip", "netns", "add", ns)
        _ns(NODE, "ip", "link", "set", "lo", "up")
        _ns(NODE, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for ns, ip, pod_dev, host_dev in (
            (POD1, POD1_IP, "ztt-p1", "ztt-p1h"),
            (POD2, POD2_IP, "ztt-p2", "ztt-p2h"),
        ):
            _run("ip", "link", "add", pod_dev, "netns", ns, "type", "veth", "peer", "name",
                 host_dev, "netns", NODE)  # fmt: skip
            _ns(ns, "ip", "link", "set", "lo", "up")
            _ns(ns, "ip", "addr", "add", f"{ip}/32", "dev", pod_dev)
            _ns(ns, "ip", "link", "set", pod_dev, "up")
            _ns(ns, "ip", "route", "add", f"{GATEWAY}/32", "dev", pod_dev)
            _ns(ns, "ip", "route", "add", "default", "via", GATEWAY, "dev", pod_dev)
            _ns(NODE, "ip", "addr", "add", f"{GATEWAY}/32", "dev", host_dev)
            _ns(NODE, "ip", "link", "set", host_dev, "up")
            _ns(NODE, "ip", "route", "add", f"{ip}/32", "dev", host_dev)
        # a spare veth pair inside the node, for the priority-conflict check
        _ns(NODE, "ip", "link", "add", "ztt-x0", "type", "veth", "peer", "name", "ztt-x1")
        _ns(NODE, "ip", "link", "set", "ztt-x0", "up")
        _ns(NODE, "ip", "link", "set", "ztt-x1", "up")

    def teardown(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        for ns in (POD1, POD2, NODE):
            _run("ip", "netns", "del", ns, check=False)

    # ---------------------------------------------------------------- processes

    def spawn(
        self, ns: str, label: str, *ports: int, log: Path | None = None
    ) -> subprocess.Popen[str]:
        out = log.open("a") if log is not None else subprocess.PIPE
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-u", str(self.helper), "listen",
             label, *map(str, ports)],
            stdout=out, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.procs.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"{label} exited: {proc.stderr.read() if proc.stderr else ''}")
            ready = (
                "ready" in log.read_text()
                if log is not None
                else _ns(ns, "ss", "-Hltn", f"sport = :{ports[0]}").stdout.strip() != ""
            )
            if ready:
                return proc
            time.sleep(0.05)
        raise AssertionError(f"{label} did not start listening")

    def start_agent(self) -> None:
        self.agent = self.spawn(NODE, "agent", 15001, 15006, 15008)

    def kill_agent(self) -> None:
        assert self.agent is not None
        self.agent.kill()
        self.agent.wait(timeout=5)
        self.agent = None

    def connect(self, ns: str, ip: str, port: int, timeout: float = 3.0) -> str:
        return _ns(ns, sys.executable, str(self.helper), "connect", ip, str(port),
                   str(timeout)).stdout.strip()  # fmt: skip

    def server_lines(self) -> list[str]:
        text = self.server_log.read_text() if self.server_log.exists() else ""
        return [line for line in text.splitlines() if line.startswith("server")]


def _tc_ingress(dev: str) -> str:
    return _ns(NODE, "tc", "filter", "show", "dev", dev, "ingress").stdout


def _foreign_u32(dev: str, prio: int) -> None:
    _ns(NODE, "tc", "qdisc", "replace", "dev", dev, "clsact")
    _ns(NODE, "tc", "filter", "add", "dev", dev, "ingress", "prio", str(prio), "protocol", "ip",
        "u32", "match", "ip", "dst", "10.233.250.250/32")  # fmt: skip


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    reason = _skip_reason()
    if reason is not None:
        print(f"SKIP eBPF capture tests: {reason}")
        pytest.skip(reason)
    for ns in (NODE, POD1, POD2):  # leftovers of an earlier interrupted run of this file
        _run("ip", "netns", "del", ns, check=False)
    with tempfile.TemporaryDirectory(prefix="ztt-") as tmp:
        lab = Lab(Path(tmp))
        try:
            lab.build()
            lab.spawn(POD2, "server", SERVER_PORT, log=lab.server_log)
            yield lab
        finally:
            lab.teardown()


def test_capture_end_to_end(lab: Lab) -> None:
    from ztagent.redirect import Capture
    from ztagent.redirect.errors import FilterConflictError

    _foreign_u32("ztt-p1h", 40000)  # a filter of someone else, after ours
    _foreign_u32("ztt-x0", 1339)  # someone else at our priority
    capture = Capture(netns=NODE)
    try:
        capture.start()
        with pytest.raises(FilterConflictError, match="priority 1339"):
            capture.attach_pod_veth("ztt-x0")
        p1h = capture.host_veth_for(POD1_IP)
        assert p1h == capture.attach_pod_veth("ztt-p1h")
        capture.attach_pod_veth("ztt-p2h")
        assert "ztagent_redirect" in _tc_ingress("ztt-p1h")

        # not enrolled: direct
        lab.start_agent()
        reply = lab.connect(POD1, POD2_IP, SERVER_PORT)
        assert reply.startswith(f"server {SERVER_PORT} local={POD2_IP}:{SERVER_PORT} "
                                f"peer={POD1_IP}:"), reply  # fmt: skip

        # enrolled: captured, the agent sees the original destination
        capture.enrol_pod(POD1_IP, p1h)
        before = len(lab.server_lines())
        reply = lab.connect(POD1, POD2_IP, SERVER_PORT)
        assert reply.startswith(f"agent 15001 local={POD2_IP}:{SERVER_PORT} peer={POD1_IP}:"), reply
        assert len(lab.server_lines()) == before

        # inbound to the enrolled pod, from a pod that is not enrolled
        reply = lab.connect(POD2, POD1_IP, 15008)
        assert reply.startswith(f"agent 15008 local={POD1_IP}:15008 peer={POD2_IP}:"), reply
        reply = lab.connect(POD2, POD1_IP, 9999)
        assert reply.startswith(f"agent 15006 local={POD1_IP}:9999 peer={POD2_IP}:"), reply

        # unenrol: direct again; re-enrol: captured again, same program
        prog = _tc_ingress("ztt-p1h")
        capture.unenrol_pod(POD1_IP)
        reply = lab.connect(POD1, POD2_IP, SERVER_PORT)
        assert reply.startswith(f"server {SERVER_PORT} "), reply
        capture.enrol_pod(POD1_IP, p1h)
        reply = lab.connect(POD1, POD2_IP, SERVER_PORT)
        assert reply.startswith("agent 15001 "), reply
        assert _tc_ingress("ztt-p1h") == prog  # same filter, same program id

        # agent gone: captured SYNs are refused with a reset, nothing reaches the server
        lab.kill_agent()
        before = len(lab.server_lines())
        reply = lab.connect(POD1, POD2_IP, SERVER_PORT, timeout=2.0)
        assert reply.startswith("ERROR"), reply
        reply = lab.connect(POD2, POD1_IP, 9999, timeout=2.0)
        assert reply.startswith("ERROR"), reply
        time.sleep(0.2)
        assert len(lab.server_lines()) == before

        # agent back: captured again
        lab.start_agent()
        reply = lab.connect(POD1, POD2_IP, SERVER_PORT)
        assert reply.startswith("agent 15001 "), reply
    finally:
        capture.stop()

    # nothing of ours is left; the foreign filters are intact
    for dev in ("ztt-p1h", "ztt-p2h", "ztt-x0"):
        assert "ztagent_redirect" not in _tc_ingress(dev)
    assert "pref 40000" in _tc_ingress("ztt-p1h")
    assert "pref 1339" in _tc_ingress("ztt-x0")
    assert "lookup 133" not in _ns(NODE, "ip", "rule", "show").stdout
    assert _ns(NODE, "ip", "route", "show", "table", "133", check=False).stdout.strip() == ""
    # and traffic is direct again
    reply = lab.connect(POD1, POD2_IP, SERVER_PORT)
    assert reply.startswith(f"server {SERVER_PORT} "), reply


def _tcp_in_segments(ns: str) -> int:
    """Segments the namespace's TCP stack has received (`/proc/net/snmp`, per netns)."""
    lines = [line.split() for line in _ns(ns, "cat", "/proc/net/snmp").stdout.splitlines()]
    tcp = [line for line in lines if line and line[0] == "Tcp:"]
    return int(tcp[1][tcp[0].index("InSegs")])


def test_syn_cookie_flows_stay_captured(lab: Lab) -> None:
    """With the listener answering in SYN cookies (its SYN queue full, forced here with
    tcp_syncookies=2), the handshake's ACK and the data have no socket yet: they must go to the
    listener too, not be routed as plain IP to the destination."""
    from ztagent.redirect import Capture

    capture = Capture(netns=NODE)
    try:
        capture.start()
        p1h = capture.attach_pod_veth("ztt-p1h")
        capture.attach_pod_veth("ztt-p2h")
        if lab.agent is None:
            lab.start_agent()
        capture.enrol_pod(POD1_IP, p1h)
        _ns(NODE, "sysctl", "-qw", "net.ipv4.tcp_syncookies=2")
        before = len(lab.server_lines())
        segments = _tcp_in_segments(POD2)
        for _ in range(3):
            reply = lab.connect(POD1, POD2_IP, SERVER_PORT)
            assert reply.startswith(f"agent 15001 local={POD2_IP}:{SERVER_PORT} "), reply
        # not one packet of pod1's captured flows reached pod2
        assert len(lab.server_lines()) == before
        assert _tcp_in_segments(POD2) == segments, "pod1's captured packets reached pod2"
        # inbound to the enrolled pod, in cookies as well
        reply = lab.connect(POD2, POD1_IP, 9999)
        assert reply.startswith(f"agent 15006 local={POD1_IP}:9999 peer={POD2_IP}:"), reply
    finally:
        _ns(NODE, "sysctl", "-qw", "net.ipv4.tcp_syncookies=1", check=False)
        capture.stop()


def test_cleanup_removes_leftovers_of_a_crashed_agent(lab: Lab) -> None:
    from ztagent.redirect import cleanup

    script = textwrap.dedent(
        f"""
        import os
        from ztagent.redirect import Capture
        c = Capture()
        c.start(["ztt-p1h", "ztt-p2h"])
        c.enrol_pod({POD1_IP!r}, c.host_veth_for({POD1_IP!r}))
        print("started", flush=True)
        os._exit(0)
        """
    )
    if lab.agent is not None:
        lab.kill_agent()
    result = _ns(NODE, sys.executable, "-c", script, check=False)
    assert "started" in result.stdout, result.stderr
    assert "ztagent_redirect" in _tc_ingress("ztt-p1h")
    assert "lookup 133" in _ns(NODE, "ip", "rule", "show").stdout
    # the leftover program still fails closed: no agent listener, SYN dropped
    reply = lab.connect(POD1, POD2_IP, SERVER_PORT, timeout=1.5)
    assert reply.startswith("ERROR"), reply

    removed = cleanup(netns=NODE)
    assert len(removed) == 4, removed
    for dev in ("ztt-p1h", "ztt-p2h"):
        assert "ztagent_redirect" not in _tc_ingress(dev)
    assert "pref 40000" in _tc_ingress("ztt-p1h")
    assert "lookup 133" not in _ns(NODE, "ip", "rule", "show").stdout
    assert _ns(NODE, "ip", "route", "show", "table", "133", check=False).stdout.strip() == ""
    assert cleanup(netns=NODE) == []
    reply = lab.connect(POD1, POD2_IP, SERVER_PORT)
    assert reply.startswith(f"server {SERVER_PORT} "), reply


def test_checks_report_missing_headers(lab: Lab, tmp_path: Path) -> None:
    from ztagent.redirect import Capture
    from ztagent.redirect.errors import KernelHeadersError

    with pytest.raises(KernelHeadersError, match="linux-headers-"):
        Capture(netns=NODE, headers=str(tmp_path)).start()
    assert "lookup 133" not in _ns(NODE, "ip", "rule", "show").stdout
