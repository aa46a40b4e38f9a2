import pytest

from service.errors import ConfigError
from trainer.config import DistillConfig, load_config


def test_presets_load_and_mirror_the_dataclass():
    for preset in ("tiny-cpu", "flux-t5-base", "sd3-t5-base"):
        config = load_config(DistillConfig, preset)
        assert config.mode == "step-following"
    paper = load_config(DistillConfig, "flux-t5-base")
    assert (paper.lr, paper.micro_batch_size * 8, paper.trajectory_steps, paper.mixed_precision) == \
        (1e-4, 32, 20, "bf16")
    assert paper.guidance_choices == [2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]
    assert (paper.resolution, paper.high_resolution) == (512, 1024)


def test_overrides_are_typed():
    config = load_config(DistillConfig, "tiny-cpu", ["--max_steps=12", "--lr=0.5", "--zero_pooled=true",
                                                     "--guidance_choices=[1.0, 2.0]", "--teacher_cache=none"])
    assert (config.max_steps, config.lr, config.zero_pooled, config.guidance_choices, config.teacher_cache) == \
        (12, 0.5, True, [1.0, 2.0], None)


@pytest.mark.parametrize("override, words", [
    ("--learning_rate=1", ["unknown config key `learning_rate`", "lr"]),
    ("--max_steps=many", ["`max_steps`='many' is not a valid int"]),
    ("--mode=fast", ["`mode`='fast'", "step-following"]),
    ("--checkpoint_every=10", ["multiple of `trajectory_steps`=4"]),
    ("--zero_pooled=maybe", ["`zero_pooled`"]),
])
def test_bad_keys_and_values_are_named(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(DistillConfig, "tiny-cpu", [override])
    for word in words:
        assert word in str(err.value)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="tiny-cpu"):
        load_config(DistillConfig, "tiny-gpu")
