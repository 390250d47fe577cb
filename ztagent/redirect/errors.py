"""Why eBPF capture cannot work here: one error class per cause, all `CaptureError`s."""

from __future__ import annotations

from ztagent.errors import LocalError


class CaptureError(LocalError):
    """eBPF capture cannot work on this machine or in this configuration."""


class NotRootError(CaptureError):
    pass


class NoBtfError(CaptureError):
    pass


class ClsactUnsupportedError(CaptureError):
    pass


class BccMissingError(CaptureError):
    pass


class KernelHeadersError(CaptureError):
    pass


class FilterConflictError(CaptureError):
    pass
