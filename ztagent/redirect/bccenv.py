"""What BCC needs from the machine: Debian's `bcc` module importable from our virtualenv, and a
kernel build tree (headers) it can compile against.

BCC looks for `/lib/modules/$(uname -r)/build`, or `/sys/kernel/kheaders.tar.xz`, or the
directory in `BCC_KERNEL_SOURCE`. When the running kernel has no build tree (a kernel that did
not come from Debian, or headers of another version), we merge the installed Debian header
packages (`linux-headers-<ver>-common` + `linux-headers-<ver>-<flavour>`) into one symlink tree
under a directory of ours and point `BCC_KERNEL_SOURCE` at it. The programs only use the stable
uapi (`__sk_buff`, `bpf_sock_tuple`), so headers of another kernel version compile correctly.

`python -m ztagent.redirect.bccenv` does both and prints the tree it chose.
"""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import sys
import sysconfig
from pathlib import Path

from ztagent.redirect.errors import BccMissingError, KernelHeadersError

DEBIAN_BCC = Path("/usr/lib/python3/dist-packages/bcc")
DEFAULT_TREE_ROOT = Path("/var/lib/ztagent/kernel-build")
_HEADERS_ROOT = Path("/usr/src")


def headers_package() -> str:
    """The Debian package with headers for the running kernel (or the cloud flavour when the
    kernel is not Debian's)."""
    release = platform.release()
    if Path(f"/usr/share/doc/linux-image-{release}").exists() or "-cloud-" in release:
        return f"linux-headers-{release}"
    return f"linux-headers-cloud-amd64 (or linux-headers-{release})"


def ensure_bcc_importable(debian_bcc: Path = DEBIAN_BCC) -> None:
    """Make `import bcc` work in this interpreter: a symlink to Debian's package in our
    virtualenv's site-packages (only that package, not all of dist-packages)."""
    try:
        importlib.import_module("bcc")
        return
    except ImportError:
        pass
    if not (debian_bcc / "__init__.py").is_file():
        raise BccMissingError(
            "the BCC Python module is missing: apt-get install python3-bpfcc "
            f"(expected {debian_bcc})"
        )
    if sys.prefix == sys.base_prefix:
        raise BccMissingError(
            f"BCC is installed in {debian_bcc} but this Python ({sys.executable}) does not see "
            "it: run with Debian's /usr/bin/python3 or from a virtualenv"
        )
    site = Path(sysconfig.get_paths()["purelib"])
    link = site / "bcc"
    if link.is_symlink() or link.exists():
        if link.resolve() != debian_bcc.resolve():
            raise BccMissingError(f"{link} exists and is not Debian's bcc: remove it")
    else:
        link.symlink_to(debian_bcc)
    importlib.invalidate_caches()
    try:
        importlib.import_module("bcc")
    except ImportError as exc:
        raise BccMissingError(f"cannot import bcc through {link}: {exc}") from None


def is_kernel_tree(path: Path) -> bool:
    """A build tree BCC can use: generated config headers plus the ordinary include/."""
    return (
        (path / "include" / "generated" / "autoconf.h").is_file()
        and (path / "include" / "linux" / "kconfig.h").is_file()
        and (path / "arch" / "x86" / "include" / "generated").is_dir()
    )


def _merge(dest: Path, sources: list[Path]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    entries: dict[str, list[Path]] = {}
    for source in sources:
        for child in sorted(source.iterdir()):
            entries.setdefault(child.name, []).append(child)
    for name, paths in entries.items():
        dirs = [p for p in paths if p.is_dir()]
        if len(dirs) > 1:
            _merge(dest / name, dirs)
        else:
            (dest / name).symlink_to(paths[0].resolve())


def _debian_header_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(flavour tree, common tree) pairs of installed Debian headers, best first: the
    running kernel's own version, then the cloud flavour, then any, newest first."""
    pairs: list[tuple[Path, Path]] = []
    if not root.is_dir():
        return pairs
    for flavour in sorted(root.glob("linux-headers-*"), reverse=True):
        name = flavour.name
        if name.endswith("-common") or not (flavour / "include" / "generated").is_dir():
            continue
        version = name.removeprefix("linux-headers-")
        # linux-headers-6.1.0-56-cloud-amd64 pairs with linux-headers-6.1.0-56-common
        parts = version.split("-")
        for cut in range(len(parts) - 1, 0, -1):
            common = root / ("linux-headers-" + "-".join(parts[:cut]) + "-common")
            if common.is_dir():
                pairs.append((flavour, common))
                break
    release = platform.release()

    def rank(pair: tuple[Path, Path]) -> tuple[int, int]:
        name = pair[0].name
        return (0 if name.endswith(release) else 1, 0 if "cloud" in name else 1)

    return sorted(pairs, key=rank)


def kernel_build_tree(
    explicit: str | os.PathLike[str] | None = None,
    tree_root: Path = DEFAULT_TREE_ROOT,
    headers_root: Path = _HEADERS_ROOT,
) -> Path | None:
    """Find (or build) the kernel tree for BCC and set `BCC_KERNEL_SOURCE` when BCC would not
    find it by itself. Returns the tree, or None when BCC's own search succeeds
    (/lib/modules/<release>/build or /sys/kernel/kheaders.tar.xz)."""
    release = platform.release()
    if explicit is None and os.environ.get("BCC_KERNEL_SOURCE"):
        # Set by the user: it must be a kernel tree; never quietly replaced by another one.
        explicit = os.environ["BCC_KERNEL_SOURCE"]
    if explicit is not None:
        path = Path(explicit)
        if not is_kernel_tree(path):
            raise KernelHeadersError(
                f"kernel headers not found in {path} (no include/generated/autoconf.h): "
                f"install {headers_package()} or give a kernel build tree"
            )
        os.environ["BCC_KERNEL_SOURCE"] = str(path)
        return path
    if is_kernel_tree(Path("/lib/modules") / release / "build"):
        return None
    if Path("/sys/kernel/kheaders.tar.xz").is_file():
        return None
    pairs = _debian_header_pairs(headers_root)
    if not pairs:
        raise KernelHeadersError(
            f"no kernel headers for BCC: /lib/modules/{release}/build is absent and no "
            f"Debian headers are installed in {headers_root}: apt-get install {headers_package()}"
        )
    flavour, common = pairs[0]
    tree = tree_root / flavour.name
    if not is_kernel_tree(tree):
        staging = tree_root / f".{flavour.name}.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        _merge(staging, [flavour, common])
        shutil.rmtree(tree, ignore_errors=True)
        staging.rename(tree)
    os.environ["BCC_KERNEL_SOURCE"] = str(tree)
    return tree


def main() -> int:
    ensure_bcc_importable()
    tree = kernel_build_tree()
    print(tree if tree is not None else "(BCC finds the kernel headers by itself)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
