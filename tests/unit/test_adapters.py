"""workers.lora.adapters: LoRAs as named adapters on the tiny model (CPU, offline).

Correctness (issue 4, section 5): a render with LoRAs active equals a render from a pipeline whose
UNet weights were merged by hand (W' = W + w * alpha/rank * B @ A) within 1/255, and switching the
LoRAs off gives back the never-LoRA'd image bit for bit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from farm.settings import BUILTIN_TINY
from workers.lora.adapters import AdapterSet, adapter_name
from workers.lora.disk_cache import LoraError
from workers.diffusion.pipeline import LoadedModel, load_pipeline
from evaluation.tiny_lora import make_tiny_lora, read_tiny_lora

STEPS = 3
TOL = 1 / 255  # images are float in [0, 1] (output_type="np")


def _render(pipe) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(0)
    out = pipe(
        "a photo of a cat", height=64, width=64, num_inference_steps=STEPS, generator=generator, output_type="np"
    )
    return out.images[0]


class Env:
    """The pipeline under test, a second copy for hand merges, the base image and LoRA files."""

    def __init__(self, tmp: Path):
        models = tmp / "models"
        self.model: LoadedModel = load_pipeline("tiny", BUILTIN_TINY, models_dir=models, device="cpu")
        self.pipe = self.model.pipe
        self.base = _render(self.pipe)  # before any LoRA was ever loaded into it
        self.ref = load_pipeline("tiny", BUILTIN_TINY, models_dir=models, device="cpu").pipe
        self.ref_state = {k: v.clone() for k, v in self.ref.unet.state_dict().items()}
        self.loras: dict[str, tuple[str, Path]] = {}  # label -> (sha-like id, file)
        for label, kwargs in {
            "a": {"seed": 1},
            "b": {"seed": 2, "layout": "kohya", "alpha": 2.0},
            "c": {"seed": 3, "alpha": 8.0},
            "d": {"seed": 4, "layout": "kohya", "scale": 0.5},
        }.items():
            file = make_tiny_lora(self.model.path, tmp / f"{label}.safetensors", **kwargs)
            self.loras[label] = (hashlib.sha256(file.read_bytes()).hexdigest(), file)

    def job(self, *pairs: tuple[str, float]) -> list[tuple[str, Path, float]]:
        return [(self.loras[label][0], self.loras[label][1], weight) for label, weight in pairs]

    def merged(self, *pairs: tuple[str, float]) -> np.ndarray:
        """Render from the reference pipeline with the LoRAs merged into its UNet weights by hand."""
        state = {k: v.clone() for k, v in self.ref_state.items()}
        for label, weight in pairs:
            for module, (down, up, scale) in read_tiny_lora(self.loras[label][1], self.model.path).items():
                state[f"{module}.weight"] += weight * scale * (up @ down)
        self.ref.unet.load_state_dict(state)
        try:
            return _render(self.ref)
        finally:
            self.ref.unet.load_state_dict(self.ref_state)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    # One thread: these machines share 2 cores with other work, and an oversubscribed torch
    # runs these tiny renders ~50x slower (3-9 s instead of 0.06 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield Env(tmp_path_factory.mktemp("adapters"))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def adapters(env: Env) -> Iterator[AdapterSet]:
    """A fresh AdapterSet; every adapter is deleted afterwards so tests do not see each other's."""
    adapter_set = AdapterSet(env.model, max_loaded=3)
    yield adapter_set
    adapter_set.clear()
    env.pipe.enable_lora()


@pytest.fixture
def load_calls(env: Env, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Adapter names passed to load_lora_weights during the test."""
    calls: list[str] = []
    cls = type(env.pipe)
    original = cls.load_lora_weights

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("adapter_name"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "load_lora_weights", counting)
    return calls


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def test_reference_pipeline_matches_base(env: Env) -> None:
    assert np.array_equal(_render(env.ref), env.base)


@pytest.mark.parametrize(
    ("label", "weight"),
    [("a", 0.7), ("b", 1.0), ("c", -0.6), ("d", 1.5)],
    ids=["diffusers", "kohya-alpha2", "diffusers-alpha8", "kohya-scale0.5"],
)
def test_lora_equals_hand_merge(env: Env, adapters: AdapterSet, label: str, weight: float) -> None:
    served = adapters.activate(env.job((label, weight)))
    assert served == {env.loras[label][0]: "loaded"}
    image = _render(env.pipe)
    assert _diff(image, env.base) > 5 / 255, "the test LoRA must visibly change the image"
    assert _diff(image, env.merged((label, weight))) <= TOL


def test_both_layouts_target_the_same_modules(env: Env) -> None:
    diffusers = read_tiny_lora(env.loras["a"][1], env.model.path)
    kohya = read_tiny_lora(env.loras["b"][1], env.model.path)
    assert set(diffusers) == set(kohya) and len(diffusers) == 48
    assert {scale for _, _, scale in kohya.values()} == {0.5}  # alpha 2 / rank 4
    assert {scale for _, _, scale in diffusers.values()} == {1.0}
    assert all(bool(up.abs().sum() > 0) for _, up, _ in diffusers.values())  # non-zero lora_B


def test_two_loras_equal_their_merged_sum(env: Env, adapters: AdapterSet) -> None:
    adapters.activate(env.job(("a", 0.6), ("b", 0.8)))
    image = _render(env.pipe)
    assert _diff(image, env.merged(("a", 0.6), ("b", 0.8))) <= TOL
    assert _diff(image, env.merged(("a", 0.6))) > 2 / 255  # both really count


def test_disable_restores_base_exactly_and_reenables(env: Env, adapters: AdapterSet, load_calls: list) -> None:
    adapters.activate(env.job(("a", 0.7)))
    with_lora = _render(env.pipe)
    assert adapters.activate([]) == {}
    assert np.array_equal(_render(env.pipe), env.base)  # bit-identical to the never-LoRA'd render
    assert adapters.loaded() == [env.loras["a"][0]]  # still loaded for later jobs
    assert adapters.activate(env.job(("a", 0.7))) == {env.loras["a"][0]: "cache"}
    assert np.array_equal(_render(env.pipe), with_lora)
    # A LoRA loaded while LoRAs are disabled renders right too.
    adapters.activate([])
    adapters.activate(env.job(("c", 0.5)))
    assert _diff(_render(env.pipe), env.merged(("c", 0.5))) <= TOL
    assert load_calls == [adapter_name(env.loras["a"][0]), adapter_name(env.loras["c"][0])]


def test_weight_zero_equals_base(env: Env, adapters: AdapterSet) -> None:
    adapters.activate(env.job(("a", 0.0)))
    assert _diff(_render(env.pipe), env.base) <= TOL


def test_switching_loaded_adapters_does_not_reload(env: Env, adapters: AdapterSet, load_calls: list) -> None:
    a, b, c = (env.loras[x][0] for x in "abc")
    assert adapters.activate(env.job(("a", 1.0))) == {a: "loaded"}
    assert adapters.activate(env.job(("b", 1.0))) == {b: "loaded"}
    assert adapters.activate(env.job(("a", 0.5), ("c", 1.0))) == {a: "cache", c: "loaded"}
    assert adapters.activate(env.job(("b", 1.0))) == {b: "cache"}
    assert adapters.activate(env.job(("c", 1.0), ("a", 0.5), ("b", 0.2))) == {c: "cache", a: "cache", b: "cache"}
    assert len(load_calls) == 3
    adapters.activate(env.job(("b", 1.0)))
    assert _diff(_render(env.pipe), env.merged(("b", 1.0))) <= TOL  # the switch really switched


def test_past_max_loaded_the_lru_adapter_is_unloaded(env: Env, adapters: AdapterSet, load_calls: list) -> None:
    a, b, c, d = (env.loras[x][0] for x in "abcd")
    adapters.activate(env.job(("a", 1.0)))
    adapters.activate(env.job(("b", 1.0)))
    adapters.activate(env.job(("c", 1.0)))
    adapters.activate(env.job(("a", 1.0)))  # a becomes the most recent; b is now the LRU
    assert adapters.loaded() == [b, c, a]
    assert adapters.activate(env.job(("d", 1.0))) == {d: "loaded"}
    assert adapters.loaded() == [c, a, d]
    present = set(env.pipe.get_list_adapters().get("unet", []))
    assert present == {adapter_name(x) for x in (c, a, d)}
    # A job's own LoRAs are never the ones evicted, even when they are the least recent.
    assert adapters.activate(env.job(("c", 1.0), ("b", 1.0), ("a", 1.0))) == {c: "cache", b: "loaded", a: "cache"}
    assert adapters.loaded() == [c, b, a]
    assert len(load_calls) == 5
    with pytest.raises(LoraError, match="at most 3"):
        adapters.activate(env.job(("a", 1.0), ("b", 1.0), ("c", 1.0), ("d", 1.0)))


def test_a_lora_for_another_model_is_refused_cleanly(env: Env, adapters: AdapterSet, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"  # shapes of a bigger model (SD1.5's 320 channels)
    module = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file(
        {f"{module}.lora_A.weight": torch.ones(4, 320), f"{module}.lora_B.weight": torch.ones(320, 4)}, str(wrong)
    )
    adapters.activate(env.job(("a", 0.7)))
    with pytest.raises(LoraError, match="cannot load LoRA"):
        adapters.activate([("f" * 64, wrong, 1.0)])
    assert adapters.loaded() == [env.loras["a"][0]]
    assert adapter_name("f" * 64) not in set(env.pipe.get_list_adapters().get("unet", []))
    adapters.activate(env.job(("a", 0.7)))
    assert _diff(_render(env.pipe), env.merged(("a", 0.7))) <= TOL


def test_bad_requests(env: Env, adapters: AdapterSet) -> None:
    with pytest.raises(ValueError, match="twice"):
        adapters.activate(env.job(("a", 1.0), ("a", 0.5)))
    with pytest.raises(ValueError, match="finite"):
        adapters.activate(env.job(("a", float("nan"))))
    with pytest.raises(ValueError):
        AdapterSet(env.pipe, max_loaded=0)
