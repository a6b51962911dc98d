"""The variants keep a little state of their own next to their base optimizer's state dict."""

from __future__ import annotations

from typing import Any


def split_state_dict(state_dict: dict, key: str, owner: str) -> tuple[dict, Any]:
    """``state_dict`` without ``key``, and the ``key`` entry, which must be there (else the
    state dict was saved by another optimizer)."""
    rest = dict(state_dict)
    entry = rest.pop(key, None)
    if entry is None:
        raise ValueError(f"{owner}.load_state_dict: the state dict has no {key!r} entry; it was not "
                         f"saved by {owner}")
    return rest, entry
