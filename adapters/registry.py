"""Maps provider names (the keys of `[providers.*]` in the config) to adapter classes.

The engine never imports a concrete adapter; the daemon asks this registry. Imports are lazy so a
daemon that does not use AWS never imports boto3, and one that does not use RunPod never
imports the runpod SDK.
"""

from __future__ import annotations

import importlib
from typing import Any

from adapters.base import Adapter, AdapterContext

# provider name -> (module, class). Explicit on purpose: this is the one list of providers.
_PROVIDERS: dict[str, tuple[str, str]] = {
    "local": ("adapters.local", "LocalAdapter"),
    "runpod": ("adapters.runpod", "RunPodAdapter"),
    "aws": ("adapters.aws", "AwsAdapter"),
}


def provider_names() -> list[str]:
    return sorted(_PROVIDERS)


def adapter_class(name: str) -> type[Adapter]:
    try:
        module_name, class_name = _PROVIDERS[name]
    except KeyError:
        raise KeyError(f"unknown provider {name!r}; known: {', '.join(provider_names())}") from None
    cls: type[Adapter] = getattr(importlib.import_module(module_name), class_name)
    return cls


def validate_settings(name: str, table: dict[str, Any]) -> Any:
    """Validate a `[providers.<name>]` table; raises pydantic.ValidationError."""
    return adapter_class(name).Settings.model_validate(table)


def create_adapter(name: str, table: dict[str, Any], ctx: AdapterContext) -> Adapter:
    cls = adapter_class(name)
    return cls(cls.Settings.model_validate(table), ctx)
