"""The `t2i` command: generate for both pipelines and every demo encoder, models list, errors."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from tests.pixels import pixel_diff
from service.cli import main


@pytest.fixture(autouse=True)
def use_demo(models_file, monkeypatch):
    monkeypatch.setenv("T2I_MODELS_FILE", str(models_file))
    from service.settings import get_settings

    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.parametrize("pipeline", ["flux", "sd3"])
@pytest.mark.parametrize("encoder", ["t5-xxl", "t5-xxl-int8", "t5-large", "t5-base", "t5-small"])
def test_generate_writes_a_png(tmp_path, pipeline, encoder, capsys):
    out = tmp_path / "fox.png"
    code = main(["generate", "--pipeline", pipeline, "--encoder", encoder, "--prompt", "a red fox in snow",
                 "--seed", "7", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (64, 64)
    assert "seed 7" in capsys.readouterr().out


def test_console_script_same_seed_same_image(tmp_path, models_file):
    """The installed `t2i` entry point, in a fresh process, twice: the same image."""
    outs = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.webp"]
    for out in outs:
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "t2i"), "generate", "--encoder", "t5-base",
                        "--prompt", "a red fox in snow", "--seed", "7", "-o", str(out)],
                       check=True, env={**os.environ, "T2I_MODELS_FILE": str(models_file)}, capture_output=True)
    with Image.open(outs[0]) as a, Image.open(outs[1]) as b, Image.open(outs[2]) as c:
        assert pixel_diff(a, b)[1] == 0.0
        assert c.format == "WEBP" and c.size == a.size


def test_generate_with_a_controlnet(tmp_path, capsys):
    square = Image.new("RGB", (64, 64))
    square.paste((200, 200, 200), (16, 16, 48, 48))
    square.save(tmp_path / "square.png")
    base = ["generate", "--encoder", "t5-small", "--prompt", "a fox", "--seed", "2"]
    assert main(base + ["-o", str(tmp_path / "plain.png")]) == 0
    assert main(base + ["--control", "flux-canny", "--control-image", str(tmp_path / "square.png"),
                        "-o", str(tmp_path / "guided.png")]) == 0
    assert "control=" in capsys.readouterr().out
    with Image.open(tmp_path / "plain.png") as a, Image.open(tmp_path / "guided.png") as b:
        assert pixel_diff(a, b)[0] > 2.0


def test_default_encoder_is_the_teacher(tmp_path, capsys):
    assert main(["generate", "--prompt", "a fox", "--seed", "1", "-o", str(tmp_path / "t.png")]) == 0
    assert main(["generate", "--encoder", "t5-xxl", "--prompt", "a fox", "--seed", "1",
                 "-o", str(tmp_path / "x.png")]) == 0
    with Image.open(tmp_path / "t.png") as a, Image.open(tmp_path / "x.png") as b:
        assert pixel_diff(a, b)[1] == 0.0


def test_generate_with_a_route_runs_the_encoder_it_picks(tmp_path, capsys):
    """`--encoder auto`: a sign prompt on the teacher, a shape prompt on t5-base, the same image as naming them."""
    for prompt, encoder, rule in (("a sign reading 'cat'", "t5-xxl", "written-text"),
                                  ("two green triangles", "t5-base", "default")):
        assert main(["generate", "--encoder", "auto", "--prompt", prompt, "--seed", "2",
                     "-o", str(tmp_path / "routed.png")]) == 0
        assert f"route auto: {rule} -> {encoder}" in capsys.readouterr().err
        assert main(["generate", "--encoder", encoder, "--prompt", prompt, "--seed", "2",
                     "-o", str(tmp_path / "named.png")]) == 0
        with Image.open(tmp_path / "routed.png") as a, Image.open(tmp_path / "named.png") as b:
            assert pixel_diff(a, b)[1] == 0.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--encoder", "t5-tiny"], "unknown encoder 't5-tiny'; known: t5-base, t5-large, t5-small, t5-xxl"),
        (["--encoder", "fastest"], "; routes: auto"),
        (["--pipeline", "sdxl"], "unknown pipeline 'sdxl'; known: flux, sd3"),
        (["--width", "100"], "`width`=100 is not a multiple of 8"),
        (["-o", "x.gif"], "use one of .png"),
        (["--control", "flux-canny"], "`--control` and `--control-image` go together"),
        (["--control", "flux-canny", "--control-image", "/nonexistent.png"], "'/nonexistent.png' cannot be read"),
        (["--control", "flux-canny", "--control-image", __file__], "`control_image` is not a decodable image"),
        (["--control", "nope", "--control-image", "SQUARE"], "unknown controlnet 'nope'"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, message, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "square.png")
    args = [str(tmp_path / "square.png") if a == "SQUARE" else a for a in args]
    argv = ["generate", "--prompt", "a fox", "-o", str(tmp_path / "x.png")] + args
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_models_list(capsys):
    assert main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"flux", "sd3", "t5-xxl", "t5-xxl-int8", "t5-xxl-fp8", "t5-xxl-nf4", "t5-large", "t5-base",
                         "t5-small", "auto"}
    assert rows["auto"]["type"] == "route" and rows["auto"]["default"] == "t5-base"
    rows = {n: r for n, r in rows.items() if r["type"] != "route"}
    assert rows["t5-xxl-nf4"]["quantization"] == "bnb-nf4" and rows["t5-xxl"]["quantization"] is None
    assert rows["t5-xxl-nf4"]["params"] == rows["t5-xxl"]["params"]
    assert rows["t5-xxl-nf4"]["bytes"] < rows["t5-xxl"]["bytes"] / 2
    assert rows["t5-xxl"]["params"] > rows["t5-large"]["params"] > rows["t5-base"]["params"] > rows["t5-small"]["params"]
    assert all(rows[n]["width"] == 64 for n in rows)
    assert rows["t5-base"]["source"].startswith("local ") and rows["t5-base"]["device"] == "cpu"
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "t5-small" in out and "written-text: asks for written text -> t5-xxl" in out
