from pathlib import Path

from service.settings import Settings, env_example


def test_env_example_documents_every_setting():
    text = (Path(__file__).parents[1] / ".env.example").read_text()
    assert text == env_example(), "regenerate it: python -m service.settings > .env.example"
    names = {line.split("=")[0] for line in text.splitlines() if line.startswith("T2I_")}
    assert names == {f"T2I_{name.upper()}" for name in Settings.model_fields}


def test_lists_come_from_comma_separated_env(monkeypatch):
    monkeypatch.setenv("T2I_WORKER_ENCODERS", "t5-base, t5-xxl")
    assert Settings().worker_encoders == ["t5-base", "t5-xxl"]


def test_empty_values_mean_the_default(monkeypatch):
    monkeypatch.setenv("T2I_MODELS_FILE", "")
    monkeypatch.setenv("T2I_PORT", "")
    assert Settings().models_file is None and Settings().port == 8000
