"""What the lab prints: progress lines (`say`) and one PASS/FAIL line per demo check."""

from __future__ import annotations

from dataclasses import dataclass


def say(message: str) -> None:
    print(f"lab: {message}", flush=True)


@dataclass
class Result:
    """The outcome of one demo check."""

    name: str
    ok: bool
    detail: str

    @property
    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  {self.name}: {self.detail}"
