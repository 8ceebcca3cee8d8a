"""The worker's prompt-embedding cache (``workers.diffusion.prompts.PromptCache``): text-encoding time
per batch with and without it, on a campaign-like stream of batches that repeat prompts (a seed
sweep renders each prompt several times; every batch shares one negative prompt).

    python bench/prompt_cache.py [--batches 60] [--batch-size 4] [--prompts 12] [--encoder tiny|sd1]

``--encoder tiny``: the tiny random model's text encoder (2 layers, width 32) and tokenizer;
``--encoder sd1``: a random text encoder of SD1.x's size (CLIP ViT-L/14: 12 layers, width 768,
123 M parameters) with the real CLIP tokenizer, fp32 on the CPU. Both passes encode the same
batches; the cached pass's tensors are checked against the uncached ones. No download.

Prints, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from workers.diffusion.prompts import PromptCache, encode_prompts  # noqa: E402

SUBJECTS = ["a red circle", "a green square", "a blue cross", "a yellow star", "an old castle", "a cat", "a ship",
            "a forest", "a portrait of a woman", "a city at night", "a mountain lake", "a bowl of fruit"]
STYLE = ", (masterpiece:1.2), best quality, highly detailed, sharp focus, dramatic lighting, [blurry]"
NEGATIVE = "lowres, bad anatomy, bad hands, text, error, missing fingers, (worst quality:1.4), jpeg artifacts, blurry"


def _pipe(kind: str):
    if kind == "tiny":
        from workers.diffusion.pipeline import load_pipeline

        models = Path(tempfile.mkdtemp(prefix="bench-prompt-cache-"))
        return load_pipeline("tiny", "builtin:tiny", models_dir=models, device="cpu").pipe
    from transformers import CLIPTextConfig, CLIPTextModel

    from workers.diffusion.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407,
    )
    encoder = CLIPTextModel(config).eval()
    return SimpleNamespace(tokenizer=clip_tokenizer(), text_encoder=encoder)


def _batches(n: int, size: int, prompts: int, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    texts = [subject + STYLE for subject in SUBJECTS[:prompts]]
    while len(texts) < prompts:
        texts.append(f"{rng.choice(SUBJECTS)} number {len(texts)}{STYLE}")
    return [[rng.choice(texts) for _ in range(size)] for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=12, help="distinct prompts in the stream")
    parser.add_argument("--encoder", choices=("tiny", "sd1"), default="tiny")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = _pipe(args.encoder)
    batches = _batches(args.batches, args.batch_size, args.prompts)
    negatives = [NEGATIVE] * args.batch_size
    encode_prompts(pipe, batches[0], negatives)  # warm up (allocator, tokenizer)

    def run(cache):
        encoder_calls = []
        handle = pipe.text_encoder.register_forward_hook(lambda m, a, o: encoder_calls.append(a[0].shape[0]))
        started = time.perf_counter()
        outputs = [encode_prompts(pipe, batch, negatives, cache=cache) for batch in batches]
        seconds = time.perf_counter() - started
        handle.remove()
        return outputs, seconds, encoder_calls

    plain_out, plain_s, plain_calls = run(None)
    cache = PromptCache()
    cached_out, cached_s, cached_calls = run(cache)
    diff = max(
        max((a[0] - b[0]).abs().max().item(), (a[1] - b[1]).abs().max().item()) for a, b in zip(plain_out, cached_out)
    )
    result = {
        "bench": "prompt_cache",
        "encoder": args.encoder,
        "batches": args.batches,
        "batch_size": args.batch_size,
        "distinct_prompts": args.prompts,
        "windows_per_prompt": len(plain_out[0][0][0]) // 77,
        "threads": args.threads,
        "uncached_ms_per_batch": round(1000 * plain_s / args.batches, 2),
        "cached_ms_per_batch": round(1000 * cached_s / args.batches, 2),
        "speedup": round(plain_s / cached_s, 2),
        "encoder_windows_uncached": sum(plain_calls),
        "encoder_windows_cached": sum(cached_calls),
        "cache_hits": cache.hits,
        "cache_misses": cache.misses,
        "cache_bytes": cache.bytes,
        "max_abs_diff": diff,
        "load_average": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
