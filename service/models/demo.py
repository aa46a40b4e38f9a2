"""The demo model kit: a complete, self-contained model set built from configs, with no network.

`t2i models make-demo DIR` writes:

    DIR/models.yaml                 the models file that registers everything below
    DIR/pipelines/flux/             a tiny FluxPipeline (transformer, VAE, CLIP-L role), T5 slot empty
    DIR/pipelines/sd3/              a tiny StableDiffusion3Pipeline (transformer, VAE, two CLIPs), T5 slot empty
    DIR/encoders/t5-xxl/            the teacher: a T5EncoderModel + tokenizer (the widest)
    DIR/encoders/t5-{large,base,small}/   students (T5EncoderWithProjection) sharing the teacher's tokenizer
    DIR/loras/{flux,sd3}-style/     a tiny LoRA adapter per pipeline (peft, saved as diffusers saves LoRAs)
    DIR/controlnets/{flux,sd3}-canny/   a tiny ControlNet per pipeline (FluxControlNetModel, SD3ControlNetModel)

Weights are random but deterministic: the same command gives byte-identical weight and tokenizer files. The kit is
the embedded default whenever no models file is configured, and what the tests use.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config
from transformers import T5EncoderModel, T5Tokenizer

from service.models.student import T5EncoderWithProjection
from service.models.registry import auto_route, quantized_teacher_entries

TEACHER_WIDTH = 64
CLIP_WIDTH = 32
KIT_VERSION = 3  # bump when the kit's contents change
DEMO_SIZE = 64  # pixels; the VAE downsamples by 4 and FLUX packs 2x2, so sizes are multiples of 8


@dataclass(frozen=True)
class T5Size:
    """One encoder role of the kit. Widths shrink like T5-XXL -> large -> base -> small, in miniature."""

    role: str
    d_model: int
    num_layers: int
    num_heads: int
    d_ff: int


TEACHER = T5Size("t5-xxl", TEACHER_WIDTH, 4, 4, 160)
STUDENTS = (
    T5Size("t5-large", 48, 3, 4, 96),
    T5Size("t5-base", 32, 2, 2, 64),
    T5Size("t5-small", 16, 1, 2, 32),
)

# Whole-word pieces for the words prompts use most; every other word falls back to single characters.
_WORDS = """
a an the of and with in on at by to from for under over above below behind beside next near between left right top
bottom center centre middle front back inside outside holding reading sign says saying text word words letters
red orange yellow green blue purple pink brown black white gray grey gold silver cyan magenta violet teal
circle square triangle rectangle star heart diamond hexagon oval cube sphere cone cylinder shape shapes
small large big tiny huge little tall short long round flat bright dark light soft hard shiny wooden metal glass
one two three four five six seven eight nine ten many several some
fox dog cat bird horse cow sheep lion tiger bear wolf rabbit mouse fish owl duck eagle elephant giraffe zebra
man woman person people child boy girl robot astronaut chef wizard knight king queen
tree trees flower flowers grass forest mountain mountains river lake sea ocean beach sky cloud clouds sun moon
snow rain city street house building castle tower bridge road car bus train boat plane bicycle
table chair bed book cup bowl plate bottle vase lamp clock window door wall floor room kitchen garden
apple banana orange cake bread pizza coffee tea
photo photograph painting drawing portrait landscape style art digital oil watercolor sketch render realistic
detailed beautiful cinematic lighting night day morning sunset sunrise winter summer spring autumn
is are has have sitting standing walking running flying swimming playing wearing looking
misty lake soft golden highly photograph old fisherman weathered face dramatic side cozy reading nook seat warm rainy
evening interior design field lavender wide angle macro dew drop leaf shallow depth futuristic skyline glowing neon
bowl ramen soft boiled egg steam rising food ancient stone clear painting snowy cabin pine northern lights hummingbird
minimalist living single plant architectural golden retriever action shot lighthouse rocky cliff storm crashing waves
vintage bicycle leaning brick ivy floating earth stars background photorealistic japanese koi pond cherry blossoms
steaming open herd elephants crossing dusty savanna hour terrarium succulents moss studio medieval hill surrounded
fog fantasy concept close face piercing eyes wildlife sailboat calm turquoise bustling market paper lanterns stalls
desert tall sand dunes lone camel shadows perched branch full illustration bouquet peonies ceramic still life
waterfall lush tropical rainforest exposure cute watering plants greenhouse render winding through rolling hills
aerial chocolate raspberries marble counter bakery curled asleep fresh sunflower stretching horizon puffy station
sunlight streaming colorful hot air balloon festival valley dawn underwater coral reef fish vibrant colors rustic
dinner candles wine glasses stormy fishing masters leopard ledge cobblestone paris after reflections lamps bonsai
pedestal sign reading poster printed shirt worn standing under neon that says
""".split()
_CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:'\"!?-()&/")


def build_t5_tokenizer() -> T5Tokenizer:
    """A unigram T5 tokenizer from an explicit vocabulary: identical ids in every process, unlike a trained one."""
    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "\u2581": -3.0}
    for word in _WORDS:
        pieces.setdefault("\u2581" + word, -1.0)
    for char in _CHARS:
        pieces.setdefault("\u2581" + char, -4.0)
        pieces.setdefault(char, -5.0)
    return T5Tokenizer(vocab=list(pieces.items()), extra_ids=8)


def build_clip_tokenizer() -> CLIPTokenizer:
    """A byte-pair CLIP tokenizer over lower-case characters with merges for the common words."""
    chars = sorted({c.lower() for c in _CHARS})
    vocab: dict[str, int] = {}
    for char in chars:
        vocab.setdefault(char, len(vocab))
    for char in chars:
        vocab.setdefault(char + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merge = (symbols[0], symbols[1])
            if merge not in merges:
                merges.append(merge)
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
            vocab.setdefault(symbols[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_config(size: T5Size, vocab_size: int) -> T5Config:
    return T5Config(
        vocab_size=vocab_size,
        d_model=size.d_model,
        d_kv=size.d_model // size.num_heads,
        d_ff=size.d_ff,
        num_layers=size.num_layers,
        num_heads=size.num_heads,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
    )


def build_teacher(tokenizer: T5Tokenizer, seed: int = 0, size: T5Size = TEACHER) -> T5EncoderModel:
    torch.manual_seed(seed)
    return T5EncoderModel(_t5_config(size, len(tokenizer))).eval()


def build_student(size: T5Size, tokenizer: T5Tokenizer, seed: int,
                  project_out_dim: int = TEACHER_WIDTH) -> T5EncoderWithProjection:
    torch.manual_seed(seed)
    config = _t5_config(size, len(tokenizer))
    config.project_in_dim = size.d_model
    config.project_out_dim = project_out_dim
    config.architectures = [T5EncoderWithProjection.__name__]
    return T5EncoderWithProjection(config).eval()


def _clip_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=CLIP_WIDTH,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=CLIP_WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=DEMO_SIZE,
        scaling_factor=1.5035,
        shift_factor=0.0609,  # FLUX decoding needs a shift factor; None crashes it
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_flux(clip_tokenizer: CLIPTokenizer, seed: int = 10) -> FluxPipeline:
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * 4,  # 2x2 packing of 4 latent channels
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEACHER_WIDTH,
        pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(seed + 1)
    vae = _vae()
    torch.manual_seed(seed + 2)
    clip = CLIPTextModel(_clip_config(clip_tokenizer)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )


def build_sd3(clip_tokenizer: CLIPTokenizer, seed: int = 20) -> StableDiffusion3Pipeline:
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=DEMO_SIZE // 4,
        patch_size=1,
        in_channels=4,
        num_layers=2,  # SD3's last block is context-only: one block would leave a ControlNet nothing to feed
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=TEACHER_WIDTH,
        caption_projection_dim=32,
        pooled_projection_dim=2 * CLIP_WIDTH,
        out_channels=4,
        pos_embed_max_size=DEMO_SIZE,
    )
    torch.manual_seed(seed + 1)
    vae = _vae()
    torch.manual_seed(seed + 2)
    clip_l = CLIPTextModelWithProjection(_clip_config(clip_tokenizer)).eval()
    torch.manual_seed(seed + 3)
    clip_g = CLIPTextModelWithProjection(_clip_config(clip_tokenizer)).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=clip_tokenizer,
        text_encoder_2=clip_g,
        tokenizer_2=clip_tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build_lora(transformer: torch.nn.Module, seed: int, strength: float = 20.0) -> dict[str, torch.Tensor]:
    """A random LoRA on a tiny transformer's attention projections (adds the adapter to `transformer`). Random
    A and B, B scaled up so that the adapter visibly changes the image."""
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False))
    state = get_peft_model_state_dict(transformer)
    return {k: (v * strength if "lora_B" in k else v).contiguous() for k, v in state.items()}


def build_controlnet(pipe: DiffusionPipeline, seed: int) -> torch.nn.Module:
    """A tiny ControlNet for a demo pipeline (FLUX: `FluxControlNetModel` from the transformer's blocks; SD3:
    `SD3ControlNetModel` of the transformer's config). diffusers zero-initialises a ControlNet's output projections so
    that an untrained one does nothing; here they are random, so that the control visibly changes the image."""
    torch.manual_seed(seed)
    config = pipe.transformer.config
    if isinstance(pipe, FluxPipeline):
        controlnet = FluxControlNetModel.from_transformer(
            pipe.transformer, num_layers=1, num_single_layers=1, attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads)
        outputs = [controlnet.controlnet_x_embedder, *controlnet.controlnet_blocks,
                   *controlnet.controlnet_single_blocks]
    else:
        controlnet = SD3ControlNetModel(
            sample_size=config.sample_size, patch_size=config.patch_size, in_channels=config.in_channels,
            num_layers=1, attention_head_dim=config.attention_head_dim, num_attention_heads=config.num_attention_heads,
            joint_attention_dim=config.joint_attention_dim, caption_projection_dim=config.caption_projection_dim,
            pooled_projection_dim=config.pooled_projection_dim, out_channels=config.out_channels,
            pos_embed_max_size=config.pos_embed_max_size)
        outputs = [controlnet.pos_embed_input.proj, *controlnet.controlnet_blocks]
    for layer in outputs:
        torch.nn.init.normal_(layer.weight, std=0.5)
    return controlnet.eval()


def models_file_dict() -> dict:
    """The demo kit's models file, with sources relative to it."""
    common = {"dtype": "auto", "device": "auto", "width": DEMO_SIZE, "height": DEMO_SIZE, "steps": 4}
    teacher = {"kind": "teacher", "source": f"./encoders/{TEACHER.role}", "max_sequence_length": 32}
    encoders = {TEACHER.role: teacher, **quantized_teacher_entries(TEACHER.role, teacher)}
    for size in STUDENTS:
        encoders[size.role] = {"kind": "student", "source": f"./encoders/{size.role}", "max_sequence_length": 32}
    return {
        "pipelines": {
            "flux": {"family": "flux", "source": "./pipelines/flux", "guidance": 3.5, **common},
            "sd3": {"family": "sd3", "source": "./pipelines/sd3", "guidance": 5.0, **common},
        },
        "encoders": encoders,
        "loras": {
            f"{p}-style": {"pipeline": p, "source": f"./loras/{p}-style",
                           "weight_name": "pytorch_lora_weights.safetensors", "scale": 1.0}
            for p in ("flux", "sd3")
        },
        "controlnets": {
            f"{p}-canny": {"pipeline": p, "source": f"./controlnets/{p}-canny", "condition": "canny", "scale": 1.0}
            for p in ("flux", "sd3")
        },
        "routes": auto_route(TEACHER.role),
    }


def make_demo(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the kit to `out_dir` (built in a sibling temp dir, then moved, so a half-built kit is never seen)."""
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True / --overwrite)")
    tmp = out_dir.with_name(out_dir.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    # 1. Tokenizers, shared by every role that uses them.
    t5_tokenizer = build_t5_tokenizer()
    clip_tokenizer = build_clip_tokenizer()

    # 2. Text encoders: the teacher, then the students, each with the teacher's tokenizer beside it.
    teacher_dir = tmp / "encoders" / TEACHER.role
    build_teacher(t5_tokenizer).save_pretrained(teacher_dir)
    t5_tokenizer.save_pretrained(teacher_dir)
    for index, size in enumerate(STUDENTS, start=1):
        student_dir = tmp / "encoders" / size.role
        build_student(size, t5_tokenizer, seed=index).save_pretrained(student_dir)
        t5_tokenizer.save_pretrained(student_dir)

    # 3. Pipelines, with the T5 slot left empty: the encoder is chosen per call; a LoRA adapter for each.
    for name, build, seed in (("flux", build_flux, 30), ("sd3", build_sd3, 31)):
        pipe = build(clip_tokenizer)
        pipe.save_pretrained(tmp / "pipelines" / name)
        build_controlnet(pipe, seed).save_pretrained(tmp / "controlnets" / f"{name}-canny")
        type(pipe).save_lora_weights(tmp / "loras" / f"{name}-style",
                                     transformer_lora_layers=build_lora(pipe.transformer, seed))

    # 4. The models file, and the kit's version (a kit of another version is rebuilt by `ensure_demo`).
    (tmp / "VERSION").write_text(f"{KIT_VERSION}\n")
    (tmp / "models.yaml").write_text(
        "# The demo model kit, written by `t2i models make-demo`. Paths are relative to this file.\n"
        + yaml.safe_dump(models_file_dict(), sort_keys=False)
    )

    # 5. Every file as readable as the umask allows: safetensors writes its files 0600, and a container's own user
    #    (the image runs as uid 10001) could not read a kit mounted at /models.
    umask = os.umask(0o022)
    os.umask(umask)
    for path in tmp.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def ensure_demo(out_dir: str | Path) -> Path:
    """Build the kit at `out_dir` unless it is already there (the embedded default's first run)."""
    out_dir = Path(out_dir).expanduser()
    version = out_dir / "VERSION"
    if (out_dir / "models.yaml").exists() and version.exists() and version.read_text().strip() == str(KIT_VERSION):
        return out_dir
    return make_demo(out_dir, overwrite=True)
