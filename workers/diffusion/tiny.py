"""A tiny, random Stable-Diffusion-v1-architecture pipeline, built locally with no download.

It is the farm's default model (``builtin:tiny``): every component has the real SD1.x layout
(UNet2DConditionModel with cross-attention, a 4-block AutoencoderKL with scale factor 8, a CLIP
text encoder and tokenizer, SD1.5's PNDM scheduler config), so the whole render path runs end to
end on a CPU in about a second, but the weights are random, so the images are noise.

Why each choice (see /work/shared/STACK-FACTS.md):

* The VAE has four blocks, so its scale factor is 8 like real SD. diffusers' own 2-block test VAE
  downsamples by 2 only and runs ~25x slower at the same image size.
* The tokenizer is built in memory from a byte-level vocabulary plus merges for a few hundred
  common words. transformers 5 only has the tokenizers-backed ``CLIPTokenizer``; its merges must be
  ``(a, b)`` tuples and ``model_max_length=77`` must be passed or padding overflows.
* ``<|startoftext|>`` and ``<|endoftext|>`` are the last two ids, as in real CLIP, and the text
  config carries the same bos/eos/pad ids, so either of CLIP's pooling modes finds the eos token.
* Everything is saved with ``safe_serialization=True``: the farm never unpickles weights.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from farm.request.schedulers import SD1_PNDM_CONFIG

#: Words that become single tokens (on top of the 512 byte-level tokens every text can fall back on).
_WORDS = """
a an the of and with in on at by for from to under over near behind above below beside
photo photograph painting drawing sketch illustration render portrait landscape closeup
cat dog bird fish horse cow sheep lion tiger bear fox wolf rabbit mouse owl duck
man woman boy girl child person people face eyes hair hand
house castle tower city street road bridge car bus train ship boat plane bike
tree forest flower flowers grass garden field mountain mountains hill river lake sea ocean beach
sky cloud clouds sun moon star stars night day sunset sunrise rain snow fog storm fire water
red orange yellow green blue purple pink brown black white gray grey gold silver
circle square triangle diamond star shape shapes small large big tiny huge
old new young beautiful cute dark bright light colorful detailed simple realistic
high quality best masterpiece highly detailed sharp focus hd art style digital oil
cinematic lighting studio background foreground wearing holding sitting standing running
""".split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (what ByteLevel pre-tokenizes to)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges the way the tokenizer does: always the lowest-ranked adjacent pair first."""
    pieces = pieces[:]
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def build_vocab(words) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style byte-level BPE vocabulary in which each of ``words`` is a single token."""
    byte_chars = list(_bytes_to_unicode().values())
    tokens: list[str] = byte_chars + [c + "</w>" for c in byte_chars]
    seen = set(tokens)
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(words):  # ordered and without duplicates
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        current = pieces[0]
        for piece in pieces[1:]:
            ranks.setdefault((current, piece), len(ranks))
            current += piece
            if current not in seen:
                seen.add(current)
                tokens.append(current)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, list(ranks)


def tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return a CLIP-style BPE vocabulary and merges: all bytes (plain and ``</w>``) plus ``_WORDS``.

    Each word is first split by the merges learnt so far, then new merges join its pieces left to
    right, so every word in ``_WORDS`` becomes one token and earlier words stay one token. Any other
    text still tokenizes (at worst byte by byte). The special tokens come last so that
    ``<|endoftext|>`` has the highest id, as in real CLIP.
    """
    return build_vocab(_WORDS)


def _build_pipeline(seed: int, in_channels: int = 4):
    """Construct the random pipeline in memory (imports the heavy libraries only when called)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = tiny_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    text_hidden = 32

    # fork_rng: building the model must not disturb the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,  # 8 latent px * vae factor 8 = 64 px default image
            in_channels=in_channels,  # 9: the sd-v1-5-inpainting layout (latents + mask + masked image)
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=text_hidden,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 32, 64, 64),  # 4 blocks -> scale factor 2**3 = 8
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=16,
            sample_size=64,
        )
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=text_hidden,
                intermediate_size=37,
                projection_dim=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                layer_norm_eps=1e-5,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        # A trained CLIP's final layer norm has a bias, so its hidden states have a mean that prompt
        # emphasis can restore; a fresh one (bias 0) makes every token's mean exactly 0.
        norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
        torch.nn.init.normal_(norm.bias, mean=0.3, std=0.5)
    scheduler = PNDMScheduler(**SD1_PNDM_CONFIG)  # exactly as SD1.5 ships it
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def is_complete(path: Path) -> bool:
    """True when ``path`` holds a finished pipeline (the atomic rename puts model_index.json last)."""
    return (path / "model_index.json").is_file()


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` so concurrent builders take turns."""
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def make_tiny(path: Path, *, seed: int = 0, in_channels: int = 4) -> Path:
    """Write the tiny random SD1.x pipeline to ``path`` (diffusers format, safetensors only).

    Returns ``path``. If it already holds a complete model it is returned untouched. Otherwise the
    pipeline is built in a temporary folder next to ``path`` and renamed into place, so readers never
    see a half-written model; an exclusive lock on ``path.with_suffix('.lock')`` makes concurrent
    builders (several workers starting at once) build it once. Same ``seed`` -> bit-identical weights.
    ``in_channels=9`` builds an inpainting model (the sd-v1-5-inpainting UNet layout).
    """
    path = Path(path)
    if is_complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_suffix(".lock")):
        if is_complete(path):  # another process finished it while we waited for the lock
            return path
        if path.exists():
            if not path.is_dir() or any(path.iterdir()):
                raise FileExistsError(
                    f"{path} exists but holds no model_index.json; refusing to overwrite it "
                    "(remove it to let the tiny model be built there)"
                )
            path.rmdir()
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
        try:
            _build_pipeline(seed, in_channels).save_pretrained(tmp, safe_serialization=True)
            tmp.chmod(0o755)  # mkdtemp makes it 0700; other users' workers may share the folder
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


def export_ldm(folder: Path, file: Path, *, dtype=None, ema: bool = False) -> Path:
    """Write the diffusers pipeline in ``folder`` (e.g. :func:`make_tiny`'s) as ONE LDM-layout
    ``.safetensors`` checkpoint at ``file`` (what A1111 loads; keys mapped by
    :func:`workers.diffusion.single_file.diffusers_to_ldm`). ``dtype``: cast (e.g. ``torch.float16``);
    ``ema``: also write ``model_ema.*`` copies of the UNet weights, as full training checkpoints do."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from workers.diffusion.single_file import diffusers_to_ldm

    folder, file = Path(folder), Path(file)
    unet = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    vae = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    text = load_file(str(folder / "text_encoder" / "model.safetensors"))
    layers = json.loads((folder / "unet" / "config.json").read_text())["layers_per_block"]
    state = diffusers_to_ldm(unet, vae, text, layers_per_block=layers)
    if ema:
        state.update({f"model_ema.{k[len('model.diffusion_model.'):].replace('.', '')}": v.clone()
                      for k, v in state.items() if k.startswith("model.diffusion_model.")})
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    state = {k: v.contiguous() for k, v in state.items()}
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(file), metadata={"format": "pt"})
    return file
