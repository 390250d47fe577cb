"""Long fuzz runs with atheris (coverage-guided, libFuzzer's engine).

    python -m tests.fuzz.run <target> [libFuzzer flags] [corpus dir ...]
    python -m tests.fuzz.run socks5 -runs=1000000
    python -m tests.fuzz.run --list

The target's seeds are written to a fresh corpus directory unless one is given. A finding
is an exception other than the parser's documented error (or a failed check); libFuzzer then
stops and writes the input to `crash-<sha1>`: replay it with `... <target> crash-<sha1>`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] in ("-h", "--help", "--list"):
        from tests.fuzz.targets import TARGETS

        print(__doc__.strip() if len(argv) < 2 or argv[1] != "--list" else "")
        print("targets: " + " ".join(TARGETS))
        return 0 if len(argv) >= 2 else 2
    import atheris

    name, flags = argv[1], argv[2:]
    # Coverage of ztagent's own code guides the fuzzer; libraries run uninstrumented.
    with atheris.instrument_imports(include=["ztagent"]):
        from tests.fuzz.targets import TARGETS, seeds
    if name not in TARGETS:
        print(f"unknown target {name!r}; targets: {' '.join(TARGETS)}", file=sys.stderr)
        return 2
    if not any(not flag.startswith("-") for flag in flags):
        corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
        for i, seed in enumerate(seeds()[name]):
            (corpus / f"seed-{i}").write_bytes(seed)
        flags.append(str(corpus))
    atheris.Setup([argv[0], *flags], TARGETS[name])
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
