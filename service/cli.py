"""The `t2i` command. Heavy imports (torch, diffusers) happen inside the commands that need them.

    t2i generate --pipeline flux --encoder t5-base --prompt "a red fox in snow" --seed 7 -o fox.png
    t2i models list | make-demo DIR | sizes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from service.errors import T2IError, UnavailableError, ValidationError
from service.settings import get_settings

log = logging.getLogger("t2i")

IMAGE_FORMATS = {".png": "PNG", ".webp": "WEBP", ".jpg": "JPEG", ".jpeg": "JPEG"}
CONTROLNET_STEPS = 1500  # `t2i world controlnet`'s default budget (the shipped kit's ran exactly these)
TRAIN_DEVICE_HELP = ("where it trains: auto (default: the first CUDA device when there is one, else the CPU), cpu, "
                     "cuda or cuda:N")


# -- shared set-up ---------------------------------------------------------------------------------------------
def _quiet_libraries() -> None:
    """Library progress bars and save-time notices are noise on a command line."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()


def models_file(args: argparse.Namespace, *, build_in_child: bool = False) -> Path:
    """`--models-file`, `T2I_MODELS_FILE`, the shipped miniature kit, or the demo kit (built on first use).

    `build_in_child` builds the demo kit in a child process, so that the API and the supervisor never import torch.
    """
    from service.models.registry import default_models_file

    chosen = getattr(args, "models_file", None)
    if chosen is not None:
        return Path(chosen)
    path = default_models_file()
    demo = get_settings().demo_dir
    if path == demo / "models.yaml" and not path.exists():
        print(f"building the demo model kit at {demo} (once)", file=sys.stderr, flush=True)
        if build_in_child:
            import subprocess

            subprocess.run([sys.executable, "-m", "service.cli", "models", "make-demo", str(demo), "--overwrite"],
                           check=True, stdout=subprocess.DEVNULL)
        else:
            from service.models.demo import ensure_demo

            ensure_demo(demo)
    return path


def torch_setup(args: argparse.Namespace) -> None:
    from service.models.devices import set_threads

    _quiet_libraries()
    set_threads(getattr(args, "threads", None) or get_settings().threads)


# -- commands --------------------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> None:
    out = Path(args.output)
    fmt = IMAGE_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise ValidationError(
            f"`--output` {str(out)!r} has extension {out.suffix!r}; use one of {', '.join(IMAGE_FORMATS)}",
            field="output",
        )
    torch_setup(args)
    from service.models.generation import GenerationRequest, Generator
    from service.models.registry import Registry

    from service.models.routing import decide

    registry = Registry.from_file(models_file(args))
    encoder = args.encoder
    if (route := registry.route(encoder)) is not None:  # here every encoder is at hand: rules and default only
        decision = decide(route, args.prompt)
        encoder = decision.encoder
        print(f"route {route.name}: {decision.rule} -> {encoder}", file=sys.stderr)
    generator = Generator(registry, device=args.device, encoder_device=args.encoder_device)
    request = GenerationRequest(
        prompt=args.prompt, pipeline=args.pipeline, encoder=encoder, width=args.width, height=args.height,
        steps=args.steps, guidance=args.guidance, seed=args.seed, negative_prompt=args.negative_prompt,
        num_images=args.num_images, loras=tuple(_lora_ref(ref) for ref in args.lora),
        control=_control(args),
    )
    result = generator.generate(request)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    paths = [out] if len(result.images) == 1 else [
        out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(result.images))
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(result.images, paths):
        image.save(path, format=fmt)
    timings = " ".join(f"{k}={v * 1000:.1f}ms" for k, v in result.timings.items())
    print(f"wrote {', '.join(map(str, paths))} (seed {result.seed}; {timings})")


def _control(args: argparse.Namespace):
    """The `--control NAME --control-image PATH` pair as a ControlInput (the image checked as the API checks it)."""
    from service.models.control import decode_image
    from service.models.generation import ControlInput

    if (args.control is None) != (args.control_image is None):
        raise ValidationError("`--control` and `--control-image` go together", field="control")
    if args.control is None:
        return None
    path = Path(args.control_image)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValidationError(f"`--control-image` {str(path)!r} cannot be read: {exc.strerror}",
                              field="control_image") from None
    image = decode_image(data, field="control_image", max_bytes=get_settings().max_image_bytes)
    return ControlInput(name=args.control, image=image, preprocess=args.control_preprocess, scale=args.control_scale,
                        start=args.control_start, end=args.control_end, mode=args.control_mode)


def _lora_ref(text: str) -> tuple[str, float | None]:
    name, _, scale = text.partition(":")
    try:
        return name, float(scale) if scale else None
    except ValueError:
        raise ValidationError(f"`--lora` {text!r} is not NAME or NAME:SCALE", field="lora") from None


def cmd_models_list(args: argparse.Namespace) -> None:
    torch_setup(args)
    from service.models.registry import Registry
    from service.models.sizes import encoder_row, pipeline_row

    registry = Registry.from_file(models_file(args))
    rows = [("pipeline", pipeline_row(s)) for s in registry.pipelines.values()]
    rows += [("encoder", encoder_row(s)) for s in registry.encoders.values()]
    if args.json:
        routes = [{"type": "route", **r.model_dump()} for r in registry.routes.values()]
        print(json.dumps([{"type": t, **r.__dict__} for t, r in rows] + routes, indent=2))
        return
    _print_table(
        ["type", "name", "params", "bytes", "dtype", "quantization", "width", "device", "source", "note"],
        [[t, r.name, _count(r.params), _size(r.bytes), r.dtype, r.quantization or "-", r.width or "?", r.device,
          r.source, r.note] for t, r in rows],
    )
    for route in registry.routes.values():
        print(f"\nroute {route.name} (use it as an encoder name):")
        for rule in route.rules:
            print(f"  {rule.describe()}")
        print(f"  otherwise -> {route.default}; fallback: {', '.join(route.fallback)}"
              + (f"; max_queue_depth {route.max_queue_depth}" if route.max_queue_depth is not None else ""))


def cmd_models_quantize(args: argparse.Namespace) -> None:
    """Quantize a registered encoder once and write a pre-quantized Hugging Face directory (weights, config with its
    `quantization_config`, tokenizer) that plain `from_pretrained` loads and a models file can name as `source`."""
    torch_setup(args)
    from service.models.encoder import TextEncoder
    from service.models.registry import Quantization, Registry

    registry = Registry.from_file(models_file(args))
    spec = registry.encoder(args.name)
    try:
        quant = Quantization(method=args.method, options=json.loads(args.options) if args.options else {})
    except (ValueError, json.JSONDecodeError) as exc:
        raise ValidationError(f"`--method {args.method}` / `--options`: {exc}", field="method") from None
    if spec.quantization is not None:
        raise ValidationError(f"encoder {spec.name!r} is already quantized ({spec.quantization.describe()}); "
                              "name the unquantized entry", field="NAME")
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise ValidationError(f"output directory {str(out)!r} is not empty", field="output")
    encoder = TextEncoder.load(spec.model_copy(update={"quantization": quant}), device=args.device)
    # Saved before any forward: bitsandbytes NF4 repacks its weights in place on a CPU forward, and a model saved
    # after one reloads corrupt.
    encoder.model.save_pretrained(out)
    encoder.tokenizer.save_pretrained(out)
    print(f"wrote {spec.name} quantized with {quant.describe()} to {out} ({_size(encoder.num_bytes)} in memory); "
          f"register it with `source: {out}` (its method is read from its config)")


def cmd_keys_new(args: argparse.Namespace) -> None:
    """A fresh API key (give it to the client; it is not stored) and the line for T2I_API_KEYS (only its hash)."""
    from service.api.auth import new_key

    key, digest = new_key()
    print(f"key (give this to the client, it is shown once): {key}")
    print(f"add to T2I_API_KEYS (comma-separated) or to T2I_API_KEYS_FILE: {args.name}:{digest}")


def cmd_healthcheck(args: argparse.Namespace) -> None:
    """Exit 0 when this container's process answers /healthz (the API on T2I_PORT, or a worker on
    T2I_WORKER_METRICS_PORT): the Docker HEALTHCHECK. No torch, no Redis."""
    import urllib.request

    settings = get_settings()
    urls = args.url or [f"http://127.0.0.1:{settings.port}/healthz",
                        f"http://127.0.0.1:{settings.worker_metrics_port}/healthz"]
    reasons = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=args.timeout) as response:
                if response.status == 200:
                    print(f"healthy: {url}")
                    return
                reasons.append(f"{url}: HTTP {response.status}")
        except OSError as exc:
            reasons.append(f"{url}: {getattr(exc, 'reason', exc)}")
    raise UnavailableError("unhealthy: " + "; ".join(reasons))


def cmd_models_sizes(args: argparse.Namespace) -> None:
    torch_setup(args)
    from service.models.sizes import reference_rows

    rows = reference_rows()
    xxl = next(r for r in rows if r.name == "t5-xxl" and r.quantization is None)
    _print_table(
        ["architecture", "params", "bytes", "quantization", "width", "xxl bf16 / this (bytes)"],
        [[r.name, _count(r.params), _size(r.bytes), r.quantization or "bf16", r.width, f"{xxl.bytes / r.bytes:.1f}x"]
         for r in rows],
    )


def cmd_models_make_demo(args: argparse.Namespace) -> None:
    torch_setup(args)
    from service.models.demo import make_demo

    try:
        out = make_demo(args.dir, overwrite=args.overwrite)
    except FileExistsError as exc:
        raise ValidationError(str(exc), field="DIR") from None
    print(f"wrote the demo model kit to {out}; use it with T2I_MODELS_FILE={out / 'models.yaml'}")


def cmd_serve(args: argparse.Namespace) -> None:
    from service.api.auth import check_exposure, load_keys
    from service.serve import serve

    settings = _service_settings(args)
    print(f"t2i serve: {check_exposure(settings, load_keys(settings), settings.host)}", flush=True)
    sys.exit(serve(settings, models_file(args, build_in_child=True)))


def cmd_api(args: argparse.Namespace) -> None:
    import uvicorn

    from service.api.app import create_app
    from service.errors import ConfigError

    settings = _service_settings(args)
    settings = settings.model_copy(update={"models_file": models_file(args, build_in_child=True)})
    if not settings.redis_url:
        raise ConfigError("`T2I_REDIS_URL` is not set: the API needs the queue's Redis (or use `t2i serve`)",
                          field="redis_url")
    from service.api.auth import check_exposure, load_keys

    print(f"t2i api on {settings.host}:{settings.port}: {check_exposure(settings, load_keys(settings), settings.host)}",
          flush=True)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
                timeout_graceful_shutdown=10)


def cmd_worker(args: argparse.Namespace) -> None:
    torch_setup(args)
    from service.models.registry import Registry
    from service.worker.main import run

    settings = get_settings()
    sys.exit(run(settings, Registry.from_file(models_file(args))))


def cmd_dataset_build(args: argparse.Namespace) -> None:
    torch_setup(args)
    from trainer.config import DatasetConfig, load_config
    from trainer.dataset import build

    config = load_config(DatasetConfig, args.config, args.overrides)
    if config.models_file is None:
        config.models_file = str(models_file(args))
    manifest = build(config, args.output)
    counts = manifest["counts"]
    print(f"wrote {args.output}: train {sum(counts['train'].values())} {counts['train']}, "
          f"validation {sum(counts['validation'].values())}; filtered {manifest['filtered']}")


def _distill_config(args: argparse.Namespace):
    from trainer.config import DistillConfig, load_config

    config = load_config(DistillConfig, args.config, args.overrides)
    if config.models_file is None:
        config.models_file = str(models_file(args))
    return config


def cmd_distill_cache(args: argparse.Namespace) -> None:
    torch_setup(args)
    import torch

    from trainer.components import Components
    from trainer.dataset import read_split
    from trainer.teacher_cache import build_cache

    config = _distill_config(args)
    out = args.output or config.teacher_cache or "teacher-cache"
    splits = {"train": read_split(config.data, "train"), "validation": read_split(config.data, "validation")}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    components = Components(config, device=device, live_teacher=True, with_student=False)
    build_cache(config, components, splits, out)
    print(f"wrote the teacher cache to {out}; train with --teacher_cache={out}")


def cmd_distill_train(args: argparse.Namespace) -> None:
    torch_setup(args)
    from trainer.distill import train

    summary = train(_distill_config(args))
    if summary["eval"]:
        first, last = summary["eval"][0], summary["eval"][-1]
        print(f"step {summary['step']}: held-out vision loss {first['vision_loss']:.4e} (step {first['step']}) -> "
              f"{last['vision_loss']:.4e}; run in {summary['run_dir']}")


def cmd_distill_export(args: argparse.Namespace) -> None:
    torch_setup(args)
    from trainer.export import export

    out = export(args.checkpoint, args.output)
    print(f"exported the student to {out}")


def cmd_eval(args: argparse.Namespace) -> None:
    torch_setup(args)
    from trainer.evaluate import evaluate, markdown_table

    config = _distill_config(args)
    report = evaluate(config, args.student, args.out, per_criterion=args.prompts, clip_model=args.clip_model,
                      loras=tuple(_lora_ref(ref) for ref in args.lora), control=_control(args))
    print(markdown_table(report))
    print(f"wrote {args.out}/report.json, report.md, grid.png")


def _caption_mix(text: str) -> tuple[tuple[str, float], ...]:
    """`--mix count=0.4,relation=0.4,single=0.1,text=0.1` as (kind, weight) in the world's order of kinds; a kind
    left out is not drawn."""
    from trainer.world.scene import KINDS

    weights = {}
    for part in text.split(","):
        kind, _, value = part.strip().partition("=")
        if kind not in KINDS:
            raise ValidationError(f"`--mix`: {kind!r} is not a kind of scene; the kinds are {', '.join(KINDS)}",
                                  field="mix")
        try:
            weight = float(value)
        except ValueError:
            raise ValidationError(f"`--mix`: the weight of {kind} must be a number, got {value!r}",
                                  field="mix") from None
        if not 0.0 <= weight < float("inf"):
            raise ValidationError(f"`--mix`: the weight of {kind} must be at least 0, got {value}", field="mix")
        weights[kind] = weight
    if sum(weights.values()) <= 0:
        raise ValidationError(f"`--mix`={text!r}: at least one weight must be above 0", field="mix")
    return tuple((kind, weights[kind]) for kind in KINDS if weights.get(kind, 0.0) > 0)


def cmd_world_train(args: argparse.Namespace) -> None:
    torch_setup(args)
    from trainer.world.train import WorldConfig, train_world

    given = {k: getattr(args, k) for k in ("steps", "vae_steps", "checkpoint_every", "batch", "heads", "layers",
                                          "single_layers", "warmup") if getattr(args, k) is not None}
    for key, value in given.items():
        if value < 1:
            raise ValidationError(f"`--{key.replace('_', '-')}`={value} must be at least 1", field=key)
    if args.timestep_mean is not None:
        if not -3.0 <= args.timestep_mean <= 3.0:
            raise ValidationError(f"`--timestep-mean`={args.timestep_mean} must be within [-3, 3]",
                                  field="timestep_mean")
        given["timestep_mean"] = args.timestep_mean
    if args.lr is not None:
        if not 0.0 < args.lr < 1.0:
            raise ValidationError(f"`--lr`={args.lr} must be above 0 and below 1", field="lr")
        given["lr"] = args.lr
    if args.ema is not None:
        if not 0.0 <= args.ema < 1.0:
            raise ValidationError(f"`--ema`={args.ema} must be within [0, 1)", field="ema")
        given["ema"] = args.ema
    if args.mix is not None:
        given["mix"] = _caption_mix(args.mix)
    if args.teacher is not None:
        given["teacher"] = args.teacher
    if args.precision is not None:
        given["precision"] = args.precision
    config = WorldConfig(**given)
    out = train_world(args.output, config, seed=args.seed, denoiser_dtype=args.denoiser_dtype, device=args.device,
                      start=args.start)
    print(f"wrote the miniature world's model kit to {out}; use it with T2I_MODELS_FILE={out / 'models.yaml'}")


def cmd_world_prompts(args: argparse.Namespace) -> None:
    from trainer.world.prompts import write_prompts

    manifest = write_prompts(args.output, train=args.train, validation=args.validation, seed=args.seed,
                             even_kinds=args.even_kinds)
    print(f"wrote {args.output}: {manifest['counts']}")


def cmd_world_eval(args: argparse.Namespace) -> None:
    if args.details and not args.out:
        raise ValidationError("`--details` lists every image in the JSON report: give `--out FILE` too",
                              field="details")
    from trainer.world.captions import parse

    for text in args.prompt or []:
        if parse(text) is None:
            raise ValidationError(f"`--prompt` {text!r} is outside the miniature world's grammar, so the evaluator "
                                  "cannot judge it (e.g. 'two green triangles', 'a red circle above a blue square', "
                                  "\"a sign reading 'cat'\")", field="prompt")
    if not 1 <= args.batch <= 64:
        raise ValidationError(f"`--batch`={args.batch} is out of range [1, 64]", field="batch")
    if args.prompt and (args.novel or args.validation or args.kind):
        raise ValidationError("`--prompt` evaluates the prompts given: drop `--novel` / `--validation` / `--kind`",
                              field="prompt")
    if args.novel and args.kind and not set(args.kind) <= {"single", "text"}:
        raise ValidationError(f"`--kind` {sorted(set(args.kind) - {'single', 'text'})} with `--novel`: only single "
                              "objects and signs have combinations training never sees", field="kind")
    torch_setup(args)
    import json as _json

    from service.models.generation import Generator
    from service.models.registry import Registry
    from service.models.sizes import encoder_row
    from trainer.world.accuracy import encoder_accuracy, held_out_prompts, markdown_table, per_prompt, plot_frontier
    from trainer.world.captions import VALIDATION_SEED, novel_prompts
    from trainer.world.scene import KINDS

    registry = Registry.from_file(models_file(args))
    if args.cfg is not None:
        spec = registry.pipeline(args.pipeline).model_copy(update={"true_cfg_scale": args.cfg})
        registry = registry.model_copy(update={"pipelines": {**registry.pipelines, args.pipeline: spec}})
    generator = Generator(registry)
    if args.prompt:
        prompts = list(dict.fromkeys(args.prompt))
    elif args.validation:
        prompts = held_out_prompts(args.prompts, seed=VALIDATION_SEED,
                                   kinds=tuple(args.kind or ("single", "count", "relation")))
    elif args.novel:
        prompts = novel_prompts(args.prompts, kinds=tuple(args.kind or ("single", "text")))
    else:
        prompts = held_out_prompts(args.prompts, kinds=tuple(args.kind or KINDS))
    report = {}
    for name in args.encoder or list(registry.encoders):
        route = registry.route(name)
        report[name] = encoder_accuracy(generator, args.pipeline, name, prompts, steps=args.steps, seeds=args.seeds,
                                        details=args.details or bool(args.prompt), same_seeds=bool(args.prompt),
                                        batch=args.batch)
        if args.prompt:  # seeds 0..N-1 of each prompt, as requests with those seeds get them
            report[name]["per_prompt"] = per_prompt(report[name]["images"])
            if not args.details:
                del report[name]["images"], report[name]["failures"]
        routed = report[name]["routed"]
        # bytes: the encoder's; for a route, the mean over its jobs of the bytes of the encoder each ran on
        report[name]["bytes"] = round(sum(encoder_row(registry.encoder(n)).bytes * k for n, k in routed.items())
                                      / sum(routed.values()))
        report[name]["quantization"] = (q.describe() if route is None and (q := registry.encoder(name).quantization)
                                        else None)
        print(f"{name}: " + ", ".join(f"{c} {v:.0%}" for c, v in report[name]["criteria"].items())
              + (f" (jobs: {routed})" if route is not None else ""), flush=True)
        if args.details:
            how = report[name]["failures"]
            print("  every attribute right: "
                  + ", ".join(f"{k} {r}/{n}" for k, (r, n) in how["every_attribute"].items())
                  + "; objects drawn per count asked: " + "; ".join(
                      f"{asked}: " + ", ".join(f"{d} x{k}" for d, k in drawn.items())
                      for asked, drawn in how["count_drawn"].items())
                  + "; failed relations: " + ", ".join(f"{k} {v}" for k, v in how["relation_failures"].items()))
        for text, got in report[name].get("per_prompt", {}).items():
            print(f"  {text!r}: every attribute right on {got['right']} of {got['of']} seeds {got['right_seeds']}")
    print(markdown_table(report))
    if args.out:
        Path(args.out).write_text(_json.dumps(report, indent=2) + "\n")
    if args.chart:
        plot_frontier(report, {n: r["bytes"] for n, r in report.items() if r["bytes"]},
                      {n for n, r in report.items() if r["quantization"]}, args.chart)


def cmd_world_diagnose(args: argparse.Namespace) -> None:
    torch_setup(args)
    from trainer.world.diagnose import diagnose

    for key in ("scenes", "probe_steps"):
        if getattr(args, key) < 1:
            raise ValidationError(f"`--{key.replace('_', '-')}`={getattr(args, key)} must be at least 1", field=key)
    kit = Path(args.kit)
    for part in ("pipelines/flux/vae", "encoders/t5-xxl"):
        if not (kit / part).is_dir():
            raise ValidationError(f"`--kit` {kit}: no {part} (a kit from `t2i world train` has one)", field="kit")
    report = diagnose(kit, scenes=args.scenes, probe_steps=args.probe_steps)
    vae, probe = report["vae_roundtrip"], report["text_probe"]
    print("VAE round trip, every attribute right per kind: "
          + ", ".join(f"{k} {v:.0%}" for k, v in vae["decoded"]["every_attribute"].items())
          + f" (the evaluator on the renders themselves, lowest kind: "
            f"{min(vae['rendered']['every_attribute'].values()):.0%})")
    for name in ("encoder_output", "input_embeddings"):
        rates = probe[name]
        print(f"text probe on the teacher's {name.replace('_', ' ')}: every attribute {rates['every_attribute']:.0%} ("
              + ", ".join(f"{k} {v:.0%}" for k, v in rates["attributes"].items()) + ")")
    print("binding, a shape word's output read alone for the colour before it: "
          + ", ".join(f"{k.split('_')[0]} shape {v:.0%}" for k, v in probe["binding"].items()))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def cmd_world_controlnet(args: argparse.Namespace) -> None:
    torch_setup(args)
    from trainer.world.control import train_controlnet

    for key in ("steps", "minutes"):
        value = getattr(args, key)
        if value is not None and value <= 0:
            raise ValidationError(f"`--{key}`={value} must be above 0", field=key)
    steps = args.steps if args.steps is not None or args.minutes is not None else CONTROLNET_STEPS
    out = train_controlnet(args.kit, steps=steps, minutes=args.minutes, seed=args.seed, dtype=args.dtype,
                           device=args.device)
    print(f"wrote the canny ControlNet to {out} and registered it in {Path(args.kit) / 'models.yaml'}")


def cmd_world_control_eval(args: argparse.Namespace) -> None:
    torch_setup(args)
    import json as _json

    from service.models.registry import Registry
    from trainer.world.control import control_eval

    registry = Registry.from_file(Path(args.kit) / "models.yaml")
    report = control_eval(registry, args.encoder or list(registry.encoders), seeds=args.seeds, grid=args.grid)
    print(_json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(_json.dumps(report, indent=2) + "\n")


def cmd_world_outliers(args: argparse.Namespace) -> None:
    kit, out = Path(args.kit), Path(args.output)
    config = kit / "encoders" / "t5-xxl" / "config.json"
    if not config.is_file():
        raise ValidationError(f"`--kit` {kit}: no encoders/t5-xxl (a kit from `t2i world train` has one)", field="kit")
    if out.exists():
        raise ValidationError(f"`--output` {out} exists: give a new directory", field="output")
    width = json.loads(config.read_text())["d_model"]
    if not 1 <= args.channels < width:
        raise ValidationError(f"`--channels`={args.channels} must be at least 1 and below the teacher's width {width}",
                              field="channels")
    if not args.scale > 0:
        raise ValidationError(f"`--scale`={args.scale} must be above 0", field="scale")
    torch_setup(args)
    from trainer.world.outliers import make_outlier_kit

    made = make_outlier_kit(kit, out, channels=args.channels, scale=args.scale, seed=args.seed)
    print(f"wrote {out}: teacher channels {made['channels']} of {made['width']} scaled by {made['scale']:g}, "
          "the denoiser's context embedder (and any ControlNet's) scaled back")


def cmd_world_paper(args: argparse.Namespace) -> None:
    for key in ("max_steps", "prompts", "seeds", "distill_seeds", "batch", "jobs"):
        if getattr(args, key) < 1:
            raise ValidationError(f"`--{key.replace('_', '-')}`={getattr(args, key)} must be at least 1", field=key)
    for seed in args.distill_seed or []:
        if seed < 0:
            raise ValidationError(f"`--distill-seed`={seed} must be at least 0", field="distill_seed")
    torch_setup(args)
    from trainer.world.paper import RUNS, install_students, results_table, run_paper

    runs = tuple((role, mode) for role, mode in RUNS
                 if (not args.student or role in args.student) and (not args.mode or mode in args.mode))
    if not runs:
        raise ValidationError(f"`--student` {args.student} with `--mode` {args.mode}: the runs are "
                              f"{', '.join('/'.join(r) for r in RUNS)}", field="student")
    sizes, lr = sorted({r[0] for r in RUNS}), {}
    for item in args.lr or []:
        role, _, value = item.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = float("nan")
        if role not in sizes or not rate > 0:
            raise ValidationError(f"`--lr` {item!r}: give SIZE=RATE with SIZE one of {sizes} and RATE above 0, "
                                  "e.g. t5-large=0.0003", field="lr")
        lr[role] = rate
    if args.install and runs != RUNS:
        raise ValidationError("`--install` replaces every student of the kit: drop `--student` and `--mode`",
                              field="install")
    if args.install and args.distill_seed and 0 not in args.distill_seed:
        raise ValidationError("`--install` takes distillation seed 0's students: add `--distill-seed 0`",
                              field="install")
    report = run_paper(args.kit, args.output, max_steps=args.max_steps, prompts=args.prompts, seeds=args.seeds,
                       distill_seeds=tuple(dict.fromkeys(args.distill_seed)) if args.distill_seed
                       else args.distill_seeds, runs=runs, batch=args.batch, student_init=args.student_init,
                       lr=lr, even_kinds=args.even_kinds, jobs=args.jobs)
    print(results_table(report))
    if args.install:
        install_students(args.output, args.kit)
        print(f"installed the distilled students into {args.kit}")


def _service_settings(args: argparse.Namespace):
    updates = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    return get_settings().model_copy(update=updates)


# -- formatting ------------------------------------------------------------------------------------------------
def _count(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _print_table(header: list[str], rows: list[list]) -> None:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


# -- parser ----------------------------------------------------------------------------------------------------
def _add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lora", action="append", default=[], metavar="NAME[:SCALE]",
                        help="a registered LoRA adapter (repeatable)")
    parser.add_argument("--control", metavar="NAME", help="a registered ControlNet (with --control-image)")
    parser.add_argument("--control-image", metavar="PATH", help="the control image (png, jpeg, webp)")
    parser.add_argument("--control-preprocess", choices=["auto", "canny", "none"], default="auto",
                        help="auto: canny edges for a canny ControlNet; none: the image is already the map")
    parser.add_argument("--control-scale", type=float, help="conditioning scale (default: the registered one)")
    parser.add_argument("--control-start", type=float, default=0.0, help="fraction of steps where control starts")
    parser.add_argument("--control-end", type=float, default=1.0, help="fraction of steps where control ends")
    parser.add_argument("--control-mode", help="union ControlNets only: the control mode")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2i", description="Text-to-image with a choice of T5 text encoder.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--models-file", type=Path,
                        help="models file (default: $T2I_MODELS_FILE, else the shipped miniature kit)")
    common.add_argument("--threads", type=int, help="CPU threads for torch (default: $T2I_THREADS or 1)")

    gen = sub.add_parser("generate", parents=[common], help="generate an image")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--pipeline", default="flux", help="registry name of the pipeline (default: flux)")
    gen.add_argument("--encoder", default=None,
                     help="registry name of the T5 encoder, or a route such as `auto` (default: the teacher)")
    gen.add_argument("-o", "--output", default="out.png", help="image path (.png, .webp, .jpg)")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance", type=float)
    gen.add_argument("--negative-prompt", help="sd3 only")
    gen.add_argument("--num-images", type=int, default=1)
    _add_adapter_arguments(gen)
    gen.add_argument("--device", help="device of the denoiser (default: the models file's; auto = cuda if present)")
    gen.add_argument("--encoder-device", help="device of the T5 encoder (e.g. cpu beside a cuda denoiser)")
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", parents=[common], help="run the whole service on this machine (Redis, API, worker)")
    api = sub.add_parser("api", parents=[common], help="run an API process (needs T2I_REDIS_URL)")
    for p in (srv, api):
        p.add_argument("--host", help="address to bind (default: $T2I_HOST or 127.0.0.1)")
        p.add_argument("--port", type=int, help="port to bind (default: $T2I_PORT or 8000)")
    srv.set_defaults(func=cmd_serve)
    api.set_defaults(func=cmd_api)
    wrk = sub.add_parser("worker", parents=[common], help="run a worker process (needs T2I_REDIS_URL)")
    wrk.set_defaults(func=cmd_worker)

    ds = sub.add_parser("dataset", help="training prompt sets").add_subparsers(dest="dataset_command", required=True)
    build = ds.add_parser("build", parents=[common], help="build the three-criteria prompt set")
    build.add_argument("config", metavar="CONFIG", nargs="?", help="a YAML file or a preset (builtin-prompts)")
    build.add_argument("--preset", help="a preset name, instead of CONFIG")
    build.add_argument("-o", "--output", required=True, help="output directory")
    build.add_argument("overrides", nargs="*", metavar="--key=value", help="config overrides")
    build.set_defaults(func=cmd_dataset_build)

    distill = sub.add_parser("distill", help="distil a student encoder").add_subparsers(dest="distill_command",
                                                                                         required=True)
    cache = distill.add_parser("cache-teacher", parents=[common], help="store the teacher's embeddings of the prompts")
    cache.add_argument("config", metavar="CONFIG", nargs="?", help="a YAML file or a preset (tiny-cpu, flux-t5-base, ...)")
    cache.add_argument("--preset", help="a preset name, instead of CONFIG")
    cache.add_argument("-o", "--output", help="cache directory (default: the config's teacher_cache)")
    cache.add_argument("overrides", nargs="*", metavar="--key=value")
    cache.set_defaults(func=cmd_distill_cache)
    trn = distill.add_parser("train", parents=[common], help="vision-based distillation (resumes if interrupted)")
    trn.add_argument("config", metavar="CONFIG", nargs="?", help="a YAML file or a preset (tiny-cpu, flux-t5-base, sd3-t5-base)")
    trn.add_argument("--preset", help="a preset name, instead of CONFIG")
    trn.add_argument("overrides", nargs="*", metavar="--key=value", help="config overrides, e.g. --max_steps=100")
    trn.set_defaults(func=cmd_distill_train)
    exp = distill.add_parser("export", parents=[common], help="export a checkpoint as a Hugging Face model dir")
    exp.add_argument("checkpoint", metavar="CKPT", help="a checkpoint dir, or a run dir (its latest checkpoint)")
    exp.add_argument("-o", "--output", required=True)
    exp.set_defaults(func=cmd_distill_export)

    ev = sub.add_parser("eval", parents=[common], help="students vs the teacher on held-out prompts")
    ev.add_argument("config", metavar="CONFIG", nargs="?", help="the distillation config (pipeline, teacher, data)")
    ev.add_argument("--preset", help="a preset name, instead of CONFIG")
    ev.add_argument("--student", action="append", required=True, help="a student dir (repeat to compare several)")
    ev.add_argument("--out", default="eval", help="report directory (default: eval)")
    ev.add_argument("--prompts", type=int, default=8, help="held-out prompts per criterion (default: 8)")
    ev.add_argument("--clip-model", help="a local CLIP model dir, for CLIP score")
    _add_adapter_arguments(ev)
    ev.add_argument("overrides", nargs="*", metavar="--key=value")
    ev.set_defaults(func=cmd_eval)

    world = sub.add_parser("world", help="the miniature world").add_subparsers(dest="world_command", required=True)
    wt = world.add_parser("train", parents=[common], help="train the miniature text-to-image model from scratch")
    wt.add_argument("-o", "--output", required=True, help="kit directory to write")
    wt.add_argument("--vae-steps", type=int, help="VAE training steps (default 1500)")
    wt.add_argument("--steps", type=int, help="denoiser training steps (default 5000)")
    wt.add_argument("--from", dest="start", metavar="KIT",
                    help="a second stage: go on from this kit's denoiser (with its VAE and teacher) for --steps more "
                         "steps, its own warm-up and cosine decay from --lr, on --mix; the new kit has no ControlNet "
                         "and untrained students")
    wt.add_argument("--lr", type=float, help="the denoiser's peak learning rate (default 0.001)")
    wt.add_argument("--warmup", type=int, help="the denoiser's learning-rate warm-up in steps (default 200)")
    wt.add_argument("--ema", type=float,
                    help="decay of the EMA of the denoiser's weights that the kit stores (default 0.999; 0 stores "
                         "the trained weights themselves)")
    wt.add_argument("--batch", type=int, help="denoiser training batch (default 64)")
    wt.add_argument("--checkpoint-every", type=int,
                    help="steps between checkpoints in DIR/work (default 250); rerun the same command to resume")
    wt.add_argument("--heads", type=int, help="denoiser attention heads of 32 dims each: its width (default 8)")
    wt.add_argument("--layers", type=int, help="denoiser double-stream blocks (default 2)")
    wt.add_argument("--single-layers", type=int, help="denoiser single-stream blocks (default 4)")
    wt.add_argument("--timestep-mean", type=float,
                    help="location of the logit-normal training timesteps (default 1.0; 0 centres them as FLUX "
                         "trains; above 0 trains more at high noise, where layout and counts are decided)")
    wt.add_argument("--mix", help="the denoiser's caption mix as kind=weight pairs, e.g. "
                                  "count=0.4,relation=0.4,single=0.1,text=0.1 (default single=0.15,count=0.45,"
                                  "relation=0.25,text=0.15); a kind left out is not drawn")
    wt.add_argument("--teacher", choices=("random", "local"),
                    help="the frozen teacher T5's attention: local (default: heads biased to the previous, next and "
                         "same word, so that each output carries its neighbours) or random as initialised")
    wt.add_argument("--precision", choices=("float32", "bfloat16"),
                    help="the denoiser's training arithmetic (default float32; bfloat16 runs its passes under "
                         "autocast, weights and optimizer in float32: faster on a GPU or a CPU with AVX-512 BF16, "
                         "slower on one without)")
    wt.add_argument("--denoiser-dtype", choices=("float32", "float16"), default="float16",
                    help="how the kit stores the denoiser's weights (default float16: half the bytes of float32; "
                         "it trains in float32 either way and loads in the models file's dtype)")
    wt.add_argument("--device", default="auto", help=TRAIN_DEVICE_HELP)
    wt.add_argument("--seed", type=int, default=0)
    wt.set_defaults(func=cmd_world_train)
    wp = world.add_parser("prompts", help="write the world's prompt set in the trainer's dataset format")
    wp.add_argument("-o", "--output", required=True)
    wp.add_argument("--train", type=int, default=4000)
    wp.add_argument("--validation", type=int, default=200)
    wp.add_argument("--seed", type=int, default=0)
    wp.add_argument("--even-kinds", action="store_true",
                    help="a quarter of the prompts of each kind, repeating sign captions once the few distinct ones "
                         "run out (default: distinct captions only, about 1%% signs)")
    wp.set_defaults(func=cmd_world_prompts)
    we = world.add_parser("eval", parents=[common], help="the evaluator's accuracy per encoder on held-out prompts")
    we.add_argument("--encoder", action="append",
                    help="encoder or route (e.g. auto) to evaluate (repeat; default: every encoder)")
    we.add_argument("--pipeline", default="flux")
    we.add_argument("--prompts", type=int, default=120)
    we.add_argument("--prompt", action="append",
                    help="evaluate this prompt (repeat) instead of drawn ones, with seeds 0..N-1 of --seeds: the "
                         "images requests with those seeds get; the report says per prompt on which seeds every "
                         "attribute came out right")
    we.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
    we.add_argument("--seeds", type=int, default=1, help="seeds per prompt (default 1)")
    we.add_argument("--batch", type=int, default=1,
                    help="images per denoising call (default 1: reproduces figures exactly); 16 is about 3x faster on "
                         "a CPU, each image equal to its unbatched one up to rounding")
    we.add_argument("--novel", action="store_true",
                    help="only combinations training never saw (colour x shape x position, word x template)")
    we.add_argument("--validation", action="store_true",
                    help="prompts from the validation seed instead of the held-out one (semantic kinds unless "
                         "--kind says otherwise): tune defaults (such as --cfg) here, never on the held-out set")
    we.add_argument("--kind", action="append", choices=("single", "count", "relation", "text"),
                    help="draw only prompts of this kind (repeat; default: all four, the semantic three with "
                         "--validation, single and text with --novel), in turn")
    we.add_argument("--cfg", type=float, help="true classifier-free guidance (default: the pipeline's)")
    we.add_argument("--out", help="also write the JSON report here")
    we.add_argument("--details", action="store_true",
                    help="the report also lists every image: its prompt, seed, the attributes it got wrong and what "
                         "the evaluator found in it")
    we.add_argument("--chart", help="also draw accuracy against encoder bytes (PNG) here")
    we.set_defaults(func=cmd_world_eval)
    wd = world.add_parser("diagnose", parents=[common],
                          help="bound the teacher from outside: the VAE's round trip and a probe of the text encoder")
    wd.add_argument("--kit", required=True, help="a kit from `t2i world train`")
    wd.add_argument("--scenes", type=int, default=400, help="held-out scenes for the VAE round trip (default 400)")
    wd.add_argument("--probe-steps", type=int, default=1500, help="training steps of the text probe (default 1500)")
    wd.add_argument("--out", help="also write the JSON report here")
    wd.set_defaults(func=cmd_world_diagnose)
    wpp = world.add_parser("paper", parents=[common], help="distil students at 1/4, 1/16, 1/64 and read their images")
    wpp.add_argument("--kit", required=True, help="a kit from `t2i world train`")
    wpp.add_argument("-o", "--output", required=True)
    wpp.add_argument("--max-steps", type=int, default=6000,
                     help="optimizer steps per student (default 6000: one per trajectory step, 300 walks of 16 prompts)")
    wpp.add_argument("--prompts", type=int, default=200,
                     help="held-out prompts per encoder, a quarter of each kind (default 200)")
    wpp.add_argument("--seeds", type=int, default=2, help="seeds per prompt (default 2)")
    wpp.add_argument("--batch", type=int, default=1,
                     help="images per denoising call when reading them (default 1; 16 is about 3x faster on a CPU, "
                          "each image equal to its unbatched one up to rounding)")
    wpp.add_argument("--distill-seeds", type=int, default=2,
                     help="distillation seeds per student, to show how much a run varies (default 2); "
                          "--install takes seed 0's")
    wpp.add_argument("--distill-seed", type=int, action="append", metavar="SEED",
                     help="only this distillation seed (repeat) instead of 0 to --distill-seeds minus 1: add a seed to "
                          "a study whose other seeds were read already")
    wpp.add_argument("--student", action="append",
                     help="only the runs of this student size (repeat; e.g. t5-base: step-following and "
                          "embedding-MSE); default: every run")
    wpp.add_argument("--mode", action="append", choices=("step-following", "embedding-mse"),
                     help="only the runs of this distillation mode (repeat); default: both")
    wpp.add_argument("--student-init", choices=("local", "random"), default="local",
                     help="the students' start: random weights with the teacher's local attention prior (default, as "
                          "pretrained T5s attend to neighbouring words), or random weights alone")
    wpp.add_argument("--lr", action="append", metavar="SIZE=RATE",
                     help="a student size's learning rate (repeat); default 0.0003 for every size")
    wpp.add_argument("--even-kinds", action=argparse.BooleanOptionalAction, default=True,
                     help="distil on a prompt set with a quarter of each kind, signs repeated (default; see `t2i "
                          "world prompts --even-kinds`), or with --no-even-kinds on distinct captions only")
    wpp.add_argument("--jobs", type=int, default=1,
                     help="distil this many runs at a time, each in its own process (default 1; a GPU host or a CPU "
                          "with cores to spare for each run's 2 threads: each run is the same as alone)")
    wpp.add_argument("--install", action="store_true", help="put the distilled students into the kit")
    wpp.set_defaults(func=cmd_world_paper)
    wol = world.add_parser("outliers", parents=[common],
                           help="a copy of a kit whose teacher's embeddings have a few channels of very large "
                                "magnitude (as real T5 v1.1's), drawing the same images")
    wol.add_argument("--kit", required=True, help="a kit from `t2i world train`")
    wol.add_argument("-o", "--output", required=True, help="the new kit's directory (must not exist)")
    wol.add_argument("--channels", type=int, default=4, help="how many channels (default 4)")
    wol.add_argument("--scale", type=float, default=100.0, help="their magnitude, times the rest's (default 100)")
    wol.add_argument("--seed", type=int, default=0, help="which channels")
    wol.set_defaults(func=cmd_world_outliers)
    wcn = world.add_parser("controlnet", parents=[common], help="train the kit's canny ControlNet and register it")
    wcn.add_argument("--kit", required=True, help="a kit from `t2i world train`")
    budget = wcn.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help=f"training steps at batch 32 (default {CONTROLNET_STEPS}: the same "
                                                  "weights from the same seed on any machine)")
    budget.add_argument("--minutes", type=float, help="a time budget instead of steps: as many as fit")
    wcn.add_argument("--dtype", choices=("float32", "float16"), default="float16",
                     help="how the kit stores the ControlNet's weights (default float16: half the bytes of float32; "
                          "it trains in float32 either way and loads in the models file's dtype)")
    wcn.add_argument("--device", default="auto", help=TRAIN_DEVICE_HELP)
    wcn.add_argument("--seed", type=int, default=0)
    wcn.set_defaults(func=cmd_world_controlnet)
    wce = world.add_parser("control-eval", parents=[common],
                           help="edge correlation with the control, with and without the ControlNet, per encoder")
    wce.add_argument("--kit", required=True)
    wce.add_argument("--encoder", action="append", help="encoder to evaluate (repeat; default: all)")
    wce.add_argument("--seeds", type=int, default=4, help="seeds per control image (default 4)")
    wce.add_argument("--out", help="also write the JSON report here")
    wce.add_argument("--grid", help="also draw the images (PNG) here")
    wce.set_defaults(func=cmd_world_control_eval)

    models = sub.add_parser("models", help="the model registry").add_subparsers(dest="models_command", required=True)
    lst = models.add_parser("list", parents=[common], help="every pipeline and encoder known, with sizes")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_models_list)
    demo = models.add_parser("make-demo", parents=[common], help="write the offline demo model kit to DIR")
    demo.add_argument("dir", metavar="DIR", type=Path)
    demo.add_argument("--overwrite", action="store_true", help="replace DIR if it is not empty")
    demo.set_defaults(func=cmd_models_make_demo)
    sizes = models.add_parser("sizes", parents=[common], help="real-size architectures counted on the meta device")
    sizes.set_defaults(func=cmd_models_sizes)
    quant = models.add_parser("quantize", parents=[common],
                              help="write a pre-quantized copy of a registered encoder (a Hugging Face directory)")
    quant.add_argument("name", metavar="NAME", help="a registered, unquantized encoder")
    quant.add_argument("--method", required=True, help="int8-weight-only, int8-dynamic, fp8-weight-only, "
                                                       "int4-weight-only (CUDA), bnb-int8 or bnb-nf4")
    quant.add_argument("--options", help='the method\'s options as JSON, e.g. \'{"double_quant": true}\'')
    quant.add_argument("--device", help="where to quantize (default: the encoder's device)")
    quant.add_argument("-o", "--output", required=True, help="directory to write (new or empty)")
    quant.set_defaults(func=cmd_models_quantize)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    new = keys.add_parser("new", help="make an API key and print the hash line for T2I_API_KEYS")
    new.add_argument("--name", default="client", help="a name for logs (default: client)")
    new.set_defaults(func=cmd_keys_new)

    health = sub.add_parser("healthcheck", help="exit 0 when the API or worker on this host answers /healthz")
    health.add_argument("--url", action="append", help="URL to check (repeat; default: the API's and the worker's "
                                                       "/healthz on 127.0.0.1)")
    health.add_argument("--timeout", type=float, default=3.0)
    health.set_defaults(func=cmd_healthcheck)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # `--key=value` config overrides, for the commands that take them
        if not hasattr(args, "overrides") or any("=" not in u or not u.startswith("--") for u in unknown):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = [*args.overrides, *unknown]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if hasattr(args, "preset"):
            if (args.config is None) == (args.preset is None):
                raise ValidationError("give CONFIG (a YAML file or a preset name) or --preset NAME, not both",
                                      field="CONFIG")
            args.config = args.config or args.preset
        if args.command == "generate" and args.encoder is None:
            args.encoder = _default_encoder(args)
        args.func(args)
    except T2IError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _default_encoder(args: argparse.Namespace) -> str:
    from service.models.registry import Registry

    teacher = Registry.from_file(models_file(args)).teacher
    if teacher is None:
        raise ValidationError("`--encoder` is required: the models file registers no teacher", field="encoder")
    return teacher.name


if __name__ == "__main__":
    sys.exit(main())
