"""The miniature kit's canny ControlNet: a canny image of a square makes the image's edges follow it, with the teacher
and every student, by a stated margin over the same prompts and seeds without it (docs/miniature.md has the figures);
and the trainer's step runs."""

import numpy as np
import pytest
import torch
from PIL import Image

from service.models.control import canny
from service.models.registry import MINIATURE_KIT, Registry
from trainer.world.control import control_eval, edge_correlation, square_controls

pytestmark = pytest.mark.skipif(not MINIATURE_KIT.exists(), reason="the miniature kit is not built")

MARGIN = 0.5  # measured: +0.55 to +0.83 on 4 seeds, teacher, quantized teachers and students (docs/miniature.md)


@pytest.fixture(scope="module")
def registry():
    return Registry.from_file(MINIATURE_KIT)


def test_edges_follow_the_control_with_every_encoder(registry):
    report = control_eval(registry, list(registry.encoders), seeds=2)
    for encoder, row in report.items():
        assert row["with_control"] - row["without_control"] >= MARGIN, (encoder, row)
        assert row["n"] == 8


def test_edge_correlation_is_high_for_the_control_itself_and_low_for_another_place():
    (_, left), (_, right), *_ = square_controls()
    edges = canny(left)
    assert edge_correlation(left, edges) > 0.9
    assert edge_correlation(right, edges) < 0.2
    assert edge_correlation(Image.new("RGB", (32, 32)), edges) == 0.0


def test_the_trainer_writes_a_registered_controlnet_the_same_from_the_same_seed(tmp_path):
    """On copies of the shipped kit (64 image tokens: the ControlNet takes the kit's own latent grid)."""
    import shutil

    import yaml
    from safetensors.torch import load_file

    from trainer.world.control import train_controlnet

    outs = []
    for name in ("kit", "again"):
        shutil.copytree(MINIATURE_KIT.parent, tmp_path / name)
        outs.append(train_controlnet(tmp_path / name, steps=2, batch_size=4, dtype="float32"))
    kit, out = tmp_path / "kit", outs[0]
    first, second = (load_file(o / "diffusion_pytorch_model.safetensors") for o in outs)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(ValueError, match="exactly one"):
        train_controlnet(kit, steps=2, minutes=1.0)
    assert (out / "config.json").exists() and (out / "diffusion_pytorch_model.safetensors").exists()
    raw = yaml.safe_load((kit / "models.yaml").read_text())
    assert raw["controlnets"]["flux-canny"] == {"pipeline": "flux", "source": "./controlnets/flux-canny",
                                               "condition": "canny", "scale": 1.0}
    assert Registry.from_file(kit / "models.yaml").controlnet("flux-canny", "flux").condition == "canny"
    assert np.isfinite([float(line.split('"loss": ')[1].split(",")[0]) for line in
                        (kit / "controlnets" / "train_log.jsonl").read_text().splitlines()] or [0.0]).all()


def test_the_cli_evaluates_every_encoder_by_default(tmp_path, capsys):
    import json

    from service.cli import main

    out = tmp_path / "control.json"
    assert main(["world", "control-eval", "--kit", str(MINIATURE_KIT.parent), "--seeds", "1", "--out", str(out),
                 "--grid", str(tmp_path / "grid.png")]) == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    from service.models.registry import Registry

    assert sorted(report) == sorted(Registry.from_file(MINIATURE_KIT).encoders)  # the quantized teachers too
    assert Image.open(tmp_path / "grid.png").size == (96 * (1 + 2 * len(report)), 20 + 96 * 4 + 18)


def test_the_cli_stores_the_controlnet_in_float16_by_default_and_loads_it_in_float32(tmp_path, capsys):
    import shutil

    import torch
    from diffusers import FluxControlNetModel
    from safetensors.torch import load_file

    from service.cli import main

    kit = tmp_path / "kit"
    shutil.copytree(MINIATURE_KIT.parent, kit)
    assert main(["world", "controlnet", "--kit", str(kit), "--steps", "1"]) == 0, \
        capsys.readouterr().err
    out = kit / "controlnets" / "flux-canny"
    assert {t.dtype for t in load_file(out / "diffusion_pytorch_model.safetensors").values()} == {torch.float16}
    assert FluxControlNetModel.from_pretrained(out).dtype == torch.float32  # stock diffusers, no dtype asked
    from service.models.denoiser import Denoiser

    registry = Registry.from_file(kit / "models.yaml")
    denoiser = Denoiser.load(registry.pipeline("flux"), device="cpu")
    controlnet = denoiser.control_pipe(registry.controlnet("flux-canny", "flux")).controlnet
    assert {p.dtype for p in controlnet.parameters()} == {torch.float32}
    with pytest.raises(SystemExit):
        main(["world", "controlnet", "--kit", str(kit), "--dtype", "int8"])
    assert "--dtype" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["world", "controlnet", "--kit", str(kit), "--steps", "5", "--minutes", "1"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["world", "controlnet", "--kit", str(kit), "--steps", "0"]) == 2
    assert "`--steps`=0 must be above 0" in capsys.readouterr().err
