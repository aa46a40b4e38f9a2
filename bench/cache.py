"""The prompt-embedding cache: repeated prompts through a T5-large-sized encoder (random weights, the real T5 v1.1
large shape with a projection to the demo denoiser's width) on the CPU, the encode stage with a warm cache vs without,
and the images compared pixel for pixel.

    python -m bench run cache            # --tiny: a T5-base-sized encoder, fewer prompts

Target: >= 50x faster encode stage on hits, identical images. Also measured: a hit in Redis (another worker encoded
the prompt) against a hit in the worker's own memory.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import yaml

from bench.common import save, target


def build_kit(tmp: Path, size: str) -> Path:
    import torch

    from transformers import AutoTokenizer

    from service.models.demo import make_demo
    from service.models.sizes import t5_config
    from service.models.student import T5EncoderWithProjection

    kit = make_demo(tmp / "kit")
    tokenizer = AutoTokenizer.from_pretrained(kit / "encoders" / "t5-xxl")
    width = yaml.safe_load((kit / "pipelines" / "flux" / "transformer" / "config.json").read_text())[
        "joint_attention_dim"]
    config = t5_config(size, project_out_dim=width)
    config.vocab_size = len(tokenizer)
    config.architectures = [T5EncoderWithProjection.__name__]
    torch.manual_seed(0)
    T5EncoderWithProjection(config).save_pretrained(kit / "encoders" / "big")
    tokenizer.save_pretrained(kit / "encoders" / "big")
    raw = yaml.safe_load((kit / "models.yaml").read_text())
    raw["encoders"]["big"] = {"kind": "student", "source": "./encoders/big", "max_sequence_length": 77}
    (kit / "models.yaml").write_text(yaml.safe_dump(raw))
    return kit / "models.yaml"


def run(tiny: bool = False) -> dict:
    import numpy as np
    import redis as redis_lib
    import torch

    from service.models.embedding_cache import EmbeddingCache
    from service.models.generation import GenerationRequest, Generator
    from service.models.registry import Registry
    from service.redis_server import EmbeddedRedis
    from service.worker.embedding_store import RedisEmbeddingStore

    torch.set_num_threads(2)
    size = "t5-base" if tiny else "t5-large"
    prompts = [f"a photograph of a lighthouse number {i} on a cliff at sunset, dramatic sky" for i in
               range(4 if tiny else 12)]
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis() as server:
        registry = Registry.from_file(build_kit(Path(tmp), size))
        plain = Generator(registry)
        cached = Generator(registry, encoders=plain.encoders, embedding_cache=EmbeddingCache())
        store = RedisEmbeddingStore(redis_lib.Redis.from_url(server.url), max_bytes=2**30, ttl_s=600,
                                    max_entry_bytes=2**24)
        writer = Generator(registry, encoders=plain.encoders, embedding_cache=EmbeddingCache(store=store))
        reader = Generator(registry, encoders=plain.encoders, embedding_cache=EmbeddingCache(store=store))
        request = lambda p: GenerationRequest(prompt=p, pipeline="flux", encoder="big", seed=1, steps=2)  # noqa: E731
        plain.generate(request("warm up"))
        without, local_hits, shared_hits, identical = [], [], [], True
        for prompt in prompts:
            a = plain.generate(request(prompt))
            cached.generate(request(prompt))  # miss: fills the worker's memory
            b = cached.generate(request(prompt))  # hit in memory
            writer.generate(request(prompt))  # miss: fills Redis
            c = reader.generate(request(prompt))  # another worker: hit in Redis
            without.append(a.timings["encode"])
            local_hits.append(b.timings["encode"])
            shared_hits.append(c.timings["encode"])
            for other in (b, c):
                identical &= bool(np.array_equal(np.asarray(a.images[0]), np.asarray(other.images[0])))
    encoder_params = sum(p.numel() for p in plain.encoder("big").model.parameters())
    med = statistics.median
    record = {
        "command": "python -m bench run cache" + (" --tiny" if tiny else ""),
        "setting": f"{size}-sized encoder ({encoder_params / 1e6:.0f} M params, fp32, 2 threads), "
                   f"{len(prompts)} prompts, 77 tokens, demo FLUX denoiser",
        "rows": [
            {"encode stage": "no cache (the encoder runs)", "median_ms": med(without) * 1000},
            {"encode stage": "hit in the worker's memory", "median_ms": med(local_hits) * 1000},
            {"encode stage": "hit in Redis (another worker encoded it)", "median_ms": med(shared_hits) * 1000},
        ],
        "identical_images": identical,
        "targets": [target("encode stage, no cache / memory hit", med(without) / med(local_hits), ">=", 50, "x"),
                    target("identical images (1 = yes)", float(identical), ">=", 1)],
    }
    save("cache", record)
    return record
