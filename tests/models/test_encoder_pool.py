"""Encoders stay resident under a memory budget, least recently used evicted first."""

from service.models.encoder import TextEncoder
from service.models.encoder_pool import EncoderPool


def test_lru_eviction_under_a_budget(registry):
    loads, evictions = [], []
    sizes = {n: TextEncoder.load(registry.encoder(n)).num_bytes for n in ("t5-small", "t5-base", "t5-large")}
    pool = EncoderPool(budget_bytes=sizes["t5-small"] + sizes["t5-base"],
                       on_load=lambda e, s: loads.append(e.name), on_evict=lambda e: evictions.append(e.name))
    get = lambda n: pool.get(n, lambda: TextEncoder.load(registry.encoder(n)))  # noqa: E731
    get("t5-small"), get("t5-base"), get("t5-small")
    assert loads == ["t5-small", "t5-base"] and evictions == []
    get("t5-large")  # over budget: the least recently used (t5-base) goes first, then t5-small
    assert evictions[0] == "t5-base"
    assert "t5-large" in pool and pool.resident_bytes <= max(sizes["t5-large"], pool.budget_bytes)


def test_no_budget_keeps_everything(registry):
    pool = EncoderPool()
    for n in registry.encoders:
        pool.get(n, lambda n=n: TextEncoder.load(registry.encoder(n)))
    assert sorted(e.name for e in pool) == sorted(registry.encoders)
