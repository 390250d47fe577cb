"""eBPF capture: load `bpf/redirect.c` with BCC, attach it on tc ingress, route what it steers.

`Capture` works in one network namespace: the calling process's own (`netns=None`, e.g. an
agent started with `ip netns exec`), or a named one (`netns="name"`, as in /run/netns), where
its netlink work (tc, rules, routes, route lookups) happens. The BPF program and maps belong
to this process; the socket lookups the program does use the namespace of the device it runs
on, so the agent's listeners must live in the namespace of the hooked devices.

Netlink calls run on one private worker thread (pyroute2's synchronous API runs its own event
loop, which cannot nest in the agent's), so every method is a short blocking call usable from
plain or asyncio code.

Marks: the program marks the packets it steers with `steer_mark` (within `mark_mask`), and
`ip rule fwmark steer_mark/mark_mask lookup <table>` + `local 0.0.0.0/0 dev lo table <table>`
delivers them locally. The agent's own sockets use `mark` (SO_MARK), which must differ from
`steer_mark` in the masked bits, or the rule would deliver the agent's outgoing packets to
itself. The program passes packets that carry either mark untouched.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ztagent.names import HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT
from ztagent.redirect import checks
from ztagent.redirect.errors import CaptureError, ClsactUnsupportedError, FilterConflictError

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MARK = 0x539  # SO_MARK of the agent's own sockets
DEFAULT_STEER_MARK = 0x53A  # set by the program on steered packets
DEFAULT_MARK_MASK = 0xFFF
DEFAULT_TABLE = 133
DEFAULT_RULE_PRIORITY = 1339
DEFAULT_TC_PRIORITY = 1339
DEFAULT_TC_HANDLE = 0x539
FILTER_NAME = "ztagent_redirect"
PROGRAM = "zt_redirect"
SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "redirect.c"

TC_H_CLSACT = 0xFFFFFFF1
INGRESS_PARENT = 0xFFFFFFF2
EGRESS_PARENT = 0xFFFFFFF3
ETH_P_ALL = 0x0003


def _ip_key(ip: str) -> int:
    """An IPv4 address as the u32 the program compares with `iphdr.daddr` (network order)."""
    return int(struct.unpack("=I", socket.inet_aton(str(ipaddress.IPv4Address(ip))))[0])


def _errno(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    if isinstance(exc, OSError):
        return exc.errno
    return None


@dataclass(frozen=True)
class Listeners:
    """Where the agent listens; `address` 0.0.0.0 means a wildcard bind."""

    outbound: int = OUTBOUND_PORT
    inbound: int = HBONE_PORT
    plaintext: int = INBOUND_PLAINTEXT_PORT
    hbone_port: int = HBONE_PORT  # inbound SYNs to this port go to `inbound`
    address: str = "0.0.0.0"


class _Netlink:
    """pyroute2 on a private thread, in the given network namespace."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ztagent-netlink")
        self._ipr: Any = None

    def _open(self) -> Any:
        if self._ipr is None:
            from pyroute2 import IPRoute

            if self.netns is None:
                self._ipr = IPRoute(groups=0)
            else:
                self._ipr = IPRoute(groups=0, netns=self.netns, flags=0)
        return self._ipr

    def call(self, fn: Callable[[Any], T]) -> T:
        return self._pool.submit(lambda: fn(self._open())).result()

    def close(self) -> None:
        def _close(_: Any) -> None:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None

        with contextlib.suppress(Exception):
            self._pool.submit(lambda: _close(None)).result()
        self._pool.shutdown(wait=True)


# ------------------------------------------------------------------ netlink helpers (on thread)


def _index(ipr: Any, dev: str | int) -> int:
    if isinstance(dev, int):
        return dev
    found = ipr.link_lookup(ifname=dev)
    if not found:
        raise CaptureError(f"no network device {dev!r}")
    return int(found[0])


def _filters(ipr: Any, index: int, parent: int) -> list[Any]:
    try:
        return list(ipr.get_filters(index=index, parent=parent))
    except Exception as exc:
        if _errno(exc) in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
            return []
        raise


def _filter_info(msg: Any) -> tuple[int, int, str | None, str | None]:
    """(priority, handle, kind, bpf name) of one dumped filter."""
    prio = (int(msg["info"]) >> 16) & 0xFFFF
    handle = int(msg["handle"])
    kind = msg.get_attr("TCA_KIND")
    name = None
    options = msg.get_attr("TCA_OPTIONS")
    if options is not None and kind == "bpf":
        name = options.get_attr("TCA_BPF_NAME")
    return prio, handle, kind, name


def _ours_at(
    ipr: Any, index: int, prio: int, handle: int, name: str
) -> tuple[bool, list[tuple[int, int, str | None, str | None]]]:
    """Whether our filter is on the device's ingress, and the foreign filters at `prio`."""
    ours = False
    foreign = []
    for msg in _filters(ipr, index, INGRESS_PARENT):
        info = _filter_info(msg)
        if info[0] != prio or info[1] == 0:
            continue
        if info[1] == handle and info[2] == "bpf" and info[3] == name:
            ours = True
        else:
            foreign.append(info)
    return ours, foreign


def _has_clsact(ipr: Any, index: int) -> bool:
    return any(
        q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=index) if q is not None
    )


# ------------------------------------------------------------------ Capture


class Capture:
    def __init__(
        self,
        *,
        netns: str | None = None,
        listeners: Listeners = Listeners(),
        mark: int = DEFAULT_MARK,
        steer_mark: int = DEFAULT_STEER_MARK,
        mark_mask: int = DEFAULT_MARK_MASK,
        table: int = DEFAULT_TABLE,
        rule_priority: int = DEFAULT_RULE_PRIORITY,
        tc_priority: int = DEFAULT_TC_PRIORITY,
        tc_handle: int = DEFAULT_TC_HANDLE,
        filter_name: str = FILTER_NAME,
        headers: str | None = None,
        source: Path = SOURCE,
        max_pods: int = 4096,
    ) -> None:
        if (mark & mark_mask) == (steer_mark & mark_mask):
            raise CaptureError(
                f"the agent's socket mark {mark:#x} and the steering mark {steer_mark:#x} "
                f"must differ within mask {mark_mask:#x}"
            )
        if steer_mark & ~mark_mask or not steer_mark:
            raise CaptureError(f"steering mark {steer_mark:#x} must be non-zero within its mask")
        if not 0 < tc_priority < 0x10000:
            raise CaptureError(f"tc priority {tc_priority} must be 1..65535")
        self.netns = netns
        self.listeners = listeners
        self.mark = mark
        self.steer_mark = steer_mark
        self.mark_mask = mark_mask
        self.table = table
        self.rule_priority = rule_priority
        self.tc_priority = tc_priority
        self.tc_handle = tc_handle
        self.filter_name = filter_name
        self.headers = headers
        self.source = source
        self.max_pods = max_pods
        self._bpf: Any = None
        self._fd = -1
        self._nl: _Netlink | None = None
        self._attached: dict[int, bool] = {}  # ifindex -> we created its clsact qdisc
        self._pods: dict[str, int] = {}  # pod IP -> host veth ifindex
        self._routing = False

    # -------------------------------------------------------------- lifecycle

    def cflags(self) -> list[str]:
        listen = self.listeners
        return [
            f"-DZT_STEER_MARK={self.steer_mark:#x}",
            f"-DZT_AGENT_MARK={self.mark & self.mark_mask:#x}",
            f"-DZT_MARK_MASK={self.mark_mask:#x}u",
            f"-DZT_AGENT_IP={_ip_key(listen.address):#x}u",
            f"-DZT_OUTBOUND_PORT={listen.outbound}",
            f"-DZT_INBOUND_PORT={listen.inbound}",
            f"-DZT_PLAINTEXT_PORT={listen.plaintext}",
            f"-DZT_HBONE_PORT={listen.hbone_port}",
            f"-DZT_MAX_PODS={self.max_pods}",
        ]

    def start(self, devices: Iterable[str | int] = ()) -> None:
        """Check the machine, compile and load the program, install the routing, attach."""
        checks.check_all(self.headers)
        if not self.source.is_file():
            raise CaptureError(f"eBPF source {self.source} is missing")
        self._nl = _Netlink(self.netns)
        try:
            self._load()
            self._nl.call(self._add_routing)
            self._routing = True
            for dev in devices:
                self.attach(dev)
        except BaseException:
            self.stop()
            raise

    def _load(self) -> None:
        from bcc import BPF  # type: ignore[import-untyped,import-not-found,unused-ignore]

        try:
            self._bpf = BPF(src_file=str(self.source).encode(), cflags=self.cflags())
            fn = self._bpf.load_func(PROGRAM.encode(), BPF.SCHED_CLS)
        except Exception as exc:
            raise CaptureError(f"cannot compile or load {self.source}: {exc}") from None
        self._fd = int(fn.fd)

    def stop(self, *, release: bool = True) -> None:
        """Detach our filters, remove our rule and route, unload. Idempotent.

        With `release` false (the agent handed the capture over to a successor, or a takeover
        did not happen) the filters, rule and route stay: they are another agent's now, and
        removing them would let captured flows pass as plain IP. Only our program is unloaded
        (a filter that still holds it keeps it)."""
        nl = self._nl
        if nl is not None:
            attached = dict(self._attached) if release else {}
            self._attached.clear()

            def detach_all(ipr: Any) -> None:
                for index, created in attached.items():
                    try:
                        self._detach(ipr, index, created)
                    except Exception as exc:
                        log.warning("cannot detach from ifindex %d: %s", index, exc)

            nl.call(detach_all)
            if self._routing and release:
                try:
                    nl.call(self._remove_routing)
                except Exception as exc:
                    log.warning("cannot remove the capture routing: %s", exc)
            self._routing = False
            nl.close()
            self._nl = None
        if self._bpf is not None:
            with contextlib.suppress(Exception):
                self._bpf.cleanup()
            self._bpf = None
            self._fd = -1
        self._pods.clear()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._bpf is not None

    def _need(self) -> _Netlink:
        if self._nl is None or self._bpf is None:
            raise CaptureError("capture is not started")
        return self._nl

    # -------------------------------------------------------------- routing

    def _add_routing(self, ipr: Any) -> None:
        try:
            ipr.rule(
                "add",
                family=socket.AF_INET,
                table=self.table,
                priority=self.rule_priority,
                fwmark=self.steer_mark,
                fwmask=self.mark_mask,
            )
        except Exception as exc:
            if _errno(exc) != errno.EEXIST:
                raise CaptureError(f"cannot add the fwmark rule: {exc}") from None
        try:
            ipr.route(
                "replace",
                dst="0.0.0.0/0",
                type="local",
                scope="host",
                oif=_index(ipr, "lo"),
                table=self.table,
            )
        except Exception as exc:
            raise CaptureError(f"cannot add the local route in table {self.table}: {exc}") from None

    def _remove_routing(self, ipr: Any) -> None:
        _remove_rules(ipr, self.table, self.steer_mark, self.mark_mask)
        _remove_local_route(ipr, self.table)

    # -------------------------------------------------------------- attach

    def attach(self, dev: str | int) -> int:
        """Attach the program on the ingress of `dev` (name or ifindex); returns the ifindex.
        Idempotent; replaces a leftover filter of ours; refuses a foreign one at our priority."""
        nl = self._need()
        return nl.call(lambda ipr: self._attach(ipr, dev))

    attach_uplink = attach
    attach_pod_veth = attach

    def _attach(self, ipr: Any, dev: str | int) -> int:
        index = _index(ipr, dev)
        if index in self._attached:
            return index
        created = False
        if not _has_clsact(ipr, index):
            try:
                ipr.tc("add", "clsact", index)
                created = True
            except Exception as exc:
                code = _errno(exc)
                if code != errno.EEXIST:
                    if code in (errno.ENOENT, errno.EOPNOTSUPP, errno.EINVAL):
                        raise ClsactUnsupportedError(
                            f"cannot add a clsact qdisc on {dev}: {exc} (kernel without "
                            "CONFIG_NET_SCH_INGRESS?)"
                        ) from None
                    raise CaptureError(f"cannot add a clsact qdisc on {dev}: {exc}") from None
        ours, foreign = _ours_at(ipr, index, self.tc_priority, self.tc_handle, self.filter_name)
        if foreign:
            prio, handle, kind, name = foreign[0]
            if created:
                with contextlib.suppress(Exception):
                    ipr.tc("del", "clsact", index)
            raise FilterConflictError(
                f"device {dev}: another tc ingress filter is at our priority {prio} "
                f"({kind or '?'} handle {handle:#x}{' ' + name if name else ''}); "
                "choose another priority or remove it"
            )
        try:
            ipr.tc(
                "replace-filter" if ours else "add-filter",
                "bpf",
                index,
                self.tc_handle,
                fd=self._fd,
                name=self.filter_name,
                parent=INGRESS_PARENT,
                prio=self.tc_priority,
                protocol=ETH_P_ALL,
                classid=1,
                direct_action=True,
            )
        except Exception as exc:
            raise CaptureError(f"cannot attach the eBPF filter on {dev}: {exc}") from None
        self._attached[index] = created
        return index

    def detach(self, dev: str | int) -> None:
        nl = self._need()

        def run(ipr: Any) -> None:
            index = _index(ipr, dev)
            created = self._attached.pop(index, False)
            self._detach(ipr, index, created)

        nl.call(run)

    def _detach(self, ipr: Any, index: int, created: bool) -> None:
        _delete_filter(ipr, index, self.tc_priority, self.tc_handle, self.filter_name)
        if created:
            try:
                if not _filters(ipr, index, INGRESS_PARENT) and not _filters(
                    ipr, index, EGRESS_PARENT
                ):
                    ipr.tc("del", "clsact", index)
            except Exception as exc:
                if _errno(exc) not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                    raise

    def attached(self) -> list[int]:
        return sorted(self._attached)

    # -------------------------------------------------------------- enrolment

    def enrol_pod(self, ip: str, host_veth_ifindex: int, *, attach: bool = True) -> None:
        """Capture the pod's new outbound flows (SYNs on its host veth) and new flows to its IP.
        The maps first, then (with `attach`) the program on the veth if it is not there yet, so
        the program never meets the pod's packets with maps that do not know the pod."""
        nl = self._need()
        old = self._pods.get(ip)
        if old is not None and old != host_veth_ifindex:
            self._map_delete("outbound_ifaces", old)
        self._map_set("inbound_pods", _ip_key(ip))
        self._map_set("outbound_ifaces", host_veth_ifindex)
        self._pods[ip] = host_veth_ifindex
        if attach and host_veth_ifindex not in self._attached:
            nl.call(lambda ipr: self._attach(ipr, host_veth_ifindex))

    def unenrol_pod(self, ip: str) -> None:
        self._need()
        index = self._pods.pop(ip, None)
        self._map_delete("inbound_pods", _ip_key(ip))
        if index is not None and index not in self._pods.values():
            self._map_delete("outbound_ifaces", index)

    def enrolled(self) -> dict[str, int]:
        return dict(self._pods)

    def _map_set(self, name: str, key: int) -> None:
        table = self._bpf[name.encode()]
        table[table.Key(key)] = table.Leaf(1)

    def _map_delete(self, name: str, key: int) -> None:
        table = self._bpf[name.encode()]
        with contextlib.suppress(KeyError):
            del table[table.Key(key)]

    # -------------------------------------------------------------- lookups

    def host_veth_for(self, ip: str) -> int:
        """The ifindex of the device the node routes `ip` through (a pod's host-side veth)."""
        if self._nl is not None:
            return self._nl.call(lambda ipr: _route_device(ipr, ip))
        nl = _Netlink(self.netns)
        try:
            return nl.call(lambda ipr: _route_device(ipr, ip))
        finally:
            nl.close()


def _route_device(ipr: Any, ip: str) -> int:
    try:
        routes = ipr.route("get", dst=str(ipaddress.IPv4Address(ip)))
    except Exception as exc:
        raise CaptureError(f"no route to pod {ip}: {exc}") from None
    for route in routes:
        kind = route.get("type")
        if kind == 2:  # RTN_LOCAL
            raise CaptureError(f"{ip} is a local address of this node, not a pod")
        if kind != 1:  # RTN_UNICAST
            raise CaptureError(f"pod {ip} is not routed through a device (route type {kind})")
        oif = route.get_attr("RTA_OIF")
        if oif is not None:
            return int(oif)
    raise CaptureError(f"no device route to pod {ip}")


def _delete_filter(ipr: Any, index: int, prio: int, handle: int, name: str) -> bool:
    ours, _ = _ours_at(ipr, index, prio, handle, name)
    if not ours:
        return False
    try:
        ipr.tc(
            "del-filter",
            "bpf",
            index,
            handle,
            parent=INGRESS_PARENT,
            prio=prio,
            protocol=ETH_P_ALL,
        )
    except Exception as exc:
        if _errno(exc) not in (errno.ENODEV, errno.ENOENT):
            raise
        return False
    return True


def _remove_rules(ipr: Any, table: int, steer_mark: int, mask: int) -> int:
    removed = 0
    for rule in ipr.get_rules(family=socket.AF_INET):
        rule_table = rule.get_attr("FRA_TABLE") or rule.get("table")
        if rule_table != table:
            continue
        if rule.get_attr("FRA_FWMARK") != steer_mark:
            continue
        if (rule.get_attr("FRA_FWMASK") or 0xFFFFFFFF) != mask:
            continue
        try:
            ipr.rule(
                "del",
                family=socket.AF_INET,
                table=table,
                priority=rule.get_attr("FRA_PRIORITY"),
                fwmark=steer_mark,
                fwmask=mask,
            )
            removed += 1
        except Exception as exc:
            if _errno(exc) != errno.ENOENT:
                raise
    return removed


def _remove_local_route(ipr: Any, table: int) -> int:
    try:
        ipr.route(
            "del",
            dst="0.0.0.0/0",
            type="local",
            scope="host",
            oif=_index(ipr, "lo"),
            table=table,
        )
    except Exception as exc:
        if _errno(exc) in (errno.ESRCH, errno.ENOENT):
            return 0
        raise
    return 1


def cleanup(
    *,
    netns: str | None = None,
    filter_name: str = FILTER_NAME,
    steer_mark: int = DEFAULT_STEER_MARK,
    mark_mask: int = DEFAULT_MARK_MASK,
    table: int = DEFAULT_TABLE,
    tc_priority: int = DEFAULT_TC_PRIORITY,
    tc_handle: int = DEFAULT_TC_HANDLE,
) -> list[str]:
    """Remove what a Capture with these settings may have left in a namespace (after a crash):
    our tc filters on every device, our fwmark rule and our local route. Filters of others are
    never touched; clsact qdiscs are left in place. Returns what was removed, for the log."""
    nl = _Netlink(netns)

    def run(ipr: Any) -> list[str]:
        done: list[str] = []
        for link in ipr.get_links():
            index = int(link["index"])
            if _delete_filter(ipr, index, tc_priority, tc_handle, filter_name):
                done.append(f"tc filter on {link.get_attr('IFLA_IFNAME')}")
        for _ in range(_remove_rules(ipr, table, steer_mark, mark_mask)):
            done.append(f"ip rule fwmark {steer_mark:#x}/{mark_mask:#x} lookup {table}")
        if _remove_local_route(ipr, table):
            done.append(f"local route 0.0.0.0/0 dev lo table {table}")
        return done

    try:
        return nl.call(run)
    finally:
        nl.close()
