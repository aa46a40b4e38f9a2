import pytest

from trainer.config import DatasetConfig, DistillConfig, load_config


@pytest.fixture(scope="session")
def prompt_dir(tmp_path_factory, models_file):
    from trainer.dataset import build

    config = load_config(DatasetConfig, "builtin-prompts", ["--semantics.generated=120",
                                                            "--text_rendering.generated=60"])
    config.models_file = str(models_file)
    out = tmp_path_factory.mktemp("prompts")
    build(config, out)
    return out


@pytest.fixture()
def tiny(models_file, prompt_dir, tmp_path):
    """The tiny-cpu preset on the test kit, writing into a fresh run dir; keyword overrides as --key=value."""
    def make(**overrides) -> DistillConfig:
        base = {"models_file": models_file, "data": prompt_dir, "output_dir": tmp_path / "run", "max_steps": 16,
                "eval_every": 8, "checkpoint_every": 8, "student_dropout": 0}
        base.update(overrides)
        return load_config(DistillConfig, "tiny-cpu", [f"--{k}={v}" for k, v in base.items()])

    return make
