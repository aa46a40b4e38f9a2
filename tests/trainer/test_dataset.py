"""The three-criteria prompt set: counts, determinism, user files, filters, and clear errors."""

import json
from pathlib import Path

import pytest

from service.errors import ConfigError
from trainer.config import DatasetConfig, load_config
from trainer.dataset import build

COMPBENCH = Path(__file__).parents[3] / "shared" / "data" / "t2i-compbench"


def config(models_file, *overrides) -> DatasetConfig:
    c = load_config(DatasetConfig, "builtin-prompts", list(overrides))
    c.models_file = str(models_file)
    return c


def test_counts_manifest_and_determinism(models_file, tmp_path):
    first = build(config(models_file), tmp_path / "a")
    build(config(models_file), tmp_path / "b")
    for name in ("train.jsonl", "validation.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    counts = first["counts"]
    assert all(counts["train"][c] > 0 and counts["validation"][c] > 0 for c in counts["train"])
    total = sum(counts["train"].values()) + sum(counts["validation"].values())
    assert abs(sum(counts["validation"].values()) / total - 0.1) < 0.02
    assert first["sources"]["semantics"]["generated"] > 0 and first["sources"]["semantics"]["builtin"] == 10
    assert set(first["categories"]["semantics"]) >= {"color", "shape", "texture", "spatial", "non_spatial", "complex"}
    rows = [json.loads(line) for line in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    assert len({r["prompt"].lower() for r in rows}) == len(rows)  # deduplicated
    assert any("sign" in r["prompt"] for r in rows if r["criterion"] == "text_rendering")


def test_user_files_score_filter_length_filter_and_mixing(models_file, tmp_path):
    (tmp_path / "aesthetic.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"caption": "a misty lake at sunrise", "score": 7.0},
        {"caption": "a blurry photo", "score": 4.0},
        {"caption": "a golden field " + "very " * 60 + "long", "score": 8.0},
        {"caption": "a misty lake at sunrise", "score": 6.9},
    ]))
    (tmp_path / "color_train.csv").write_text("prompt\na red car\na blue car\na red car\n")
    (tmp_path / "signs.txt").write_text("A dog holding a sign reading 'hi'\n\nA cat holding a sign reading 'yo'\n")
    c = config(models_file, f"--image_quality.files=[{{path: {tmp_path}/aesthetic.jsonl, column: caption, "
               "score_column: score, min_score: 6.5}]", "--image_quality.builtin=false",
               f"--semantics.files=[{{path: {tmp_path}/color_train.csv}}]", "--semantics.generated=0",
               "--semantics.builtin=false", f"--text_rendering.files=[{{path: {tmp_path}/signs.txt}}]",
               "--text_rendering.generated=0", "--validation_fraction=0")
    manifest = build(c, tmp_path / "out")
    assert manifest["filtered"]["below_min_score"] == {"image_quality": 1}
    assert manifest["filtered"]["too_long"] == {"image_quality": 1}
    assert manifest["filtered"]["duplicates"] == {"image_quality": 1, "semantics": 1}
    assert manifest["counts"]["train"] == {"image_quality": 1, "semantics": 2, "text_rendering": 2}
    assert manifest["categories"]["semantics"] == {"color": 2}

    mixed = build(config(models_file, "--total=200", "--text_rendering.weight=2", "--semantics.weight=1",
                         "--image_quality.weight=1"), tmp_path / "mixed")
    sizes = {k: mixed["counts"]["train"][k] + mixed["counts"]["validation"][k] for k in mixed["counts"]["train"]}
    assert sizes["text_rendering"] == 100 and sizes["semantics"] == 50
    assert mixed["shortfall"]["image_quality"] > 0  # fewer built-in captions than asked: reported, not invented


@pytest.mark.parametrize("overrides, words", [
    (["--semantics.files=[{path: /nowhere/p.txt}]"], ["/nowhere/p.txt", "does not exist"]),
    (["--semantics.files=[{path: PATH, column: text}]"], ["no column 'text'"]),
    (["--image_quality.builtin=false", "--semantics.generated=0", "--semantics.builtin=false",
      "--text_rendering.generated=0"], ["empty after filtering"]),
    (["--image_quality.generated=5"], ["no built-in generator for image_quality"]),
    (["--semantic.generated=5"], ["unknown config key `semantic`"]),
])
def test_bad_input_stops_with_the_name(models_file, tmp_path, overrides, words):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n')
    overrides = [o.replace("PATH", str(tmp_path / "p.jsonl")) for o in overrides]
    with pytest.raises(ConfigError) as err:
        build(config(models_file, *overrides), tmp_path / "out")
    for word in words:
        assert word in str(err.value)


@pytest.mark.skipif(not COMPBENCH.is_dir(), reason="reference T2I-CompBench prompts not present")
def test_reads_the_t2i_compbench_files(models_file, tmp_path):
    files = ", ".join(f"{{path: {COMPBENCH}/{c}_train.txt}}" for c in ("color", "shape", "texture", "spatial",
                                                                       "non_spatial", "complex"))
    manifest = build(config(models_file, f"--semantics.files=[{files}]", "--semantics.generated=0",
                            "--max_tokens=77"), tmp_path / "cb")
    categories = manifest["categories"]["semantics"]
    assert {"color", "shape", "texture", "spatial", "non_spatial", "complex"} <= set(categories)
    assert manifest["sources"]["semantics"]["color_train.txt"] > 100
