"""``ADAPTERS``: adapter kind -> the object that applies, trains, saves, loads and merges it.

Looked up by ``AdapterConfig.kind`` (as peft looks its tuners up by type), so no caller compares
kind names; a kind added to ``config.base.AdapterKind`` needs its entry here (a test checks).
"""

from __future__ import annotations

from dinotune.adapters.base import Adapter
from dinotune.adapters.frozen import FrozenAdapter
from dinotune.adapters.full import FullAdapter
from dinotune.adapters.lora import LoraAdapter
from dinotune.config import ConfigError

ADAPTERS: dict[str, Adapter] = {
    adapter.kind: adapter
    for adapter in (FrozenAdapter(), LoraAdapter("lora"), LoraAdapter("dora", use_dora=True), FullAdapter())
}


def adapter_for(kind: str) -> Adapter:
    """The adapter of ``kind``; ConfigError naming the valid kinds for any other."""
    try:
        return ADAPTERS[kind]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown adapter {kind!r}: choose one of {', '.join(ADAPTERS)}") from None
