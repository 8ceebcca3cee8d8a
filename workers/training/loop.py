"""The LoRA training loop (diffusers + peft), free of the farm's plumbing so it can be driven and
tested alone: :class:`Trainer` loads a diffusers folder, adds LoRA adapters, trains one step at a
time, saves and restores checkpoints as plain tensors + JSON, renders samples and exports the LoRA.

* LoRA (peft ``LoraConfig``, ``lora_alpha = rank``: scale 1) on the UNet's attention projections
  ``to_q``, ``to_k``, ``to_v``, ``to_out.0``; with ``text_encoder`` also on CLIP's ``q_proj``,
  ``k_proj``, ``v_proj``, ``out_proj``. Everything else frozen.
* Loss: MSE between the UNet's prediction and the noise (``epsilon`` models; the velocity for
  ``v_prediction`` ones) at timesteps drawn uniformly from the model's own DDPM schedule (its
  ``scheduler/`` config), on VAE latents (posterior mean × ``scaling_factor``, encoded once).
* AdamW (weight decay 1e-2), gradients clipped to norm 1. On CUDA: fp16 autocast with a gradient
  scaler (weights stay fp32); on CPU: fp32. ``gradient_checkpointing`` trades compute for memory.
* Deterministic: the adapters' initialisation comes from ``seed``, and step *k* draws its batch,
  noise and timesteps from a generator seeded with ``(seed, k)``, so a run resumed from a checkpoint
  (weights, AdamW moments, step, scaler) continues exactly as one that never stopped (on CPU,
  bit-exact; CUDA kernels may differ in the last bits).

Checkpoints never pickle: :meth:`Trainer.checkpoint` returns ``(tensors, meta)``, the trainable
weights (``param.<name>``) and AdamW's state (``optim.<name>.<exp_avg|exp_avg_sq|step>``) as a flat
dict for safetensors, the rest (step, seed, losses, the optimiser's param-group hyper-parameters,
the scaler's state) as JSON.
"""

from __future__ import annotations

import io
import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
WEIGHT_DECAY = 1e-2
CLIP_NORM = 1.0


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step ``step``'s random draws (batch, noise, timesteps)."""
    return torch.Generator("cpu").manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63))


def to_pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """An image as the VAE takes it: RGB, shorter side scaled to ``resolution``, centre crop, [-1, 1]."""
    image = image.convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != (width, height):
        image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return array.permute(2, 0, 1).float().div(127.5).sub(1.0)


class Trainer:
    def __init__(
        self,
        model_path: Path | str,
        *,
        rank: int,
        lr: float,
        batch_size: int,
        resolution: int,
        seed: int,
        text_encoder: bool = False,
        gradient_checkpointing: bool = False,
        offset_noise: float = 0.0,
        min_snr_gamma: float = 0.0,
        device: str = "cpu",
    ):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from peft import LoraConfig
        from transformers import CLIPTextModel, CLIPTokenizer

        path = Path(model_path)
        self.path, self.device, self.seed = path, device, int(seed)
        self.rank, self.lr, self.batch_size, self.resolution = rank, lr, batch_size, resolution
        self.train_text = bool(text_encoder)
        self.offset_noise, self.min_snr_gamma = float(offset_noise), float(min_snr_gamma)
        load = {"use_safetensors": True, "local_files_only": True}
        self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        self.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **load).to(device)
        self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **load).to(device)
        self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **load).to(device)
        self.noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        for module in (self.text_encoder, self.vae, self.unet):
            module.requires_grad_(False)
            module.eval()
        torch.manual_seed(self.seed)  # the adapters' initialisation
        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
        if self.train_text:
            self.text_encoder.add_adapter(
                LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TEXT_TARGETS)
            )
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.train_text:
                self.text_encoder.gradient_checkpointing_enable()
        self.unet.train()
        if self.train_text:
            self.text_encoder.train()
        self.named = [(f"unet.{n}", p) for n, p in self.unet.named_parameters() if p.requires_grad]
        if self.train_text:
            self.named += [(f"text_encoder.{n}", p) for n, p in self.text_encoder.named_parameters() if p.requires_grad]
        for _, parameter in self.named:  # LoRA weights train in fp32 whatever the device
            parameter.data = parameter.data.float()
        self.optimizer = torch.optim.AdamW([p for _, p in self.named], lr=lr, weight_decay=WEIGHT_DECAY)
        self.cuda = str(device).startswith("cuda")
        self.scaler = torch.amp.GradScaler("cuda") if self.cuda else None
        self.step = 0
        self.losses: list[float] = []
        self.latents: torch.Tensor | None = None
        self.captions: list[str] = []
        self._embeddings: dict[str, torch.Tensor] = {}

    # -- data -----------------------------------------------------------------------------------
    @torch.no_grad()
    def set_data(self, images: Sequence[Image.Image], captions: Sequence[str], *, chunk: int = 32) -> None:
        """Encode the dataset once: VAE posterior means × scaling factor (deterministic)."""
        if len(images) != len(captions) or not images:
            raise ValueError(f"{len(images)} images for {len(captions)} captions")
        latents = []
        for start in range(0, len(images), chunk):
            pixels = torch.stack([to_pixels(im, self.resolution) for im in images[start : start + chunk]]).to(self.device)
            latents.append(self.vae.encode(pixels).latent_dist.mean.float().cpu())
        self.latents = torch.cat(latents) * float(self.vae.config.scaling_factor)
        self.captions = list(captions)
        if not self.train_text:  # a frozen encoder: each caption's embedding once
            for caption in dict.fromkeys(self.captions):
                self._embeddings[caption] = self._encode([caption])[0].cpu()

    def _tokens(self, captions: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(
            list(captions), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def _encode(self, captions: Sequence[str]) -> torch.Tensor:
        return self.text_encoder(self._tokens(captions))[0]

    # -- one step -------------------------------------------------------------------------------
    def train_step(self) -> float:
        """One optimiser step (number ``self.step``); returns its loss."""
        if self.latents is None:
            raise RuntimeError("set_data() first")
        g = step_generator(self.seed, self.step)
        index = torch.randint(0, len(self.latents), (self.batch_size,), generator=g)
        x0 = self.latents[index]
        noise = torch.randn(x0.shape, generator=g)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(x0),), generator=g)
        if self.offset_noise:  # a per-image, per-channel constant: the mean colour cannot be read off the noisy input
            noise = noise + self.offset_noise * torch.randn((*x0.shape[:2], 1, 1), generator=g)
        noisy = self.noise_scheduler.add_noise(x0, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(x0, noise, timesteps)
        else:
            target = noise
        captions = [self.captions[i] for i in index.tolist()]
        noisy, target, timesteps = noisy.to(self.device), target.to(self.device), timesteps.to(self.device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.cuda):
            if self.train_text:
                cond = self._encode(captions)
            else:
                cond = torch.stack([self._embeddings[c] for c in captions]).to(self.device)
            pred = self.unet(noisy, timesteps, cond).sample
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        loss = (loss * self._snr_weights(timesteps)).mean()
        self.optimizer.zero_grad(set_to_none=True)
        params = [p for _, p in self.named]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
            self.optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {self.step}: lower the learning rate")
        self.losses.append(value)
        self.step += 1
        return value

    def _snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ loss weights (Hang et al. 2023), or ones when ``min_snr_gamma`` is 0."""
        if not self.min_snr_gamma:
            return torch.ones(len(timesteps), device=timesteps.device)
        alphas = self.noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
        snr = alphas / (1 - alphas)
        weights = torch.clamp(snr, max=self.min_snr_gamma) / snr
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            weights = torch.clamp(snr, max=self.min_snr_gamma) / (snr + 1)
        return weights.float()

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, meta)``: trainable weights and AdamW state flattened; the rest as JSON values."""
        tensors: dict[str, torch.Tensor] = {}
        for name, parameter in self.named:
            tensors[f"param.{name}"] = parameter.detach().cpu().contiguous().clone()
            for key, value in self.optimizer.state.get(parameter, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{name}.{key}"] = value.detach().cpu().contiguous().clone().reshape(value.shape)
        groups = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        meta = {
            "step": self.step, "seed": self.seed, "losses": list(self.losses),
            "param_groups": [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in groups],
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "params": len(self.named),
        }
        return tensors, meta

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Continue from :meth:`checkpoint`'s output."""
        with torch.no_grad():
            for name, parameter in self.named:
                key = f"param.{name}"
                if key not in tensors:
                    raise ValueError(f"checkpoint lacks {key} (another rank, model or text-encoder setting?)")
                if tensors[key].shape != parameter.shape:
                    raise ValueError(f"checkpoint's {key} has shape {list(tensors[key].shape)}, the model's {list(parameter.shape)}")
                parameter.copy_(tensors[key].to(parameter.device))
                state = {}
                for part in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    value = tensors.get(f"optim.{name}.{part}")
                    if value is not None:
                        state[part] = value.clone() if part == "step" else value.to(parameter.device).clone()
                if state:
                    self.optimizer.state[parameter] = state
        for group, saved in zip(self.optimizer.param_groups, meta.get("param_groups", [])):
            for key, value in saved.items():
                group[key] = tuple(value) if isinstance(group.get(key), tuple) else value
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.step = int(meta["step"])
        self.losses = [float(x) for x in meta.get("losses", [])]

    # -- outputs --------------------------------------------------------------------------------
    def lora_bytes(self) -> bytes:
        """The LoRA as diffusers' ``save_lora_weights`` writes it (``unet.….lora_A.weight``; with the text
        encoder ``text_encoder.….lora_A.weight``): what ``farm.loras`` registers and workers load."""
        from diffusers import StableDiffusionPipeline
        from peft.utils import get_peft_model_state_dict

        unet_layers = {k: v.detach().cpu().float().contiguous() for k, v in get_peft_model_state_dict(self.unet).items()}
        text_layers = None
        if self.train_text:
            text_layers = {k: v.detach().cpu().float().contiguous() for k, v in get_peft_model_state_dict(self.text_encoder).items()}
        with tempfile.TemporaryDirectory() as folder:
            StableDiffusionPipeline.save_lora_weights(
                folder, unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers,
                weight_name="lora.safetensors", safe_serialization=True,
            )
            return (Path(folder) / "lora.safetensors").read_bytes()

    @torch.no_grad()
    def samples(self, prompts: Sequence[str], *, steps: int, guidance_scale: float, seed: int = 0) -> list[Image.Image]:
        """Images of ``prompts`` with the adapters as they are now (fixed seeds; the training RNG is untouched)."""
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

        if not prompts:
            return []
        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        self.unet.eval()
        self.text_encoder.eval()
        try:
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.cuda):
                return pipe(
                    list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale,
                    height=self.resolution, width=self.resolution,
                    generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))],
                ).images
        finally:
            self.unet.train()
            if self.train_text:
                self.text_encoder.train()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
