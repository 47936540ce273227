"""Dataset adapters: real dataset layouts -> a common list of :class:`Case` (inputs by modality key,
labels by name, metadata), so every dataset trains through the same loop.

    from strokeseg_training.adapters import discover, get_adapter
    cases = get_adapter(discover(root)).cases(root)

``discover`` sniffs a folder's layout; the most specific layouts are tried first, so a
folder of phantoms is "phantom" although it is also a valid "generic" case-folder layout.
"""

from __future__ import annotations

from pathlib import Path

from strokeseg.errors import InputError

from .base import Adapter, Case
from .bids import ATLAS2, ISLES22
from .folders import Generic, Phantom
from .smir import ISLES15, ISLES17, ISLES18

# Sniffing order: most specific first; generic accepts almost any folder of images.
ADAPTERS: dict[str, Adapter] = {a.name: a for a in (Phantom(), ISLES22(), ATLAS2(), ISLES18(), ISLES17(), ISLES15(), Generic())}


def get_adapter(name: str) -> Adapter:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ValueError(f"unknown dataset source '{name}' (known: {', '.join(ADAPTERS)})") from None


def discover(root: str | Path) -> str:
    """The name of the adapter whose layout ``root`` holds; InputError when none does."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "dataset folder not found")
    for name, adapter in ADAPTERS.items():
        if adapter.sniff(root):
            return name
    known = "; ".join(f"{a.name}: {a.layout}" for a in ADAPTERS.values())
    raise InputError(root, f"no known dataset layout ({known})")


__all__ = ["ADAPTERS", "Adapter", "Case", "discover", "get_adapter"]
