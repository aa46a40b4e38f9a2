"""The student class: safetensors round trip, the authors' published layout, and diffusers' T5 slot."""

import json

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file, save_file
from transformers import T5Config, T5EncoderModel

from service.models.student import T5EncoderWithProjection


def tiny_t5(d_model=16, vocab=120, seed=0) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                      tie_word_embeddings=False)
    return T5EncoderModel(config).eval()


def test_round_trip_in_safetensors(tmp_path):
    student = T5EncoderWithProjection.from_t5(tiny_t5(), project_out_dim=64).eval()
    student.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = T5EncoderWithProjection.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 120, (2, 9))
    assert torch.equal(student(ids)[0], loaded(ids)[0])
    assert loaded(ids)[0].shape == (2, 9, 64)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["T5EncoderWithProjection"]
    assert (config["project_in_dim"], config["project_out_dim"]) == (16, 64)


def test_from_t5_keeps_the_pretrained_weights():
    t5 = tiny_t5(seed=3)
    student = T5EncoderWithProjection.from_t5(t5, project_out_dim=32)
    for name, tensor in t5.state_dict().items():
        assert torch.equal(student.encoder.state_dict()[name], tensor), name
    # A sane projection scale: not T5's generic init (std ~45), which would start the student far off.
    assert 0.05 < student.final_projection[0].weight.std() < 1.0


def test_loads_the_published_checkpoint_layout_unchanged(tmp_path):
    """A checkpoint written key by key in the authors' layout (not by our class) loads and computes T5 -> MLP."""
    t5 = tiny_t5(seed=5)
    torch.manual_seed(6)
    w0, w3 = torch.randn(64, 16) * 0.2, torch.randn(64, 64) * 0.1
    tensors = {f"encoder.{k}": v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    tensors["final_projection.0.weight"] = w0
    tensors["final_projection.3.weight"] = w3
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = t5.config.to_dict()
    config.update(architectures=["T5EncoderWithProjection"], project_in_dim=16, project_out_dim=64, model_type="t5")
    (tmp_path / "config.json").write_text(json.dumps(config))

    student = T5EncoderWithProjection.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 120, (1, 7))
    expected = torch.relu(t5(ids)[0] @ w0.T) @ w3.T
    torch.testing.assert_close(student(ids)[0], expected)
    assert student.encoder.encoder.embed_tokens.weight is student.encoder.shared.weight


def test_saved_keys_are_the_published_layout(tmp_path):
    T5EncoderWithProjection.from_t5(tiny_t5(), project_out_dim=32).save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert {"final_projection.0.weight", "final_projection.3.weight", "encoder.shared.weight"} <= keys
    assert all(k.startswith(("encoder.", "final_projection.")) for k in keys)


def test_refuses_a_config_without_output_width():
    with pytest.raises(ValueError, match="project_out_dim"):
        T5EncoderWithProjection(tiny_t5().config)


def test_diffusers_accepts_it_in_the_t5_slot(demo_dir):
    """Plain diffusers, no project code in the call: FluxPipeline with the student as `text_encoder_2`."""
    student = T5EncoderWithProjection.from_pretrained(demo_dir / "encoders" / "t5-base")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "encoders" / "t5-base")
    pipe = FluxPipeline.from_pretrained(demo_dir / "pipelines" / "flux", text_encoder_2=student, tokenizer_2=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red fox", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
