"""Throughput of the farm's render path against plain diffusers, on one pipeline, in one run (issue 7).

    python bench/gpu.py                       # CUDA: full-size SD1.5 architecture, random weights, fp16
    python bench/gpu.py --device cpu --tiny   # the default without CUDA: tiny model, 64², few steps (<60 s)

On the same pipeline object, in this order:

1. plain diffusers, batch 1 (``pipe(prompt=..., output_type="pil")``, the scheduler the farm uses);
2. plain diffusers at each ``--batches`` size; the best one is "diffusers best";
3. the farm: ``workers.diffusion.speed.optimize`` (its device defaults, ``--compile`` adds torch.compile and a
   warm-up), ``workers.diffusion.render.render_batch`` at each batch size, then at the best one end to end
   over ``--images`` images: render, PNG encode with A1111 metadata (``farm.imaging.pnginfo.encode_png``) and
   upload through ``farm.storage.s3.S3Storage`` to a local ``moto_server`` over HTTP, handed to
   ``workers.finishing.finisher.Finisher`` as ``workers.tasks.run_render`` does, so the next batch renders while
   the last one uploads; once more waiting for each batch's uploads (``FARM_RENDER_OVERLAP_TASKS=0``)
   for comparison. ``gpu_idle_percent``: the share of the time between the first render's start and the
   last one's end spent outside ``render_batch``. No database writes.

Then one instrumented batch splits the time per image into text encode, denoise (UNet + scheduler),
VAE decode (+ conversion to PIL); PNG encode and upload come from the end-to-end run (thread time,
mostly overlapped). The last line printed is one JSON object (see ``KEYS``). Weights are random:
they cost the same compute as real ones. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

#: Keys the JSON line always has.
KEYS = (
    "device", "model", "size", "steps", "scheduler", "farm_images_per_s", "farm_batch", "farm_options",
    "diffusers_b1_images_per_s", "diffusers_best_images_per_s", "diffusers_best_batch", "ratio_vs_b1",
    "ratio_vs_best", "diffusers_images_per_s", "farm_render_images_per_s", "ms_per_image",
    "upload_wait_ms_per_image", "gpu_idle_percent", "farm_no_overlap_images_per_s", "no_overlap_gpu_idle_percent",
    "peak_memory_mb", "seconds",
)
PHASES = ("text_encode", "denoise", "vae_decode", "png_encode", "upload")
PROMPT = "a red circle on a blue background, highly detailed"
NEGATIVE = "blurry"

# -- the SD1.5 architecture, written out (diffusers configs of runwayml/stable-diffusion-v1-5) ------

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2, act_fn="silu",
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32, scaling_factor=0.18215,
)
SD15_TEXT = dict(  # openai/clip-vit-large-patch14's text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
)
SD15_SCHEDULER = dict(  # PNDM as SD1.5 ships it; the farm swaps schedulers from this config
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
)


def clip_sized_tokenizer():
    """A CLIP tokenizer with 49,408 ids (CLIP's vocabulary cannot be downloaded here): the tiny
    model's byte-level BPE plus filler tokens, with <|startoftext|>/<|endoftext|> at 49406/49407."""
    from transformers import CLIPTokenizer

    from workers.diffusion.tiny import tiny_vocab

    vocab, merges = tiny_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if not t.startswith("<|")]
    tokens += [f"<|filler{n}|>" for n in range(SD15_TEXT["vocab_size"] - 2 - len(tokens))]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=77)


def build_sd15(device: str, dtype) -> Any:
    """The full-size SD1.5 pipeline with random weights, built directly on ``device``."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_sized_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET).to(dtype)
        vae = AutoencoderKL(**SD15_VAE).to(dtype)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                **SD15_TEXT, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        ).to(dtype)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- services ---------------------------------------------------------------------------------------


@contextmanager
def moto_s3() -> Iterator[str]:
    """A ``moto_server`` subprocess on 127.0.0.1; yields its endpoint URL."""
    executable = Path(sys.executable).parent / "moto_server"
    if not executable.exists():
        raise SystemExit(f"{executable} not found: install moto[server] (pip install -e '.[test]')")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(executable), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"moto_server did not start on {endpoint}")
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


# -- timing -----------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def diffusers_batch(pipe, device: str, batch: int, size: int, steps: int) -> float:
    """Seconds for one plain diffusers call of ``batch`` images (PIL out, as a user would)."""
    import torch

    _sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        pipe(
            prompt=[PROMPT] * batch, negative_prompt=[NEGATIVE] * batch, width=size, height=size,
            num_inference_steps=steps, guidance_scale=7.5, output_type="pil",
            generator=[torch.Generator("cpu").manual_seed(n) for n in range(batch)],
        )
    _sync(device)
    return time.perf_counter() - started


def specs_for(batch: int, size: int, steps: int, scheduler: str, first_seed: int = 0):
    from farm.request.spec import ImageSpec

    return [
        ImageSpec(prompt=PROMPT, negative_prompt=NEGATIVE, seed=first_seed + n, steps=steps, guidance_scale=7.5,
                  width=size, height=size, scheduler=scheduler, model="bench")
        for n in range(batch)
    ]


def farm_batch(model, device: str, specs) -> float:
    from workers.diffusion.render import render_batch

    _sync(device)
    started = time.perf_counter()
    render_batch(model, specs, base_scheduler_config=model.scheduler_config)
    _sync(device)
    return time.perf_counter() - started


def sweep(run, batches: list[int], repeats: int) -> dict[int, float]:
    """Images per second at each batch size: one warm-up call, then the best of ``repeats``."""
    figures = {}
    for batch in batches:
        run(batch)
        best = min(run(batch) for _ in range(repeats))
        figures[batch] = batch / best
    return figures


@contextmanager
def phase_timer(pipe, device: str) -> Iterator[dict[str, float]]:
    """Seconds spent in the text encoder, the VAE decode and the PIL conversion while inside."""
    took = {"text_encode": 0.0, "vae_decode": 0.0}
    starts: list[float] = []

    def pre(_module, _args):
        _sync(device)
        starts.append(time.perf_counter())

    def post(_module, _args, _out):
        _sync(device)
        took["text_encode"] += time.perf_counter() - starts.pop()

    handles = [pipe.text_encoder.register_forward_pre_hook(pre), pipe.text_encoder.register_forward_hook(post)]
    timed = {}
    for owner, name in ((pipe.vae, "decode"), (pipe.image_processor, "postprocess")):
        original = getattr(owner, name)

        def wrapper(*args, __original=original, **kwargs):
            _sync(device)
            started = time.perf_counter()
            out = __original(*args, **kwargs)
            _sync(device)
            took["vae_decode"] += time.perf_counter() - started
            return out

        timed[(owner, name)] = original
        setattr(owner, name, wrapper)
    try:
        yield took
    finally:
        for handle in handles:
            handle.remove()
        for (owner, name), _original in timed.items():
            delattr(owner, name)  # back to the class's method


def end_to_end(model, device: str, storage, *, batch: int, images: int, size: int, steps: int, scheduler: str,
               threads: int, overlap: bool = True) -> dict[str, float]:
    """Render ``images`` images in batches of ``batch`` and finish each (PNG encode + upload) as a worker
    does: handed to ``workers.finishing.finisher.Finisher`` while the next batch renders (``overlap``), or waited
    for after each batch (a task that acks only after its uploads). No database: records are no-ops."""
    from workers.finishing.finisher import Finisher
    from workers.diffusion.render import render_batch
    from workers.tasks import finish_item
    from workers.finishing.uploader import Uploader

    batches = max(1, images // batch)
    rendering = 0.0  # seconds inside render_batch (the GPU's work, synchronised)
    uploader = Uploader(storage, workers=threads)
    finisher = Finisher(uploader, record=lambda *args: True, renew=lambda tokens: None, renew_every=60.0)
    _sync(device)
    started = time.perf_counter()
    first_render = last_render = started
    for b in range(batches):
        specs = specs_for(batch, size, steps, scheduler, first_seed=1000 + b * batch)
        render_started = time.perf_counter()
        if b == 0:
            first_render = render_started
        result = render_batch(model, specs, base_scheduler_config=model.scheduler_config)
        _sync(device)
        last_render = time.perf_counter()
        rendering += last_render - render_started
        submission = uuid.uuid4().hex
        items = [  # built by the worker's own code: key, PNG with A1111 metadata, object metadata
            finish_item(model, device, SimpleNamespace(id=uuid.uuid4().hex, submission_id=submission), spec, rendered,
                        seconds_each=result.seconds / batch, batch_size=batch, loras=[])
            for spec, rendered in zip(specs, result.images)
        ]
        handoff = finisher.hand_off(f"bench-{b}", items)
        if not overlap:
            handoff.wait()
    finisher.close()
    seconds = time.perf_counter() - started
    uploaded = max(1, uploader.uploaded)
    span = last_render - first_render
    return {
        "images": batches * batch,
        "seconds": seconds,
        "png_encode_s": uploader.encode_seconds / uploaded,
        "upload_s": uploader.upload_seconds / uploaded,
        # time the renders waited for the previous batch's uploads (or anything else), per image
        "wait_s": (span - rendering) / (batches * batch),
        # between the first render's start and the last render's end, the share spent outside render_batch
        "idle_percent": 100.0 * (span - rendering) / span if span > 0 else 0.0,
        # after the last render: the final uploads (the only ones a worker's next task would not hide)
        "drain_s": seconds - (last_render - started),
    }


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- main -------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    import torch

    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=None,
                        help="the tiny model (default on CPU) instead of full-size SD1.5 (default on CUDA)")
    parser.add_argument("--size", type=int, help="image side in px (512 full, 64 tiny)")
    parser.add_argument("--steps", type=int, help="denoising steps (25 full, 4 tiny)")
    parser.add_argument("--scheduler", default="dpmpp_2m")
    parser.add_argument("--batches", help="batch sizes to sweep (1,2,4,8,16 full; 1,2,4 tiny)")
    parser.add_argument("--images", type=int, help="images in the end-to-end farm run (32 full, 16 tiny)")
    parser.add_argument("--repeats", type=int, help="timed calls per batch size, best kept (3 full, 2 tiny)")
    parser.add_argument("--compile", action="store_true", help="torch.compile UNet + VAE decoder (warm-up included)")
    parser.add_argument("--compile-mode", default=None)
    parser.add_argument("--upload-threads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU: shared CI cores)")
    args = parser.parse_args(argv)
    if args.tiny is None:
        args.tiny = not args.device.startswith("cuda")
    full = not args.tiny
    args.size = args.size or (512 if full else 64)
    args.steps = args.steps or (25 if full else 4)
    args.batches = [int(b) for b in (args.batches or ("1,2,4,8,16" if full else "1,2,4")).split(",")]
    if 1 not in args.batches:
        args.batches.insert(0, 1)
    args.images = args.images or (32 if full else 16)
    args.repeats = args.repeats or (3 if full else 2)
    if args.threads is None and not args.device.startswith("cuda"):
        args.threads = 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    import torch

    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

    from farm.storage.s3 import S3Storage
    from workers.diffusion.pipeline import LoadedModel, load_pipeline
    from workers.diffusion.schedulers import make_scheduler
    from workers.diffusion.speed import optimize, warmup

    tmp = Path(tempfile.mkdtemp(prefix="farm-gpu-bench-"))
    if args.tiny:
        plain = {"channels_last": False, "fuse_qkv": False, "vae_slicing": False, "compile": False}
        model = load_pipeline("bench", "builtin:tiny", models_dir=tmp, device=device, speed=plain)
        model_name = "builtin:tiny"
    else:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        pipe = build_sd15(device, dtype)
        model = LoadedModel(name="bench", path=tmp, hash="0000000000", pipe=pipe, device=device, dtype=dtype)
        model_name = f"sd15-architecture-random-{str(dtype).removeprefix('torch.')}"
    pipe = model.pipe
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    # 1-2. plain diffusers on the untouched pipeline, with the scheduler the farm will use
    pipe.scheduler = make_scheduler(args.scheduler, model.scheduler_config)
    plain_figures = sweep(lambda b: diffusers_batch(pipe, device, b, args.size, args.steps), args.batches, args.repeats)
    plain_best = max(plain_figures, key=plain_figures.get)
    print(f"diffusers: {', '.join(f'b{b} {v:.2f}/s' for b, v in plain_figures.items())}", flush=True)

    # 3. the farm: speed options, then render_batch at each batch size, then end to end at the best
    options = optimize(pipe, device=device, compile=args.compile, compile_mode=args.compile_mode)
    if args.compile:
        warmup(pipe, [(args.size, args.size)], args.batches)
    farm_figures = sweep(
        lambda b: farm_batch(model, device, specs_for(b, args.size, args.steps, args.scheduler)), args.batches, args.repeats
    )
    farm_best = max(farm_figures, key=farm_figures.get)
    print(f"farm render: {', '.join(f'b{b} {v:.2f}/s' for b, v in farm_figures.items())}", flush=True)

    with phase_timer(pipe, device) as took:
        total = farm_batch(model, device, specs_for(farm_best, args.size, args.steps, args.scheduler))
    with moto_s3() as endpoint:
        storage = S3Storage(f"bench-{uuid.uuid4().hex[:12]}", endpoint_url=endpoint, region="us-east-1")
        storage.ensure_bucket()
        run = dict(batch=farm_best, images=args.images, size=args.size, steps=args.steps, scheduler=args.scheduler,
                   threads=args.upload_threads)
        waiting = end_to_end(model, device, storage, overlap=False, **run)
        e2e = end_to_end(model, device, storage, overlap=True, **run)
    farm_ips = e2e["images"] / e2e["seconds"]
    waiting_ips = waiting["images"] / waiting["seconds"]
    print(f"farm end to end: {e2e['images']} images in {e2e['seconds']:.2f} s at batch {farm_best} "
          f"(GPU idle {e2e['idle_percent']:.1f}%; waiting for each batch's uploads: {waiting['seconds']:.2f} s, "
          f"idle {waiting['idle_percent']:.1f}%)", flush=True)

    ms = lambda seconds: round(seconds * 1000, 3)  # noqa: E731
    per_image = {
        "text_encode": ms(took["text_encode"] / farm_best),
        "denoise": ms((total - took["text_encode"] - took["vae_decode"]) / farm_best),
        "vae_decode": ms(took["vae_decode"] / farm_best),
        "png_encode": ms(e2e["png_encode_s"]),
        "upload": ms(e2e["upload_s"]),
    }
    b1 = plain_figures[1]
    best = plain_figures[plain_best]
    report = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
        "model": model_name,
        "size": args.size,
        "steps": args.steps,
        "scheduler": args.scheduler,
        "farm_images_per_s": round(farm_ips, 3),
        "farm_batch": farm_best,
        "farm_options": options.as_dict(),
        "diffusers_b1_images_per_s": round(b1, 3),
        "diffusers_best_images_per_s": round(best, 3),
        "diffusers_best_batch": plain_best,
        "ratio_vs_b1": round(farm_ips / b1, 3),
        "ratio_vs_best": round(farm_ips / best, 3),
        "diffusers_images_per_s": {str(b): round(v, 3) for b, v in plain_figures.items()},
        "farm_render_images_per_s": {str(b): round(v, 3) for b, v in farm_figures.items()},
        "ms_per_image": per_image,
        "upload_wait_ms_per_image": ms(e2e["wait_s"]),
        "gpu_idle_percent": round(e2e["idle_percent"], 2),
        "final_drain_ms": ms(e2e["drain_s"]),
        "farm_no_overlap_images_per_s": round(waiting_ips, 3),
        "no_overlap_gpu_idle_percent": round(waiting["idle_percent"], 2),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.startswith("cuda") else "process max RSS",
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()
