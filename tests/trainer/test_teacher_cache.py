import pytest
import torch

from service.errors import ConfigError
from trainer.components import Components
from trainer.dataset import read_split
from trainer.teacher_cache import TeacherCache, build_cache


@pytest.mark.parametrize("pipeline", ["flux", "sd3"])
def test_round_trip_equals_the_live_teacher(tiny, prompt_dir, tmp_path, pipeline):
    config = tiny(pipeline=pipeline)
    splits = {s: read_split(prompt_dir, s)[:40] for s in ("train", "validation")}
    components = Components(config, device=torch.device("cpu"), with_student=False)
    build_cache(config, components, splits, tmp_path / "cache", show_progress=False)
    cache = TeacherCache(tmp_path / "cache", config, components.teacher_name, splits)
    rows = [3, 0, 17]
    t5, clip, pooled = cache.get("train", rows)
    live_t5, live_clip, live_pooled = components.teacher_conditioning([splits["train"][i]["prompt"] for i in rows])
    torch.testing.assert_close(t5, live_t5)
    torch.testing.assert_close(pooled, live_pooled)
    if pipeline == "sd3":
        torch.testing.assert_close(clip, live_clip)
    else:
        assert clip is None and live_clip is None


def test_a_cache_for_other_prompts_or_lengths_is_refused(tiny, prompt_dir, tmp_path):
    config = tiny()
    splits = {s: read_split(prompt_dir, s)[:10] for s in ("train", "validation")}
    components = Components(config, device=torch.device("cpu"), with_student=False)
    build_cache(config, components, splits, tmp_path / "cache", show_progress=False)
    other = {**splits, "train": splits["train"][:9]}
    with pytest.raises(ConfigError, match="does not match the train prompts"):
        TeacherCache(tmp_path / "cache", config, components.teacher_name, other)
    with pytest.raises(ConfigError, match="max_sequence_length=48"):
        TeacherCache(tmp_path / "cache", tiny(max_sequence_length=40), components.teacher_name, splits)
    with pytest.raises(ConfigError, match="cache-teacher"):
        TeacherCache(tmp_path / "nothing", config, components.teacher_name, splits)
