"""Workload identity: SPIFFE ids, keys and CSRs, certificates, the CA, and certificate rotation.

Everything that decides what a certificate says or when it is replaced lives here; moving bytes
(TLS, gRPC to istiod) does not.
"""

from ztagent.identity.ca import CertificateAuthority, InvalidCa, SigningRefused
from ztagent.identity.certs import InvalidCertificate, WorkloadCertificate, uri_sans
from ztagent.identity.keys import (
    InvalidCsr,
    InvalidKey,
    create_csr,
    csr_identity,
    generate_key,
    key_to_pem,
    load_key,
)
from ztagent.identity.manager import CertificateManager, CertificateSchedule
from ztagent.identity.spiffe import Identity, InvalidIdentity

__all__ = [
    "CertificateAuthority",
    "CertificateManager",
    "CertificateSchedule",
    "Identity",
    "InvalidCa",
    "InvalidCertificate",
    "InvalidCsr",
    "InvalidIdentity",
    "InvalidKey",
    "SigningRefused",
    "WorkloadCertificate",
    "create_csr",
    "csr_identity",
    "generate_key",
    "key_to_pem",
    "load_key",
    "uri_sans",
]
