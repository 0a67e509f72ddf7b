"""fedlora's version, as installed: the server refuses sites that run another one (the same
messages can mean different things across versions)."""

from __future__ import annotations

import importlib.metadata

__all__ = ["VERSION"]

VERSION = importlib.metadata.version("fedlora")
