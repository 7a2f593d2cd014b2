"""Lazy package exports: ``from gapt import build_model`` imports torch only when asked.

A package ``__init__`` lists its public names and the sub-module holding each; the first
access imports that sub-module (PEP 562 module ``__getattr__``). This keeps `gapt --help`,
`gapt --version` and `gapt keys` free of torch and timm.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Tuple


def lazy_exports(package: str, exports: Dict[str, str]) -> Tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``; ``exports`` maps a name to its sub-module (".model")."""
    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        setattr(importlib.import_module(package), name, value)  # later look-ups skip this function
        return value

    def __dir__() -> List[str]:
        return sorted(set(exports) | set(vars(importlib.import_module(package))))

    return __getattr__, __dir__
