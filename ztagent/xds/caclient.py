"""`CaClient`: workload certificates from an istiod-compatible CA (`CreateCertificate`),
naming the workload in `ImpersonatedIdentity` as ztunnel does."""

from __future__ import annotations

from datetime import timedelta

import grpc
from google.protobuf.struct_pb2 import Struct

from ztagent.errors import LocalError
from ztagent.identity.certs import WorkloadCertificate
from ztagent.identity.keys import create_csr, generate_key, key_to_pem
from ztagent.identity.spiffe import Identity
from ztagent.xds.connection import ControlPlaneConnection
from ztagent.xds.gen.istio.v1.auth import ca_pb2, ca_pb2_grpc


class CaClient:
    """Fetches workload certificates from an istiod-compatible CA."""

    def __init__(
        self, connection: ControlPlaneConnection, ttl: timedelta, *, timeout: float = 10.0
    ) -> None:
        self.connection = connection
        self.ttl = ttl
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None

    async def fetch(self, identity: Identity) -> WorkloadCertificate:
        key = generate_key()
        metadata = Struct()
        metadata.update({"ImpersonatedIdentity": identity.uri})
        request = ca_pb2.IstioCertificateRequest(
            csr=create_csr(identity, key).decode(),
            validity_duration=int(self.ttl.total_seconds()),
            metadata=metadata,
        )
        if self._channel is None:
            self._channel = self.connection.channel()
        stub = ca_pb2_grpc.IstioCertificateServiceStub(self._channel)
        try:
            response = await stub.CreateCertificate(
                request, metadata=self.connection.metadata(), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise LocalError(
                f"CA {self.connection.target} refused {identity}: "
                f"{exc.code().name}: {exc.details()}"
            ) from None
        chain = [pem.encode() for pem in response.cert_chain]
        if len(chain) < 2:
            raise LocalError(f"CA {self.connection.target} sent a chain without a root")
        return WorkloadCertificate.from_pem(chain[:-1], key_to_pem(key), chain[-1])

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
