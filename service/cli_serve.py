"""``softvq serve`` and ``softvq worker`` (to be filled in by the serving work)."""

from __future__ import annotations


def register(sub) -> None:
    pass
