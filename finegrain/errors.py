"""How an error reaches a user: its first line (a leaf module; every command prints errors so)."""

from __future__ import annotations


def one_line(e: BaseException) -> str:
    """The first line of an error's message (its type when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
