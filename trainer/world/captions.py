"""Captions for scenes, from varied templates with paraphrases; and the parser that reads a caption back into the
ground truth it states (so any prompt in the world's grammar can be scored, not only generated ones)."""

from __future__ import annotations

import random
import re

from trainer.world.scene import KINDS, OBJECT_SIZES, PALETTE, POSITIONS, RELATIONS, SHAPES, WORDS, Scene, sample

EVAL_SEED = 10_000  # training draws scenes from seeds < 10_000
VALIDATION_SEED = 4242  # semantic prompts for choosing defaults (guidance, steps); the held-out set is never tuned on

COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
POSITION_PHRASES = {
    "left": ["on the left", "at the left", "to the left"], "right": ["on the right", "at the right", "to the right"],
    "top": ["at the top", "on top", "near the top"], "bottom": ["at the bottom", "near the bottom", "below"],
    "centre": ["in the centre", "in the middle", "at the center"],
}
RELATION_PHRASES = {
    "left of": ["left of", "to the left of"], "right of": ["right of", "to the right of"],
    "above": ["above", "over"], "below": ["below", "under"],
}


def caption(scene: Scene, rng: random.Random) -> str:
    t = scene.truth
    if scene.kind == "single":
        size = t["size"] + " " if rng.random() < 0.5 else ""
        pos = rng.choice(POSITION_PHRASES[t["position"]])
        return rng.choice([f"a {size}{t['color']} {t['shape']} {pos}", f"{pos}, a {size}{t['color']} {t['shape']}",
                           f"there is a {size}{t['color']} {t['shape']} {pos}"])
    if scene.kind == "count":
        n, plural = t["count"], t["shape"] + ("s" if t["count"] > 1 else "")
        return rng.choice([f"{COUNT_WORDS[n]} {t['color']} {plural}", f"{n} {t['color']} {plural}"])
    if scene.kind == "relation":
        rel = rng.choice(RELATION_PHRASES[t["relation"]])
        return f"a {t['color']} {t['shape']} {rel} a {t['color2']} {t['shape2']}"
    return rng.choice(TEXT_TEMPLATES).format(word=t["word"])


TEXT_TEMPLATES = ("a sign reading '{word}'", "a sign that says '{word}'", "the word '{word}' on a sign")


def is_novel(scene: Scene, text: str) -> bool:
    """Whether a scene and its caption use a combination that training never sees: about 1 in 10 of the
    colour x shape x position combinations of single objects, and 1 in 3 of the word x template combinations of
    signs (every word is still seen, with its other templates). Training draws skip these; `novel_prompts` draws
    only these, so an accuracy on them measures generalisation, not recall."""
    t = scene.truth
    if scene.kind == "single":
        color, shape, position = list(PALETTE).index(t["color"]), SHAPES.index(t["shape"]), \
            list(POSITIONS).index(t["position"])
        return (color + 2 * shape + 3 * position) % 10 == 0
    if scene.kind == "text":
        template = next(i for i, tpl in enumerate(TEXT_TEMPLATES) if tpl.split("{")[0] in text)
        return (WORDS.index(t["word"]) + template) % 3 == 0
    return False


def training_scene(rng: random.Random, kind: str | None = None) -> tuple[Scene, str]:
    """A scene and its caption as training draws them: never a held-out (novel) combination."""
    while True:
        scene = sample(rng, kind)
        text = caption(scene, rng)
        if not is_novel(scene, text):
            return scene, text


_COLOR = "|".join(PALETTE)
_SHAPE = "|".join(SHAPES)


def parse(text: str) -> dict | None:
    """The ground truth a caption states, or None when it is outside the world's grammar."""
    text = text.lower().strip()
    if m := re.search(r"'([a-z]{2,4})'", text):
        return {"kind": "text", "word": m.group(1)}
    rel_words = "|".join(sorted({p for ps in RELATION_PHRASES.values() for p in ps}, key=len, reverse=True))
    if m := re.search(rf"({_COLOR}) ({_SHAPE}) ({rel_words}) an? ({_COLOR}) ({_SHAPE})", text):
        relation = next(r for r, ps in RELATION_PHRASES.items() if m.group(3) in ps)
        return {"kind": "relation", "color": m.group(1), "shape": m.group(2), "relation": relation,
                "color2": m.group(4), "shape2": m.group(5)}
    if m := re.search(rf"\b(one|two|three|1|2|3) ({_COLOR}) ({_SHAPE})s?\b", text):
        count = {"one": 1, "two": 2, "three": 3}.get(m.group(1)) or int(m.group(1))
        return {"kind": "count", "count": count, "color": m.group(2), "shape": m.group(3)}
    if m := re.search(rf"(?:(small|large) )?({_COLOR}) ({_SHAPE})", text):
        truth = {"kind": "single", "color": m.group(2), "shape": m.group(3)}
        if m.group(1):
            truth["size"] = m.group(1)
        for position, phrases in POSITION_PHRASES.items():
            if any(p in text for p in phrases):
                truth["position"] = position
                break
        return truth
    return None


def held_out_prompts(n: int, seed: int = EVAL_SEED, kinds: tuple[str, ...] = KINDS) -> list[str]:
    """`n` prompts, `kinds` in turn, drawn from a seed the training never used."""
    rng = random.Random(seed)
    return [caption(sample(rng, kinds[i % len(kinds)]), rng) for i in range(n)]


def novel_prompts(n: int, seed: int = EVAL_SEED + 1, kinds: tuple[str, ...] = ("single", "text")) -> list[str]:
    """`n` prompts, `kinds` in turn, of combinations training never sees (`is_novel`)."""
    rng, prompts = random.Random(seed), []
    while len(prompts) < n:
        scene = sample(rng, kinds[len(prompts) % len(kinds)])
        text = caption(scene, rng)
        if is_novel(scene, text):
            prompts.append(text)
    return prompts


assert set(POSITION_PHRASES) == set(POSITIONS) and set(RELATION_PHRASES) == set(RELATIONS)
assert set(OBJECT_SIZES) == {"small", "large"}
