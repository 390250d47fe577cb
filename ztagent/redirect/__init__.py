"""eBPF capture of enrolled pods' TCP traffic: BCC loading, tc attach, maps, routing."""

from ztagent.redirect.capture import (
    DEFAULT_MARK,
    DEFAULT_STEER_MARK,
    DEFAULT_TABLE,
    Capture,
    Listeners,
    cleanup,
)
from ztagent.redirect.errors import CaptureError

__all__ = [
    "DEFAULT_MARK",
    "DEFAULT_STEER_MARK",
    "DEFAULT_TABLE",
    "Capture",
    "CaptureError",
    "Listeners",
    "cleanup",
]
