"""Start-up checks for eBPF capture, one clear error each (the errors are in `errors`)."""

from __future__ import annotations

import gzip
import importlib
import os
import platform
from pathlib import Path

from ztagent.redirect.bccenv import ensure_bcc_importable, kernel_build_tree
from ztagent.redirect.errors import (
    BccMissingError,
    ClsactUnsupportedError,
    NoBtfError,
    NotRootError,
)


def check_root() -> None:
    if os.geteuid() != 0:
        raise NotRootError("eBPF capture needs root (CAP_BPF, CAP_NET_ADMIN): run as root")


def check_btf(path: Path = Path("/sys/kernel/btf/vmlinux")) -> None:
    if not path.is_file():
        raise NoBtfError(
            f"the kernel has no BTF ({path} missing): bpf_sk_assign needs a kernel built with "
            "CONFIG_DEBUG_INFO_BTF=y"
        )


def _kernel_config() -> dict[str, str] | None:
    text: str | None = None
    proc = Path("/proc/config.gz")
    boot = Path(f"/boot/config-{platform.release()}")
    try:
        if proc.is_file():
            text = gzip.decompress(proc.read_bytes()).decode(errors="replace")
        elif boot.is_file():
            text = boot.read_text(errors="replace")
    except OSError:
        return None
    if text is None:
        return None
    config: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("CONFIG_"):
            config[key] = value
    return config


def check_clsact() -> None:
    """From the kernel config when readable; attaching reports the rest."""
    config = _kernel_config()
    if config is None:
        return
    for option in ("CONFIG_NET_SCH_INGRESS", "CONFIG_NET_CLS_BPF", "CONFIG_NET_CLS_ACT"):
        if config.get(option) not in ("y", "m"):
            raise ClsactUnsupportedError(
                f"the kernel lacks {option}: tc clsact with cls_bpf direct-action is needed"
            )


def check_bcc() -> None:
    try:
        importlib.import_module("bcc")
    except ImportError:
        raise BccMissingError(
            "the BCC Python module is not importable: apt-get install python3-bpfcc "
            "(and in a virtualenv, link it with ztagent.redirect.bccenv.ensure_bcc_importable)"
        ) from None


def check_headers(explicit: str | os.PathLike[str] | None = None) -> None:
    kernel_build_tree(explicit)


def check_all(headers: str | os.PathLike[str] | None = None) -> None:
    """Every machine-level check, in the order a user would fix them."""
    check_root()
    check_btf()
    check_clsact()
    ensure_bcc_importable()
    check_headers(headers)
