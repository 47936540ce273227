"""Network registry: a model card names its architecture and arguments; this builds it.

Training and inference build networks through the same registry, so a bundled model runs
exactly the architecture it was validated with. Built-ins wrap MONAI networks; our own
architectures register themselves with :func:`register_network` from other modules
(``strokeseg.networks_zoo`` is imported on first use when it exists).
MONAI is imported inside the factories (through ``_lean_monai``: lean in the strokeseg command), so importing this module stays cheap.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ._lean_monai import import_monai
from .errors import ModelError

Factory = Callable[..., torch.nn.Module]

_FACTORIES: dict[str, Factory] = {}
_PLUGIN_MODULES = ("strokeseg.networks_zoo",)
_plugins_loaded = False


def register_network(name: str) -> Callable[[Factory], Factory]:
    """Decorator: ``@register_network("my.Net")`` on a factory ``(**args) -> nn.Module``."""

    def decorator(factory: Factory) -> Factory:
        known = _FACTORIES.get(name)
        # Re-registering the same function (a module reloaded) is harmless; a clash is a bug.
        if known is not None and _qualname(known) != _qualname(factory):
            raise ValueError(f"network name '{name}' is already registered by {_qualname(known)}")
        _FACTORIES[name] = factory
        return factory

    return decorator


def _qualname(f: Callable[..., Any]) -> str:
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in _PLUGIN_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def known_networks() -> list[str]:
    _load_plugins()
    return sorted(_FACTORIES)


def _tuples(value: Any) -> Any:
    """JSON has no tuples; MONAI wants (name, {args}) tuples for act/norm and accepts them elsewhere."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def build(name: str, args: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """Instantiate the registered network ``name`` with keyword ``args`` (from a model card)."""
    _load_plugins()
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ModelError(f"unknown network '{name}' (known: {', '.join(sorted(_FACTORIES)) or 'none'})")
    if args is not None and not isinstance(args, Mapping):
        raise ModelError(f"network '{name}': arguments must be an object, got {type(args).__name__}")
    import_monai()  # before any factory's "from monai ...": the lean import
    try:
        net = factory(**_tuples(dict(args or {})))
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise ModelError(f"network '{name}': bad arguments ({str(exc).strip().splitlines()[0][:200]})") from None
    if not isinstance(net, torch.nn.Module):
        raise ModelError(f"network '{name}': factory returned {type(net).__name__}, not a torch module")
    return net


# -- built-ins: MONAI networks, arguments passed through as the card gives them ---------------


@register_network("monai.UNet")
def _monai_unet(**args: Any) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(**args)


@register_network("monai.DynUNet")
def _monai_dynunet(**args: Any) -> torch.nn.Module:
    from monai.networks.nets import DynUNet

    return DynUNet(**args)


@register_network("monai.SegResNet")
def _monai_segresnet(**args: Any) -> torch.nn.Module:
    from monai.networks.nets import SegResNet

    return SegResNet(**args)


@register_network("monai.BasicUNet")
def _monai_basicunet(**args: Any) -> torch.nn.Module:
    from monai.networks.nets import BasicUNet

    return BasicUNet(**args)


@register_network("monai.AttentionUnet")
def _monai_attentionunet(**args: Any) -> torch.nn.Module:
    from monai.networks.nets import AttentionUnet

    return AttentionUnet(**args)
