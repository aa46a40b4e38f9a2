"""The evaluator's accuracy of an encoder on held-out prompts of the miniature world: `t2i world eval`.

    t2i world eval --models-file kit/models.yaml --encoder t5-xxl --encoder t5-base --prompts 120

Prompts come from scenes drawn with a seed the training never used; each is generated through the service's own
generation code (same seed for every encoder) and read back by the exact evaluator. Accuracy is reported per
criterion (semantics: single, count and relation prompts; text rendering: signs) and per attribute.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from service.compare import wilson
from service.models.generation import GenerationRequest, Generator
from service.models.routing import decide
from trainer.world.captions import EVAL_SEED, held_out_prompts, parse  # noqa: F401 (re-exported)
from trainer.world.evaluator import accuracy, blobs, score


def criterion_of(kind: str) -> str:
    return "text_rendering" if kind == "text" else "semantics"


SEED_STRIDE = 100_000  # seed s of prompt i draws its noise from seed s * SEED_STRIDE + i


def drawn(image: np.ndarray) -> list[list]:
    """What the evaluator found in an image: [colour, shape, area in pixels] per object, largest first."""
    return [[b.color, "sign" if b.color == "sign" else b.shape, b.area] for b in blobs(image)]


def failures(images: list[dict]) -> dict:
    """How the images of `encoder_accuracy(..., details=True)` fail, from what the evaluator found in each: every
    attribute right per kind (right, of); for count prompts, how many objects of the colour were drawn per count
    asked; for relation prompts gone wrong, the shapes of the two named colours' objects (right, swapped, one copied
    from the other, other) and whether the relation held."""
    kinds: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    counts: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    relations: dict[str, int] = defaultdict(int)
    for row in images:
        truth = parse(row["prompt"])
        kinds[truth["kind"]][0] += not row["wrong"]
        kinds[truth["kind"]][1] += 1
        if truth["kind"] == "count":
            counts[truth["count"]][sum(1 for color, _, _ in row["found"] if color == truth["color"])] += 1
        elif truth["kind"] == "relation" and row["wrong"]:
            relations["relation wrong" if "relation" in row["wrong"] else "relation right"] += 1
            first = next((shape for color, shape, _ in row["found"] if color == truth["color"]), None)
            second = next((shape for color, shape, _ in row["found"] if color == truth["color2"]), None)
            if first is None or second is None:
                relations["a colour missing"] += 1
            elif (first, second) == (truth["shape"], truth["shape2"]):
                relations["shapes right"] += 1
            elif (first, second) == (truth["shape2"], truth["shape"]):
                relations["shapes swapped"] += 1
            else:
                relations["one shape copied" if first == second else "other shapes"] += 1
    return {"every_attribute": {k: tuple(v) for k, v in kinds.items()},
            "count_drawn": {asked: dict(sorted(drawn.items())) for asked, drawn in sorted(counts.items())},
            "relation_failures": dict(relations)}


def per_prompt(images: list[dict]) -> dict:
    """For the images of `encoder_accuracy(..., details=True)`: per prompt, how many of its images got every
    attribute right, of how many, and the seeds of those that did."""
    out: dict[str, dict] = {}
    for row in images:
        entry = out.setdefault(row["prompt"], {"right": 0, "of": 0, "right_seeds": []})
        entry["of"] += 1
        if not row["wrong"]:
            entry["right"] += 1
            entry["right_seeds"].append(row["seed"])
    return out


def encoder_accuracy(generator: Generator, pipeline: str, encoder: str, prompts: list[str], seed: int = 0,
                     steps: int | None = None, seeds: int = 1, details: bool = False,
                     same_seeds: bool = False, batch: int = 1) -> dict:
    """Per attribute and per criterion accuracy of one encoder (or route: each prompt on the encoder the route picks)
    over the prompts, each drawn with `seeds` seeds, with 95% Wilson intervals (`intervals`), the number of images
    behind each figure (`n`), the jobs per encoder that ran (`routed`) and the mean T5 encode time per job
    (`encode_s`, every encoder loaded before timing). With `details`, also per image (`images`): its prompt, seed,
    the attributes it got wrong and what the evaluator found in it, to see how an encoder fails, not only how often.

    Prompt i's seed s is `seed + s * SEED_STRIDE + i` (no two images share their noise), or, with `same_seeds`,
    `seed + s` for every prompt: the images a user gets by sending those prompts with those seeds. `batch` > 1 draws
    up to that many images in one denoising call, as the service's batching does (about 3x faster on a CPU); each
    image equals its unbatched one up to the rounding of batched kernels, so a borderline verdict can differ from a
    `batch` 1 run, which reproduces figures exactly."""
    route = generator.registry.routes.get(encoder)
    ran_on = [decide(route, p).encoder if route is not None else encoder for p in prompts]
    for name in dict.fromkeys(ran_on):
        generator.load(pipeline, name)
    jobs = [(s, i, seed + s if same_seeds else seed + s * SEED_STRIDE + i) for s in range(seeds)
            for i in range(len(prompts))]
    by_attribute, by_criterion, encode_s, images = [], defaultdict(list), [], []
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        drawn_images = {}
        for name in dict.fromkeys(ran_on[i] for _, i, _ in chunk):  # one denoising call per encoder in the chunk
            group = [(s, i, noise) for s, i, noise in chunk if ran_on[i] == name]
            results = generator.generate_batch([GenerationRequest(prompt=prompts[i], pipeline=pipeline, encoder=name,
                                                                  seed=noise, steps=steps) for _, i, noise in group])
            for job, result in zip(group, results):
                encode_s.append(result.timings["encode"] / len(group))
                drawn_images[job] = np.asarray(result.images[0].convert("RGB"))
        for job in chunk:
            _, i, noise = job
            truth, image = parse(prompts[i]), drawn_images[job]
            result = score(image, truth)
            by_attribute.append(result)
            if details:
                images.append({"prompt": prompts[i], "seed": noise, "encoder": ran_on[i],
                               "wrong": sorted(k for k, v in result.items() if not v), "found": drawn(image)})
            by_criterion[criterion_of(truth["kind"])].append(all(result.values()))
    counts = {c: (int(sum(v)), len(v)) for c, v in sorted(by_criterion.items())}
    for key in {k for r in by_attribute for k in r}:
        judged = [r[key] for r in by_attribute if key in r]
        counts.setdefault(key, (int(sum(judged)), len(judged)))
    return {"attributes": accuracy(by_attribute),
            "criteria": {c: float(np.mean(v)) for c, v in sorted(by_criterion.items())},
            "intervals": {k: list(wilson(*kn)) for k, kn in sorted(counts.items())},
            "n": {k: kn[1] for k, kn in sorted(counts.items())},
            "routed": {name: ran_on.count(name) * seeds for name in sorted(set(ran_on))},
            "encode_s": float(np.mean(encode_s)), "prompts": len(prompts), "seeds": seeds,
            **({"images": images, "failures": failures(images)} if details else {})}


def markdown_table(report: dict) -> str:
    """One row per encoder (or route): its size where known (a route's: the mean per job), then semantics, text
    rendering and every attribute, each with its 95% interval where the report has one; when a row is a route, also
    the share of jobs on each encoder and the mean encode time per job."""
    attributes = sorted({k for r in report.values() for k in r["attributes"]})
    sizes = [k for k in ("params", "bytes") if any(r.get(k) for r in report.values())]
    routes = any(set(r.get("routed", {name: 0})) != {name} for name, r in report.items())
    extra = ["jobs on", "encode ms/job"] if routes else []
    header = ["encoder", *sizes, *extra, "semantics", "text rendering", *attributes]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(r: dict, key: str, value: float | None) -> str:
        if value is None:
            return "-"
        low_high = r.get("intervals", {}).get(key)
        return f"{value:.0%}" + (f" [{low_high[0]:.0%}, {low_high[1]:.0%}]" if low_high else "")

    for name, r in report.items():
        cells = [f"{r[k]:,}" if r.get(k) else "-" for k in sizes]
        if routes:
            jobs = sum(r["routed"].values())
            cells += [", ".join(f"{n} {k / jobs:.0%}" for n, k in r["routed"].items()), f"{r['encode_s'] * 1e3:.1f}"]
        cells += [cell(r, "semantics", r["criteria"].get("semantics")),
                  cell(r, "text_rendering", r["criteria"].get("text_rendering"))]
        cells += [cell(r, a, r["attributes"].get(a)) for a in attributes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_frontier(report: dict, bytes_of: dict[str, int], quantized: set[str], path) -> None:
    """Accuracy per criterion against each encoder's bytes in memory (log scale), with 95% intervals: students as
    circles, quantized encoders as squares, the frontier (nothing smaller scores higher) as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    criteria = sorted({c for r in report.values() for c in r["criteria"]})
    fig, axes = plt.subplots(1, len(criteria), figsize=(5.2 * len(criteria), 3.8), dpi=100, squeeze=False)
    for ax, criterion in zip(axes[0], criteria):
        names = sorted((n for n in report if n in bytes_of and criterion in report[n]["criteria"]),
                       key=lambda n: bytes_of[n])
        frontier, best, placed = [], -1.0, []
        for name in names:
            value = report[name]["criteria"][criterion]
            low, high = report[name]["intervals"][criterion]
            ax.errorbar(bytes_of[name], value, yerr=[[max(0.0, value - low)], [max(0.0, high - value)]], fmt="s" if name in quantized
                        else "o", color="tab:orange" if name in quantized else "tab:blue", capsize=3)
            # Encoders of near-equal size and score (a quantized teacher beside a student) would overprint: their
            # labels form a column beside the first of them, each joined to its mark by a thin line.
            near = [(b, v) for b, v in placed if bytes_of[name] < 1.3 * b and abs(value - v) < 0.1]
            anchor = near[0] if near else (bytes_of[name], value)
            placed.append(anchor)
            ax.annotate(name, (bytes_of[name], value), xytext=(anchor[0] * 1.12, anchor[1] + 0.03 - 0.07 * len(near)),
                        textcoords="data", fontsize=8, va="center",
                        arrowprops={"arrowstyle": "-", "linewidth": 0.4, "color": "grey"} if near else None)
            if value > best:
                frontier.append((bytes_of[name], value))
                best = value
        ax.plot(*zip(*frontier), "--", color="tab:green", linewidth=1)
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.05)
        ax.set_xlabel("encoder bytes in memory (log)")
        ax.set_ylabel(f"{criterion.replace('_', ' ')} accuracy")
    fig.suptitle("students (circles) and quantized teachers (squares); dashed: the frontier", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
