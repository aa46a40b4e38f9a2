"""The miniature world: captions parse back to their ground truth, and the evaluator reads ground-truth renders
correctly (it must score them >= 99% before it is trusted on generated images)."""

import random

import numpy as np

from trainer.world.captions import caption, parse
from trainer.world.evaluator import accuracy, score
from trainer.world.scene import KINDS, render, sample


def test_evaluator_scores_ground_truth_renders_at_least_99_percent():
    rng = random.Random(123)
    results = []
    for _ in range(2000):
        scene = sample(rng)
        results.append(score(render(scene), parse(caption(scene, rng))))
    acc = accuracy(results)
    assert set(acc) == {"color", "shape", "position", "size", "count", "relation", "text"}
    assert all(value >= 0.99 for value in acc.values()), acc


def test_evaluator_rejects_wrong_images():
    """Every attribute can fail: score a scene's render against another scene's caption of the same kind."""
    rng = random.Random(7)
    results = []
    for kind in KINDS:
        for _ in range(200):
            a, b = sample(rng, kind), sample(rng, kind)
            results.append(score(render(a), parse(caption(b, rng))))
    acc = accuracy(results)
    assert all(value < 0.9 for key, value in acc.items() if key != "size"), acc
    assert score(np.zeros((32, 32, 3), np.uint8), parse("a red circle on the left")) == \
        {"color": False, "shape": False, "position": False}


def test_captions_state_the_ground_truth():
    rng = random.Random(0)
    for _ in range(500):
        scene = sample(rng)
        text = caption(scene, rng)
        truth = parse(text)
        assert truth["kind"] == scene.kind, text
        assert all(truth[k] == v for k, v in scene.truth.items() if k in truth), (text, truth, scene.truth)
    assert parse("a red circle above a blue square") == {"kind": "relation", "color": "red", "shape": "circle",
                                                         "relation": "above", "color2": "blue", "shape2": "square"}
    assert parse("two green triangles") == {"kind": "count", "count": 2, "color": "green", "shape": "triangle"}
    assert parse("a photo of a dog") is None


def test_rendering_is_deterministic():
    a = [render(sample(random.Random(5))) for _ in range(2)]
    assert np.array_equal(a[0], a[1])


def test_failures_tell_how_images_miss_their_prompts():
    """Ground-truth renders scored against prompts they do not meet: three objects for "two", a relation drawn with
    its shapes swapped, one with its objects in the wrong places, and a render that meets its prompt."""
    from trainer.world.accuracy import drawn, failures
    from trainer.world.scene import Scene, Thing

    def row(scene: Scene, prompt: str) -> dict:
        image = render(scene)
        return {"prompt": prompt, "wrong": sorted(k for k, v in score(image, parse(prompt)).items() if not v),
                "found": drawn(image)}

    three = Scene("count", tuple(Thing("circle", "red", (x, 16), 6) for x in (6, 16, 26)))
    swapped = Scene("relation", (Thing("square", "red", (9, 16), 10), Thing("circle", "blue", (23, 16), 10)))
    rows = [row(three, "two red circles"), row(three, "three red circles"),
            row(swapped, "a red circle left of a blue square"), row(swapped, "a red square right of a blue circle")]
    how = failures(rows)
    assert how["every_attribute"] == {"count": (1, 2), "relation": (0, 2)}
    assert how["count_drawn"] == {2: {3: 1}, 3: {3: 1}}
    assert how["relation_failures"] == {"relation right": 1, "shapes swapped": 1, "relation wrong": 1,
                                        "shapes right": 1}
