"""Training subcommands (to be filled in by the training work)."""

from __future__ import annotations


def register(sub) -> None:
    pass
