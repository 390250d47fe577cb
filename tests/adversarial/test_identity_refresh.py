"""Certificate refresh storm: a CA that backdates notBefore, and TTLs too short to make sense.

The real CA (notBefore backdated by a minute) signs real certificates against an injected clock;
the manager's schedule runs in memory, so thirty simulated seconds take milliseconds.
"""

import asyncio
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from ztagent.control.auth import TokenSigner
from ztagent.control.ca import (
    MAX_CERT_TTL,
    CaPolicy,
    CertificateRefused,
    CertificateService,
    granted_ttl,
)
from ztagent.errors import LocalError
from ztagent.identity.ca import CLOCK_SKEW, CertificateAuthority
from ztagent.identity.certs import WorkloadCertificate, load_pem_certs
from ztagent.identity.keys import create_csr, generate_key
from ztagent.identity.manager import (
    MIN_REFRESH_DELAY,
    MIN_SECRET_TTL,
    CertificateManager,
    CertificateSchedule,
    check_secret_ttl,
)
from ztagent.identity.spiffe import Identity
from ztagent.xds.gen.istio.v1.auth import ca_pb2

WEB = Identity("cluster.local", "default", "web")
T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0.timestamp()

    def __call__(self) -> float:
        return self.now

    def utc(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ca(tmp_path, clock: Clock) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path / "ca", now=clock.utc)


def _fetches_in(ca: CertificateAuthority, clock: Clock, ttl: timedelta, seconds: float) -> int:
    """How many certificates one identity takes from the CA over `seconds` of simulated time."""
    issued: list[WorkloadCertificate] = []

    async def fetch(identity: Identity) -> WorkloadCertificate:
        cert = ca.issue(identity, ttl)
        issued.append(cert)
        return cert

    manager = CertificateManager(fetch, clock=clock, schedule=CertificateSchedule(rand=lambda: 0.0))

    async def main() -> None:
        end = clock.now + seconds
        await manager.get(WEB)
        while True:
            wake = manager.schedule.next_wakeup()
            assert wake is not None
            if wake > end:
                break
            clock.now = max(clock.now, wake)
            await manager.refresh_due()
            assert len(issued) < 1000, "refresh storm"

    asyncio.run(main())
    assert all(c.not_before == c.not_after - ttl - CLOCK_SKEW for c in issued)
    return len(issued)


def test_backdated_not_before_does_not_pull_the_refresh_forward(ca, clock):
    """TTL 120 s with notBefore 60 s back: refresh after 60 s (half of what is left), not 30 s."""
    cert = ca.issue(WEB, timedelta(seconds=120))
    schedule = CertificateSchedule(rand=lambda: 0.0)
    schedule.track(WEB, clock.now)
    assert schedule.succeeded(WEB, cert, clock.now) == clock.now + 60.0
    assert _fetches_in(ca, clock, timedelta(seconds=120), 30) == 1


@pytest.mark.parametrize("ttl", [60, 90])
def test_short_ttl_renews_at_half_its_lifetime_not_in_a_loop(ca, clock, ttl):
    """TTL <= 60 s used to be due before it arrived: a fetch every 0.5 s (536 in 30 s)."""
    assert _fetches_in(ca, clock, timedelta(seconds=ttl), ttl / 2 - 1) == 1
    assert _fetches_in(ca, clock, timedelta(seconds=ttl), 10 * ttl - 1) == 20


def test_a_nearly_expired_certificate_waits_for_the_floor(clock):
    """A foreign CA that hands out certificates about to expire gets one request per floor."""
    start = clock.utc()
    cert = WorkloadCertificate(
        WEB,
        b"",
        (),
        b"",
        not_before=start - timedelta(hours=1),
        not_after=start + timedelta(seconds=0.5),
    )
    schedule = CertificateSchedule(rand=lambda: 0.0)
    schedule.track(WEB, clock.now)
    assert schedule.succeeded(WEB, cert, clock.now) == clock.now + MIN_REFRESH_DELAY
    assert MIN_REFRESH_DELAY >= 1.0


def test_secret_ttl_below_the_minimum_is_refused_with_the_flag_named():
    with pytest.raises(LocalError, match=r"--secret-ttl .*30s is too short.*at least 60s"):
        check_secret_ttl(timedelta(seconds=30))
    assert check_secret_ttl(MIN_SECRET_TTL) == MIN_SECRET_TTL


def test_control_plane_clamps_lifetimes_and_says_why():
    policy = CaPolicy("Kubernetes", frozenset())
    assert granted_ttl(policy, 0) == (policy.default_ttl, None)
    assert granted_ttl(policy, 3600) == (timedelta(hours=1), None)
    ttl, why = granted_ttl(policy, 1)
    assert ttl == MIN_SECRET_TTL and why is not None and "below the minimum 60s" in why
    ttl, why = granted_ttl(policy, 400 * 86400)
    assert ttl == MAX_CERT_TTL and why is not None and "--max-workload-cert-ttl" in why
    with pytest.raises(CertificateRefused) as refused:
        granted_ttl(policy, -1)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_control_plane_signs_a_one_second_request_for_the_minimum(tmp_path, ca, clock):
    """Through the CreateCertificate logic: a 1 s request gets a 60 s certificate."""
    signer = TokenSigner(tmp_path / "token-key.pem")
    service = CertificateService(ca, signer, CaPolicy("Kubernetes", frozenset()), lambda _: ())
    token = signer.issue(WEB.namespace, WEB.service_account)
    request = ca_pb2.IstioCertificateRequest(
        csr=create_csr(WEB, generate_key()).decode(), validity_duration=1
    )
    chain = asyncio.run(service.sign(request, [("authorization", f"Bearer {token}")]))
    leaf = load_pem_certs(chain[0].encode())[0]
    assert leaf.not_valid_after_utc - clock.utc() == MIN_SECRET_TTL


def test_node_agent_refuses_to_start_with_a_nonsensical_secret_ttl(tmp_path):
    config = tmp_path / "local-config.yaml"
    config.write_text("workloads: []\n")
    args = ["--local-xds-path", str(config), "--node-name", "n", "--secret-ttl", "30s"]
    result = subprocess.run(
        [sys.executable, "-m", "ztagent", "node", *args, "--ca-dir", str(tmp_path / "ca")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "--secret-ttl (SECRET_TTL): 30s is too short" in result.stderr
