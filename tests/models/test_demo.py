import hashlib
import os

from service.cli import main


def digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_make_demo_is_byte_identical_and_complete(tmp_path, demo_dir, capsys):
    assert main(["models", "make-demo", str(tmp_path / "again")]) == 0
    assert "wrote the demo model kit" in capsys.readouterr().out
    first, second = digests(demo_dir), digests(tmp_path / "again")
    assert first == second
    for role in ("t5-xxl", "t5-large", "t5-base", "t5-small"):
        assert f"encoders/{role}/model.safetensors" in first and f"encoders/{role}/tokenizer.json" in first
    # Students share the teacher's tokenizer, file for file.
    assert len({first[f"encoders/{r}/tokenizer.json"] for r in ("t5-xxl", "t5-base", "t5-small")}) == 1
    assert "pipelines/flux/transformer/diffusion_pytorch_model.safetensors" in first
    assert "pipelines/sd3/text_encoder_2/model.safetensors" in first


def test_make_demo_refuses_a_non_empty_dir(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    assert main(["models", "make-demo", str(tmp_path / "x")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_make_demo_files_are_as_readable_as_the_umask_allows(demo_dir):
    umask = os.umask(0o022)
    os.umask(umask)
    files = [p for p in demo_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)  # safetensors alone would write these 0600
    assert {p: oct(p.stat().st_mode & 0o777) for p in files} == {p: oct(0o666 & ~umask) for p in files}
