"""Encoders resident in one process, least recently used first out, under a memory budget.

The denoisers are never in here: only encoders are evicted. An evicted encoder is dropped (its device memory freed);
the next request for it loads it again from disk.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import torch

from service.models.encoder import TextEncoder

log = logging.getLogger(__name__)


class EncoderPool:
    def __init__(
        self,
        budget_bytes: int = 0,
        on_evict: Callable[[TextEncoder], None] | None = None,
        on_load: Callable[[TextEncoder, float], None] | None = None,
    ):
        """`budget_bytes` = 0 means no limit. `on_load(encoder, seconds)` and `on_evict(encoder)` observe switches."""
        self.budget_bytes = budget_bytes
        self.on_evict = on_evict
        self.on_load = on_load
        self._resident: OrderedDict[str, TextEncoder] = OrderedDict()

    def __contains__(self, name: str) -> bool:
        return name in self._resident

    def __iter__(self):
        return iter(list(self._resident.values()))

    @property
    def resident_bytes(self) -> int:
        return sum(e.num_bytes for e in self._resident.values())

    def get(self, name: str, load: Callable[[], TextEncoder]) -> TextEncoder:
        if name in self._resident:
            self._resident.move_to_end(name)
            return self._resident[name]
        start = time.perf_counter()
        encoder = load()
        if self.on_load is not None:
            self.on_load(encoder, time.perf_counter() - start)
        self._resident[name] = encoder
        self._evict_over_budget(keep=name)
        return encoder

    def _evict_over_budget(self, keep: str) -> None:
        while self.budget_bytes and self.resident_bytes > self.budget_bytes and len(self._resident) > 1:
            name = next(n for n in self._resident if n != keep)
            evicted = self._resident.pop(name)
            log.info("evicting encoder %s (%d bytes) to stay within %d bytes", name, evicted.num_bytes,
                     self.budget_bytes)
            if self.on_evict is not None:
                self.on_evict(evicted)
            del evicted
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
