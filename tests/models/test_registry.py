from pathlib import Path

import pytest

from service.errors import ConfigError, ModelLoadError, UnknownNameError
from service.models.registry import Registry


def test_demo_registry_lists_both_pipelines_and_every_role(registry):
    assert set(registry.pipelines) == {"flux", "sd3"}
    assert set(registry.encoders) == {"t5-xxl", "t5-xxl-int8", "t5-xxl-fp8", "t5-xxl-nf4", "t5-large", "t5-base",
                                      "t5-small"}
    assert registry.teacher.name == "t5-xxl"
    assert {e.kind for n, e in registry.encoders.items() if not n.startswith("t5-xxl")} == {"student"}
    quantized = {n: e.quantization.method for n, e in registry.encoders.items() if e.quantization}
    assert quantized == {"t5-xxl-int8": "int8-weight-only", "t5-xxl-fp8": "fp8-weight-only", "t5-xxl-nf4": "bnb-nf4"}
    assert {registry.encoder(n).source for n in quantized} == {registry.teacher.source}  # one copy on disk


def test_relative_sources_resolve_against_the_models_file(registry, demo_dir):
    assert Path(registry.encoder("t5-base").source) == demo_dir / "encoders" / "t5-base"
    assert registry.encoder("t5-base").is_local


def test_unknown_names_list_the_known_ones(registry):
    with pytest.raises(UnknownNameError) as err:
        registry.encoder("t5-tiny")
    assert "t5-tiny" in str(err.value) and "t5-base" in str(err.value) and "t5-xxl" in str(err.value)
    assert err.value.field == "encoder"
    with pytest.raises(UnknownNameError, match="known: flux, sd3"):
        registry.pipeline("sdxl")


def test_toml_models_file(tmp_path, demo_dir):
    (tmp_path / "models.toml").write_text(
        f'[pipelines.flux]\nfamily = "flux"\nsource = "{demo_dir}/pipelines/flux"\n'
        f'[encoders.t5-xxl]\nkind = "teacher"\nsource = "{demo_dir}/encoders/t5-xxl"\nmax_sequence_length = 16\n'
    )
    reg = Registry.from_file(tmp_path / "models.toml")
    assert reg.encoder("t5-xxl").max_sequence_length == 16 and reg.pipeline("flux").family == "flux"


@pytest.mark.parametrize(
    "text, words",
    [
        ("pipelines:\n  flux:\n    family: flux\n    source: x\n    colour: red\n", ["flux", "colour"]),
        ("pipelines:\n  flux:\n    family: sdxl\n    source: x\n", ["family"]),
        ("encoders:\n  a:\n    kind: teacher\n    source: x\n  b:\n    kind: teacher\n    source: y\n", ["teacher"]),
        ("encoders:\n  a:\n    kind: student\n    source: x\n    max_sequence_length: 0\n", ["max_sequence_length"]),
        ("pipelines: [\n", ["not valid"]),
        ("servers: {}\n", ["servers"]),
    ],
)
def test_bad_models_files_name_the_key(tmp_path, text, words):
    path = tmp_path / "models.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        Registry.from_file(path)
    for word in words:
        assert word in str(err.value)


def test_unreadable_models_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        Registry.from_file(tmp_path / "missing.yaml")


def test_missing_local_weights_directory_is_named(tmp_path):
    reg = Registry.from_dict({"encoders": {"s": {"kind": "student", "source": "./nowhere"}}}, base_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="nowhere.*does not exist"):
        reg.encoder("s").check_local("encoder 's'")


def test_example_models_file_for_real_checkpoints_parses():
    example = Path(__file__).parents[2] / "models.example.yaml"
    reg = Registry.from_file(example)
    assert {"flux-dev", "flux-schnell", "sd3.5-large"} <= set(reg.pipelines)
    assert reg.teacher.name == "t5-xxl" and not reg.teacher.is_local
    assert {"t5-base", "t5-small", "t5-large"} <= set(reg.encoders)
    assert reg.encoder("t5-xxl-int8").quantization.method == "int8-weight-only"
    assert reg.encoder("t5-xxl-nf4").quantization.method == "bnb-nf4"
    assert reg.encoder("t5-xxl-nf4").source == reg.teacher.source  # one copy of the weights
