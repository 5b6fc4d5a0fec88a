"""The older RWKV family, RWKV-4, -5 (5.0/5.1/5.2) and -6, with RWKV-7's calling convention.

One module per version, each its math in plain torch, run token by token (the recurrent form);
``goose.load`` picks the class from the checkpoint's keys. See base.py for the shared state layout.
"""
from .base import NAMES, VERSIONS, LegacyConfig, LegacyRWKV
from .rwkv4 import RWKV4
from .rwkv5 import RWKV5
from .rwkv6 import RWKV6

MODELS: dict[str, type[LegacyRWKV]] = {"v4": RWKV4, "x050": RWKV5, "x051": RWKV5, "x052": RWKV5, "x060": RWKV6}

__all__ = ["MODELS", "NAMES", "RWKV4", "RWKV5", "RWKV6", "VERSIONS", "LegacyConfig", "LegacyRWKV"]
