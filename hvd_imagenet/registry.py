"""What the registries (optimizers.OPTIMIZERS, compression.COMPRESSIONS, data.LOADERS) hold is a "module:attribute"
string, so that reading a registry (for --help, config validation) imports nothing; `resolve` imports the module
when a run needs the thing. A leaf module: it imports nothing of the package."""

from __future__ import annotations

import importlib


def resolve(reference: str):
    """The object `reference` ("package.module:attribute") names, its module imported now."""
    module, attribute = reference.split(":")
    return getattr(importlib.import_module(module), attribute)
