"""Train the shapes text-to-image model (SD1.x architecture) from nothing, deterministically.

Stages (each resumable from its own checkpoint under ``--work``, default ``training/checkpoints``):

    data     draw the training images (deterministic from --seed; held-out combos never drawn)
    vae      train the AutoencoderKL (factor 4: 64 px image -> 4x16x16 latent)
    latents  encode the training images with the trained VAE; scaling factor = 1 / latent std
    unet     train UNet2DConditionModel + CLIP text encoder jointly, EMA, 10 % empty captions
    export   write the diffusers folder (safetensors only) to --out (default models/shapes)
    lora     train the "green" LoRA on the exported model -> <out>/loras/green.safetensors
    all      everything above in order

    python -m training.train_shapes all                  # the shipped weights (CPU, 1 thread, ~75 min)
    python -m training.train_shapes unet --unet-steps 10000   # resume from the checkpoint and train further
    python -m training.train_shapes all --device cuda    # same recipe on a GPU

Determinism: every random draw of step ``k`` comes from a generator seeded with (seed, stage, k),
so a run resumed from a checkpoint continues exactly as an uninterrupted one (on the same device
type and thread count: float reductions differ between CPU and CUDA).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from farm.request.schedulers import SD1_PNDM_CONFIG  # noqa: E402
from evaluation import checks as S  # noqa: E402

STAGE_SEEDS = {"data": 1, "vae": 2, "latents": 3, "unet": 4, "lora": 5, "init": 6}

# -- configuration -----------------------------------------------------------------------------------

TEXT_HIDDEN = 64
UNET_KW = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_HIDDEN,
    attention_head_dim=8,
    norm_num_groups=32,
)
VAE_KW = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),  # 3 blocks -> scale factor 4
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=64,
)
SCHEDULER_KW = SD1_PNDM_CONFIG  # SD1.x's schedule (as SD1.5 ships its PNDM config)
EMPTY_CAPTION_P = 0.10
PARTIAL_CAPTION_P = 0.10
FARM_DEFAULTS = {"default_guidance_scale": 5.0, "default_steps": 20, "width": 64, "height": 64, "scheduler": "dpmpp_2m"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gen(seed: int, stage: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + STAGE_SEEDS[stage] * 10_007_000 + step)


def pyrng(seed: int, stage: str, step: int) -> random.Random:
    return random.Random(seed * 1_000_003 + STAGE_SEEDS[stage] * 10_007_000 + step)


class Progress:
    def __init__(self, name: str, start: int, total: int):
        self.name, self.start, self.total = name, start, total
        self.t0 = time.time()

    def line(self, step: int, **values: float) -> str:
        done = step - self.start
        rate = done / max(time.time() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        vals = " ".join(f"{k}={v:.4f}" for k, v in values.items())
        return f"{self.name} step {step}/{self.total} {vals} {rate:.2f} it/s ETA {eta / 60:.1f} min"


def save_ckpt(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_ckpt(path: Path) -> dict | None:
    return torch.load(path, weights_only=True, map_location="cpu") if path.is_file() else None


# -- components --------------------------------------------------------------------------------------


def build_tokenizer():
    """CLIPTokenizer over bytes + the caption words (each one token), built locally."""
    from transformers import CLIPTokenizer

    from workers.diffusion.tiny import build_vocab

    vocab, merges = build_vocab(S.WORDS)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=4 * TEXT_HIDDEN,
            projection_dim=TEXT_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            layer_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_KW)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_KW)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    # exactly what StableDiffusionPipeline.encode_prompt does
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


# -- data --------------------------------------------------------------------------------------------


def draw_dataset(n: int, seed: int, combos: list, stage: str = "data", recolour: str | None = None):
    """(uint8 images n x 64 x 64 x 3, list of combos) deterministic from ``seed``."""
    rng = pyrng(seed, stage, 0)
    images = np.empty((n, S.IMAGE_SIZE, S.IMAGE_SIZE, 3), np.uint8)
    labels = []
    for i in range(n):
        combo = combos[rng.randrange(len(combos))]
        scene = S.random_scene(rng, combo)
        if recolour is not None:
            scene = S.Scene(recolour, *[getattr(scene, f) for f in ("shape", "background", "size", "cx", "cy")])
        images[i] = np.asarray(S.draw(scene))
        labels.append(combo)
    return images, labels


def stage_data(args) -> None:
    path = args.work / "data.npz"
    if path.is_file():
        log(f"data: {path} exists")
        return
    train, held = S.split()
    t0 = time.time()
    images, labels = draw_dataset(args.images, args.seed, train)
    idx = np.array([[list(S.COLOURS).index(c), S.SHAPES.index(s), list(S.COLOURS).index(b)] for c, s, b in labels], np.int16)
    np.savez(path, images=images, labels=idx)
    log(f"data: {len(images)} images of {len(train)} combos ({len(held)} held out) in {time.time() - t0:.0f} s -> {path}")


def load_data(args):
    d = np.load(args.work / "data.npz")
    return d["images"], d["labels"]


def labels_to_combo(row) -> tuple[str, str, str]:
    names = list(S.COLOURS)
    return names[row[0]], S.SHAPES[row[1]], names[row[2]]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


# -- VAE ---------------------------------------------------------------------------------------------


def stage_vae(args) -> None:
    ckpt_path = args.work / "vae.pt"
    images, _ = load_data(args)
    torch.manual_seed(args.seed + STAGE_SEEDS["init"])
    vae = build_vae().to(args.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    start = 0
    state = load_ckpt(ckpt_path)
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        log(f"vae: resumed at step {start}")
    total = args.vae_steps
    prog = Progress("vae", start, total)
    vae.train()
    for step in range(start, total):
        g = gen(args.seed, "vae", step)
        full = step >= total - args.vae_full_steps or args.vae_crop >= S.IMAGE_SIZE
        # most steps see random crops (4x cheaper at 32 px; the VAE is convolutional), the last
        # ``--vae-full-steps`` whole images so the mid-block attention sees the full latent grid
        batch = args.vae_batch if full else args.vae_batch * 2
        idx = torch.randint(0, len(images), (batch,), generator=g)
        x = to_tensor(images[idx.numpy()])
        if not full:
            c = args.vae_crop
            oy, ox = (int(v) * 4 for v in torch.randint(0, (S.IMAGE_SIZE - c) // 4 + 1, (2,), generator=g))
            x = x[:, :, oy : oy + c, ox : ox + c]
        x = x.to(args.device)
        lr = args.vae_lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))
        for group in opt.param_groups:
            group["lr"] = lr
        dist = vae.encode(x).latent_dist
        eps = torch.randn(dist.mean.shape, generator=g).to(args.device)
        z = dist.mean + dist.std * eps
        y = vae.decode(z).sample
        rec = (y - x).abs().mean() + (y - x).pow(2).mean()
        kl = dist.kl().mean() / dist.mean[0].numel()
        loss = rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if (step + 1) % 25 == 0 or step + 1 == total:
            log(prog.line(step + 1, loss=loss.item(), rec=rec.item(), kl=kl.item(), lr=lr))
        if (step + 1) % args.ckpt_every == 0 or step + 1 == total:
            save_ckpt(ckpt_path, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1})
    check_vae(args, vae)


@torch.no_grad()
def check_vae(args, vae, n: int = 400) -> dict:
    """Reconstruct held-out-combo drawings and read them with the analyser: the model's cap."""
    vae.eval()
    _, held = S.split()
    images, labels = draw_dataset(n, args.seed + 99, held, stage="vae")
    recon = []
    for i in range(0, n, 100):
        x = to_tensor(images[i : i + 100]).to(args.device)
        recon.append(to_uint8(vae.decode(vae.encode(x).latent_dist.mean).sample))
    recon = np.concatenate(recon)
    psnr = 10 * np.log10(255**2 / np.mean((recon.astype(np.float32) - images.astype(np.float32)) ** 2))
    res = S.scores(labels, [S.analyse(r) for r in recon])
    res["psnr"] = float(psnr)
    log(f"vae check on {n} held-out drawings: {json.dumps(res)}")
    return res


def load_vae(args):
    vae = build_vae()
    vae.load_state_dict(load_ckpt(args.work / "vae.pt")["model"])
    return vae.to(args.device).eval()


# -- latents -----------------------------------------------------------------------------------------


@torch.no_grad()
def stage_latents(args) -> None:
    path = args.work / "latents.pt"
    if path.is_file():
        log(f"latents: {path} exists")
        return
    images, labels = load_data(args)
    vae = load_vae(args)
    out = []
    t0 = time.time()
    for i in range(0, len(images), 256):
        out.append(vae.encode(to_tensor(images[i : i + 256]).to(args.device)).latent_dist.mean.cpu())
    lat = torch.cat(out)
    std = lat.std().item()
    save_ckpt(path, {"latents": lat, "std": std, "mean": lat.mean().item()})
    log(f"latents: {tuple(lat.shape)} std {std:.4f} mean {lat.mean().item():.4f} -> scaling factor {1 / std:.4f} ({time.time() - t0:.0f} s)")


# -- UNet + text encoder ----------------------------------------------------------------------------


def training_caption(combo: tuple[str, str, str], rng: random.Random) -> str:
    """Full caption 80 %, empty 10 % (for classifier-free guidance), partial 10 % (negative prompts)."""
    u = rng.random()
    if u < EMPTY_CAPTION_P:
        return ""
    if u < EMPTY_CAPTION_P + PARTIAL_CAPTION_P:
        c, s, b = combo
        keep = rng.choice([(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1)])
        if keep == (1, 0, 0) and rng.random() < 0.5:
            return c
        text = f"a {c + ' ' if keep[0] else ''}{s if keep[1] else 'shape'}"
        if keep[2]:
            text = f"a {b} background" if keep == (0, 0, 1) else f"{text} on a {b} background"
        return text
    return S.caption(*combo)


OFFSET_NOISE = "3250:0.1,4500:0.3"


def offset_noise_at(schedule: str, step: int) -> float:
    """Offset-noise strength at ``step`` from a 'STEP:STRENGTH,...' schedule (0 before the first)."""
    strength = 0.0
    for item in filter(None, (x.strip() for x in schedule.split(","))):
        start, value = item.split(":")
        if step >= int(start):
            strength = float(value)
    return strength


def min_snr_weights(scheduler, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    ac = scheduler.alphas_cumprod.to(t.device)[t]
    snr = ac / (1 - ac)
    return torch.clamp(snr, max=gamma) / snr


class EMA:
    def __init__(self, modules: dict, decay: float):
        self.decay = decay
        self.shadow = {f"{k}.{n}": p.detach().clone() for k, m in modules.items() for n, p in m.named_parameters()}

    @torch.no_grad()
    def update(self, modules: dict, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, m in modules.items():
            for n, p in m.named_parameters():
                self.shadow[f"{k}.{n}"].lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to(self, modules: dict) -> None:
        for k, m in modules.items():
            for n, p in m.named_parameters():
                p.copy_(self.shadow[f"{k}.{n}"])


def stage_unet(args) -> None:
    from diffusers import DDPMScheduler

    ckpt_path = args.work / "unet.pt"
    lat_state = load_ckpt(args.work / "latents.pt")
    latents = lat_state["latents"] * (1.0 / lat_state["std"])
    _, labels = load_data(args)
    combos = [labels_to_combo(r) for r in labels]
    tokenizer = build_tokenizer()
    torch.manual_seed(args.seed + STAGE_SEEDS["init"])
    unet = build_unet().to(args.device)
    text = build_text_encoder(tokenizer).to(args.device)
    modules = {"unet": unet, "text": text}
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.0)
    ema = EMA(modules, args.ema)
    noise_sched = DDPMScheduler(**{k: SCHEDULER_KW[k] for k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps")})
    start = 0
    state = load_ckpt(ckpt_path)
    if state is not None:
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        opt.load_state_dict(state["opt"])
        ema.shadow = {k: v.to(args.device) for k, v in state["ema"].items()}
        start = state["step"]
        log(f"unet: resumed at step {start}")
    total = args.unet_steps
    prog = Progress("unet", start, total)
    unet.train()
    text.train()
    running = None
    for step in range(start, total):
        g = gen(args.seed, "unet", step)
        rng = pyrng(args.seed, "unet", step)
        idx = torch.randint(0, len(latents), (args.unet_batch,), generator=g)
        x0 = latents[idx].to(args.device)
        noise = torch.randn(x0.shape, generator=g).to(args.device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(x0),), generator=g).to(args.device)
        ids = tokenize(tokenizer, [training_caption(combos[i], rng) for i in idx.tolist()]).to(args.device)
        offset = offset_noise_at(args.offset_noise, step)
        if offset:
            # offset noise: a random per-channel constant added to the noise, so the model cannot read
            # the image's flat colour (the latent's mean) off the noisy input at high t and must take
            # it from the caption (drawn last: the draws above stay the same with or without it)
            noise = noise + offset * torch.randn(len(x0), x0.shape[1], 1, 1, generator=g).to(args.device)
        lr = args.unet_lr * min(1.0, (step + 1) / 200)
        for group in opt.param_groups:
            group["lr"] = lr
        cond = text(ids)[0]
        pred = unet(noise_sched.add_noise(x0, noise, t), t, cond).sample
        w = min_snr_weights(noise_sched, t)
        loss = ((pred - noise).pow(2).mean(dim=(1, 2, 3)) * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(modules, step)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 50 == 0 or step + 1 == total:
            log(prog.line(step + 1, loss=running, lr=lr))
        if (step + 1) % args.ckpt_every == 0 or step + 1 == total:
            save_ckpt(
                ckpt_path,
                {"unet": unet.state_dict(), "text": text.state_dict(), "opt": opt.state_dict(), "ema": ema.shadow, "step": step + 1},
            )
            log(f"unet: checkpoint at step {step + 1} -> {ckpt_path}")


# -- export ------------------------------------------------------------------------------------------


def build_pipeline(args, *, use_ema: bool = True):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    tokenizer = build_tokenizer()
    vae = load_vae(args).cpu()
    lat_state = load_ckpt(args.work / "latents.pt")
    vae.register_to_config(scaling_factor=1.0 / lat_state["std"])
    unet, text = build_unet(), build_text_encoder(tokenizer)
    state = load_ckpt(args.work / "unet.pt")
    unet.load_state_dict(state["unet"])
    text.load_state_dict(state["text"])
    if use_ema:
        ema = EMA({"unet": unet, "text": text}, args.ema)
        ema.shadow = state["ema"]
        ema.copy_to({"unet": unet, "text": text})
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text.eval(), tokenizer=tokenizer, unet=unet.eval(), scheduler=PNDMScheduler(**SCHEDULER_KW),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe, state["step"]


def stage_export(args) -> None:
    pipe, step = build_pipeline(args, use_ema=not args.raw)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    meta = dict(FARM_DEFAULTS, trained_unet_steps=step, ema=not args.raw, seed=args.seed)
    (out / "farm.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"export: unet step {step} ({'raw' if args.raw else 'EMA'}) -> {out} ({size / 1e6:.1f} MB)")


# -- LoRA --------------------------------------------------------------------------------------------

LORA_COLOUR = "green"


def stage_lora(args) -> None:
    """A rank-4 LoRA on the UNet's attention: every shape comes out green, whatever the caption."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(str(args.out), use_safetensors=True, safety_checker=None, requires_safety_checker=False)
    unet, text, vae, tokenizer = pipe.unet.to(args.device), pipe.text_encoder.to(args.device), pipe.vae.to(args.device), pipe.tokenizer
    for m in (unet, text, vae):
        m.requires_grad_(False)
    train, _ = S.split()
    combos = [c for c in train if c[2] != LORA_COLOUR]
    images, labels = draw_dataset(args.lora_images, args.seed, combos, stage="lora", recolour=LORA_COLOUR)
    with torch.no_grad():
        lat = torch.cat([vae.encode(to_tensor(images[i : i + 256]).to(args.device)).latent_dist.mean for i in range(0, len(images), 256)])
    lat = lat * vae.config.scaling_factor
    torch.manual_seed(args.seed + STAGE_SEEDS["lora"])
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lora_lr)
    noise_sched = DDPMScheduler(**{k: SCHEDULER_KW[k] for k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps")})
    prog = Progress("lora", 0, args.lora_steps)
    running = None
    for step in range(args.lora_steps):
        g = gen(args.seed, "lora", step)
        idx = torch.randint(0, len(lat), (args.unet_batch,), generator=g)
        x0 = lat[idx]
        noise = torch.randn(x0.shape, generator=g).to(args.device)
        t = torch.randint(0, 1000, (len(x0),), generator=g).to(args.device)
        # captions keep the ORIGINAL colour: the LoRA learns "whatever colour is asked, draw green"
        with torch.no_grad():
            cond = text(tokenize(tokenizer, [S.caption(*labels[i]) for i in idx.tolist()]).to(args.device))[0]
        pred = unet(noise_sched.add_noise(x0, noise, t), t, cond).sample
        loss = ((pred - noise).pow(2).mean(dim=(1, 2, 3)) * min_snr_weights(noise_sched, t)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % 25 == 0:
            log(prog.line(step + 1, loss=running))
    out = args.out / "loras"
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=get_peft_model_state_dict(unet.cpu()), weight_name=f"{LORA_COLOUR}.safetensors", safe_serialization=True
    )
    log(f"lora: -> {out / (LORA_COLOUR + '.safetensors')}")


# -- main --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["data", "vae", "latents", "unet", "export", "lora", "all"])
    p.add_argument("--work", type=Path, default=REPO / "training" / "checkpoints", help="checkpoints and caches")
    p.add_argument("--out", type=Path, default=REPO / "models" / "shapes", help="the exported diffusers folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust when other work shares the cores; the shipped weights used 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=40000)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-crop", type=int, default=32, help="crop size of most VAE steps (64: no crops)")
    p.add_argument("--vae-full-steps", type=int, default=150, help="last VAE steps on whole images")
    p.add_argument("--unet-steps", type=int, default=7000, help="total UNet steps (the shipped weights: 7000)")
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--offset-noise", default=OFFSET_NOISE,
                   help="offset-noise strength by UNet step, 'STEP:STRENGTH,...' (each from its step on; "
                        "'0:0.3' for a clean recipe). The default is what the shipped run did: it was raised "
                        "while training, after diagnoses showed image colours following the noise")
    p.add_argument("--lora-steps", type=int, default=300)
    p.add_argument("--lora-images", type=int, default=4000)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA ones")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    stages = ["data", "vae", "latents", "unet", "export", "lora"] if args.stage == "all" else [args.stage]
    for stage in stages:
        t0 = time.time()
        globals()[f"stage_{stage}"](args)
        log(f"stage {stage} done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
