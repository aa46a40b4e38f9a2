"""The prompt-embedding cache: a hit skips the T5 encoder entirely and gives the identical image.

Keyed by the encoder's identity (its name and a hash of its weights, or its Hub commit), the embedding dtype, the
maximum sequence length and the prompt. Two levels: an in-process LRU bounded in bytes, in front of an optional shared
store (the workers use Redis, `service.worker.embedding_store`) so that every worker profits from every other's
work. Entries are safetensors bytes (no pickle): the embeddings exactly as the encoder returned them, with the
prompt's token count and whether it was truncated.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors


class SharedStore(Protocol):
    def get_many(self, keys: list[str]) -> list[bytes | None]: ...

    def put(self, key: str, value: bytes) -> None: ...


@dataclass
class Entry:
    embeds: torch.Tensor  # (max_sequence_length, width), CPU, the encoder's dtype
    length: int
    truncated: bool

    def to_bytes(self) -> bytes:
        return save_tensors({"embeds": self.embeds.contiguous(),
                             "meta": torch.tensor([self.length, int(self.truncated)], dtype=torch.int64)})

    @classmethod
    def from_bytes(cls, data: bytes) -> "Entry":
        tensors = load_tensors(data)
        length, truncated = tensors["meta"].tolist()
        return cls(tensors["embeds"], int(length), bool(truncated))

    @property
    def num_bytes(self) -> int:
        return self.embeds.numel() * self.embeds.element_size()


Lookup = Callable[[str, str], None]  # (encoder name, result: hit_local | hit_shared | miss)


class EmbeddingCache:
    def __init__(self, local_bytes: int = 256 * 2**20, store: SharedStore | None = None,
                 on_lookup: Lookup | None = None):
        self.local_bytes = local_bytes
        self.store = store
        self.on_lookup = on_lookup
        self._local: OrderedDict[str, Entry] = OrderedDict()
        self._local_used = 0

    @staticmethod
    def key(identity: str, dtype: torch.dtype, max_sequence_length: int, prompt: str) -> str:
        payload = "\x1f".join([identity, str(dtype), str(max_sequence_length), prompt])
        return hashlib.sha256(payload.encode()).hexdigest()

    def get_many(self, encoder_name: str, keys: list[str]) -> list[Entry | None]:
        found: list[Entry | None] = [self._local_get(k) for k in keys]
        results = ["hit_local" if e is not None else "miss" for e in found]
        missing = [i for i, e in enumerate(found) if e is None]
        if missing and self.store is not None:
            for i, data in zip(missing, self.store.get_many([keys[i] for i in missing])):
                if data is not None:
                    found[i] = Entry.from_bytes(data)
                    self._local_put(keys[i], found[i])
                    results[i] = "hit_shared"
        if self.on_lookup is not None:
            for result in results:
                self.on_lookup(encoder_name, result)
        return found

    def put(self, key: str, entry: Entry) -> None:
        self._local_put(key, entry)
        if self.store is not None:
            self.store.put(key, entry.to_bytes())

    # -- the in-process LRU ------------------------------------------------------------------------------------
    def _local_get(self, key: str) -> Entry | None:
        entry = self._local.get(key)
        if entry is not None:
            self._local.move_to_end(key)
        return entry

    def _local_put(self, key: str, entry: Entry) -> None:
        if entry.num_bytes > self.local_bytes or key in self._local:
            return
        self._local[key] = entry
        self._local_used += entry.num_bytes
        while self._local_used > self.local_bytes:
            _, evicted = self._local.popitem(last=False)
            self._local_used -= evicted.num_bytes
