"""The distilled-student text encoder: a T5 encoder plus a projection to the teacher's width.

One definition, used by the service (inference) and the trainer (distillation, export). It is a `PreTrainedModel`,
so diffusers accepts it in the T5 slot (`text_encoder_2` of FLUX, `text_encoder_3` of SD3) and it round-trips with
`save_pretrained` / `from_pretrained` in safetensors.

Its state-dict layout is the one the paper's authors published (Hub: LifuWang/DistillT5 and its -Small / -Large
siblings), so their checkpoints load unchanged::

    encoder.shared.weight, encoder.encoder.block.N....      a T5EncoderModel under the attribute `encoder`
    final_projection.0.weight                              Linear(project_in_dim -> project_out_dim, no bias)
    final_projection.3.weight                              Linear(project_out_dim -> project_out_dim, no bias)

and its config is a T5 config with two extra fields, `project_in_dim` (= d_model) and `project_out_dim` (the
teacher's width, 4096 for T5-XXL), with `architectures: ["T5EncoderWithProjection"]`.

    from diffusers import FluxPipeline
    from service.models.student import T5EncoderWithProjection
    student = T5EncoderWithProjection.from_pretrained("students/t5-base-distilled")
    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", text_encoder_2=student)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import T5Config, T5EncoderModel
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.t5.modeling_t5 import T5PreTrainedModel


class T5EncoderWithProjection(T5PreTrainedModel):
    config_class = T5Config
    # Not "transformer" (T5's): the published layout nests the T5 under `encoder`, and no prefix must be guessed.
    base_model_prefix = "t5_student"
    _tied_weights_keys = {"encoder.encoder.embed_tokens.weight": "encoder.shared.weight"}
    _keys_to_ignore_on_load_unexpected = [r"decoder"]

    def __init__(self, config: T5Config):
        super().__init__(config)
        if getattr(config, "project_in_dim", None) is None:
            config.project_in_dim = config.d_model
        if getattr(config, "project_out_dim", None) is None:
            raise ValueError("T5EncoderWithProjection needs `project_out_dim` in its config (the teacher's width)")
        if config.project_in_dim != config.d_model:
            raise ValueError(
                f"config.project_in_dim={config.project_in_dim} differs from config.d_model={config.d_model}"
            )
        self.encoder = T5EncoderModel(config)
        self.final_projection = nn.Sequential(
            nn.Linear(config.project_in_dim, config.project_out_dim, bias=False),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(config.project_out_dim, config.project_out_dim, bias=False),
        )
        self.post_init()

    @classmethod
    def from_t5(cls, t5: T5EncoderModel, project_out_dim: int) -> "T5EncoderWithProjection":
        """Wrap a pretrained T5 encoder (its weights copied unchanged) with a freshly initialised projection."""
        config = T5Config.from_dict(t5.config.to_dict())
        config.project_in_dim = config.d_model
        config.project_out_dim = project_out_dim
        config.architectures = [cls.__name__]
        student = cls(config)
        missing, unexpected = student.encoder.load_state_dict(t5.state_dict(), strict=False)
        # The tied input embedding may be absent from one side's state dict; everything else must match.
        if [k for k in missing if "embed_tokens" not in k] or unexpected:
            raise ValueError(f"T5 weights do not fit: missing {missing}, unexpected {unexpected}")
        return student.to(t5.dtype)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # The generic init would give the projection a std of ~45 and a student that starts far off; fan-in
        # scaling keeps the MLP's output on the encoder's scale.
        if isinstance(module, nn.Linear) and any(module is m for m in getattr(self, "final_projection", ())):
            nn.init.normal_(module.weight, mean=0.0, std=1.0 / math.sqrt(module.in_features))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.encoder.set_input_embeddings(value)

    @property
    def output_width(self) -> int:
        return self.config.project_out_dim

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple:
        out = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        projected = self.final_projection(out.last_hidden_state)
        if return_dict is False:
            return (projected,)
        return BaseModelOutput(last_hidden_state=projected, hidden_states=out.hidden_states)
