"""Where a kit's teacher loses accuracy: `t2i world diagnose --kit KIT`.

Two checks that bound the denoiser from outside, each in minutes on one CPU core:
- **VAE round trip.** Held-out scenes are rendered, encoded and decoded by the kit's VAE, and read by the exact
  evaluator. No denoiser can draw better than its VAE decodes, so a rate below 100% here is the VAE's share of the
  teacher's errors. The renders themselves are scored too (the evaluator's own rate, which must be 100%).
- **Text probe.** A small attention probe (one learned query per attribute, as a denoiser's cross-attention reads
  text) is trained on the teacher encoder's frozen token embeddings of relation captions ("a red circle above a blue
  square") to recover each stated attribute, and scored on held-out captions; beside it the same probe on the
  encoder's context-free input embeddings, which hold the words but not their order. A probe that recovers the
  attributes says the prompt's meaning reaches the denoiser; what the teacher then gets wrong is the denoiser's.
  Beside it, a linear reader of each shape word's output alone measures how much it carries the colour word before
  it (`binding`): what a denoiser must read to give each object its own shape.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from transformers import AutoTokenizer, T5EncoderModel

from trainer.world.captions import EVAL_SEED, caption, parse
from trainer.world.evaluator import score
from trainer.world.scene import KINDS, PALETTE, RELATIONS, SHAPES, render, sample

RELATION_ATTRIBUTES = {"color": list(PALETTE), "shape": list(SHAPES), "relation": list(RELATIONS),
                       "color2": list(PALETTE), "shape2": list(SHAPES)}
PROBE_TRAIN_SEED = 1  # training draws: the probe learns on captions the evaluation never uses


def vae_roundtrip(vae: AutoencoderKL, n: int = 400, seed: int = EVAL_SEED) -> dict:
    """The evaluator's rates on `n` held-out scenes (the kinds in turn) after the VAE's encode and decode, and on the
    renders themselves: per attribute, and every attribute right per kind."""
    rng = random.Random(seed)
    attributes: dict[str, dict[str, list[bool]]] = {"decoded": defaultdict(list), "rendered": defaultdict(list)}
    every: dict[str, dict[str, list[bool]]] = {"decoded": defaultdict(list), "rendered": defaultdict(list)}
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        scene = sample(rng, kind)
        truth = parse(caption(scene, rng))
        image = render(scene)
        pixels = torch.from_numpy(image.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        with torch.no_grad():
            decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample[0]
        decoded = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        for name, picture in (("decoded", decoded), ("rendered", image)):
            result = score(picture, truth)
            for key, ok in result.items():
                attributes[name][key].append(ok)
            every[name][kind].append(all(result.values()))
    return {name: {"attributes": {k: float(np.mean(v)) for k, v in sorted(attributes[name].items())},
                   "every_attribute": {k: float(np.mean(v)) for k, v in every[name].items()}}
            for name in ("decoded", "rendered")} | {"scenes": n}


class AttentionProbe(torch.nn.Module):
    """One learned query per attribute attends over the token embeddings; a linear head reads each answer."""

    def __init__(self, width: int, classes: list[int], dim: int = 64):
        super().__init__()
        self.queries = torch.nn.Parameter(torch.randn(len(classes), dim) * 0.1)
        self.keys = torch.nn.Linear(width, dim)
        self.values = torch.nn.Linear(width, dim)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(dim, c) for c in classes)
        self.scale = dim ** -0.5

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        weights = torch.einsum("qd,btd->bqt", self.queries, self.keys(tokens)) * self.scale
        weights = weights.masked_fill(mask[:, None] == 0, float("-inf")).softmax(-1)
        read = torch.einsum("bqt,btd->bqd", weights, self.values(tokens))
        return [head(read[:, i]) for i, head in enumerate(self.heads)]


def _relation_captions(seed: int, n: int) -> tuple[list[str], torch.Tensor]:
    rng = random.Random(seed)
    captions, labels = [], []
    for _ in range(n):
        scene = sample(rng, "relation")
        captions.append(caption(scene, rng))
        labels.append([values.index(scene.truth[key]) for key, values in RELATION_ATTRIBUTES.items()])
    return captions, torch.tensor(labels)


def _fit_probe(train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               test: tuple[torch.Tensor, torch.Tensor, torch.Tensor], steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    tokens, mask, labels = train
    probe = AttentionProbe(tokens.shape[-1], [len(v) for v in RELATION_ATTRIBUTES.values()])
    optimizer = torch.optim.Adam(probe.parameters(), lr=3e-3)
    for _ in range(steps):
        pick = torch.randint(0, len(tokens), (256,))
        outputs = probe(tokens[pick], mask[pick])
        loss = sum(F.cross_entropy(out, labels[pick, j]) for j, out in enumerate(outputs))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    tokens, mask, labels = test
    with torch.no_grad():
        right = torch.stack([out.argmax(-1) == labels[:, j] for j, out in enumerate(probe(tokens, mask))])
    rates = {key: right[j].float().mean().item() for j, key in enumerate(RELATION_ATTRIBUTES)}
    return {"attributes": rates, "every_attribute": right.all(0).float().mean().item()}


def _fit_linear(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], classes: int,
                steps: int, seed: int) -> float:
    """A linear reader's held-out accuracy (features standardised on the training split)."""
    torch.manual_seed(seed)
    (x, y), (x_test, y_test) = train, test
    mean, std = x.mean(0), x.std(0) + 1e-6
    reader = torch.nn.Linear(x.shape[-1], classes)
    optimizer = torch.optim.Adam(reader.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(reader((x - mean) / std), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (reader((x_test - mean) / std).argmax(-1) == y_test).float().mean().item()


def binding(tokens: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, test: tuple, steps: int = 500,
            seed: int = 0) -> dict[str, float]:
    """How much each shape word's output embedding, read alone by a linear reader, says about the colour word just
    before it, in relation captions ("a red circle above a blue square": the first shape word is the third token,
    the second the last word). A trained T5 binds neighbouring words this way; an encoder whose outputs are a bag of
    words cannot tell the reader which colour a shape had (half right at best, between the caption's two colours)."""
    def at_shapes(tokens, mask):
        last = mask.sum(1) - 2  # the last word, before </s>
        return tokens[:, 2], tokens[torch.arange(len(tokens)), last]

    (first, second), (first_test, second_test) = at_shapes(tokens, mask), at_shapes(*test[:2])
    colours = len(PALETTE)
    return {"first_shape_to_its_color": _fit_linear((first, labels[:, 0]), (first_test, test[2][:, 0]), colours,
                                                    steps, seed),
            "second_shape_to_its_color": _fit_linear((second, labels[:, 3]), (second_test, test[2][:, 3]), colours,
                                                     steps, seed)}


def embeddings(encoder: T5EncoderModel, tokenizer, captions: list[str], max_tokens: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The encoder's output for each caption's tokens, their context-free input embeddings, and the padding mask."""
    batch = tokenizer(captions, padding="max_length", max_length=max_tokens, truncation=True, return_tensors="pt")
    with torch.no_grad():
        contextual = encoder(batch.input_ids, attention_mask=batch.attention_mask)[0]
        words = encoder.get_input_embeddings()(batch.input_ids)
    return contextual, words, batch.attention_mask


def text_probe(encoder: T5EncoderModel, tokenizer, *, max_tokens: int, train: int = 8000, test: int = 2000,
               steps: int = 1500, seed: int = 0) -> dict:
    """The probe's held-out rates on relation captions, from the encoder's output and from its input embeddings."""
    train_captions, train_labels = _relation_captions(PROBE_TRAIN_SEED, train)
    test_captions, test_labels = _relation_captions(EVAL_SEED, test)
    ctx_train, words_train, mask_train = embeddings(encoder, tokenizer, train_captions, max_tokens)
    ctx_test, words_test, mask_test = embeddings(encoder, tokenizer, test_captions, max_tokens)
    return {
        "encoder_output": _fit_probe((ctx_train, mask_train, train_labels), (ctx_test, mask_test, test_labels),
                                     steps, seed),
        "input_embeddings": _fit_probe((words_train, mask_train, train_labels), (words_test, mask_test, test_labels),
                                       steps, seed),
        "binding": binding(ctx_train, mask_train, train_labels, (ctx_test, mask_test, test_labels), seed=seed),
        "captions": {"train": train, "test": test}, "probe_steps": steps,
    }


def diagnose(kit: str | Path, *, scenes: int = 400, probe_steps: int = 1500, probe_train: int = 8000,
             probe_test: int = 2000, encoder: str = "t5-xxl") -> dict:
    """Both checks on a kit from `t2i world train` (the VAE of its FLUX pipeline, its teacher encoder)."""
    from trainer.world.train import MAX_TOKENS

    kit = Path(kit)
    vae = AutoencoderKL.from_pretrained(kit / "pipelines" / "flux" / "vae").eval()
    teacher = T5EncoderModel.from_pretrained(kit / "encoders" / encoder).eval()
    tokenizer = AutoTokenizer.from_pretrained(kit / "encoders" / encoder)
    return {"kit": str(kit), "vae_roundtrip": vae_roundtrip(vae, scenes),
            "text_probe": text_probe(teacher, tokenizer, max_tokens=MAX_TOKENS, train=probe_train, test=probe_test,
                                     steps=probe_steps)}
