"""The evaluator's accuracy of an encoder on held-out prompts of the miniature world: `t2i world eval`.

    t2i world eval --models-file kit/models.yaml --encoder t5-xxl --encoder t5-base --prompts 120

Prompts come from scenes drawn with a seed the training never used; each is generated through the service's own
generation code (same seed for every encoder) and read back by the exact evaluator. Accuracy is reported per
criterion (semantics: single, count and relation prompts; text rendering: signs) and per attribute.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from service.models.generation import GenerationRequest, Generator
from trainer.world.captions import EVAL_SEED, held_out_prompts, parse  # noqa: F401 (re-exported)
from trainer.world.evaluator import accuracy, score


def criterion_of(kind: str) -> str:
    return "text_rendering" if kind == "text" else "semantics"


def encoder_accuracy(generator: Generator, pipeline: str, encoder: str, prompts: list[str], seed: int = 0,
                     steps: int | None = None) -> dict:
    """Per attribute and per criterion accuracy of one encoder over the prompts."""
    by_attribute, by_criterion = [], defaultdict(list)
    for i, prompt in enumerate(prompts):
        truth = parse(prompt)
        image = generator.generate(GenerationRequest(prompt=prompt, pipeline=pipeline, encoder=encoder,
                                                     seed=seed + i, steps=steps)).images[0]
        result = score(np.asarray(image.convert("RGB")), truth)
        by_attribute.append(result)
        by_criterion[criterion_of(truth["kind"])].append(all(result.values()))
    return {"attributes": accuracy(by_attribute),
            "criteria": {c: float(np.mean(v)) for c, v in sorted(by_criterion.items())},
            "prompts": len(prompts)}


def plot_accuracy(report: dict, path) -> None:
    """Grouped bars: accuracy per criterion and attribute, one bar per encoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report)
    keys = sorted({k for r in report.values() for k in r["attributes"]}) + ["text_rendering"]
    keys = list(dict.fromkeys(k for k in keys if k != "text"))
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=100)
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        values = [report[name]["criteria"].get(k, report[name]["attributes"].get(k, 0.0)) for k in keys]
        ax.bar([i + j * width for i in range(len(keys))], values, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], keys)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("evaluator accuracy")
    ax.legend(fontsize=8, ncol=len(names))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
