"""The LoRA registry: what is accepted, what is refused and why, and how jobs name LoRAs."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from safetensors.numpy import save_file

from farm import Farm, Settings, ValidationError
from farm.settings import Limits
from workers.diffusion.tiny import make_tiny
from evaluation.tiny_lora import make_tiny_lora


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("m") / "tiny", seed=0)


@pytest.fixture
def farm(tmp_path, tiny):
    with Farm(Settings(data_dir=tmp_path / "data", models={"tiny": str(tiny)}, limits=Limits(max_lora_bytes=2_000_000))) as f:
        yield f


def sd1_lora(path, rank=1):
    """A LoRA shaped for SD1.5's UNet (320-channel attention in the first down block)."""
    module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({
        f"{module}.lora_down.weight": np.zeros((rank, 768), np.float16),
        f"{module}.lora_up.weight": np.zeros((320, rank), np.float16),
        f"{module}.alpha": np.array(1.0, np.float16),
    }, str(path))
    return path


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_both_layouts_register_and_fit_the_tiny_model(farm, tiny, tmp_path, layout):
    file = make_tiny_lora(tiny, tmp_path / f"{layout}.safetensors", seed=1, layout=layout)
    record = farm.add_lora(file, name=f"ink-{layout}")
    assert (record.format, record.base) == (layout, "tiny")
    assert len(record.sha256) == 64 and record.layers > 0
    assert farm.storage.exists(record.storage_key) and record.sha256 in record.storage_key
    assert [r.name for r in farm.list_loras()] == [f"ink-{layout}"]


def test_an_sd15_lora_fits_sd1(farm, tmp_path):
    assert farm.add_lora(sd1_lora(tmp_path / "sd.safetensors"), name="sd-style").base == "sd1"


def test_pickle_files_are_refused_without_being_read(farm, tmp_path):
    path = tmp_path / "style.ckpt"
    path.write_bytes(pickle.dumps({"boom": 1}))
    with pytest.raises(ValidationError, match="pickle"):
        farm.add_lora(path, name="x")
    renamed = tmp_path / "style.safetensors"
    renamed.write_bytes(pickle.dumps({"boom": 1}))
    with pytest.raises(ValidationError, match="pickle|safetensors"):
        farm.add_lora(renamed, name="x")
    assert farm.list_loras() == []


def test_keys_that_match_no_layer_are_refused(farm, tmp_path):
    save_file({
        "lora_unet_nonexistent_block_to_q.lora_down.weight": np.zeros((1, 32), np.float32),
        "lora_unet_nonexistent_block_to_q.lora_up.weight": np.zeros((32, 1), np.float32),
    }, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ValidationError, match="match no layer"):
        farm.add_lora(tmp_path / "odd.safetensors", name="odd")
    save_file({"some.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValidationError, match="no LoRA tensors"):
        farm.add_lora(tmp_path / "plain.safetensors", name="plain")


def test_files_over_the_size_cap_are_refused(farm, tmp_path):
    big = tmp_path / "big.safetensors"
    save_file({"a.lora_down.weight": np.zeros((1000, 1000), np.float32)}, str(big))
    with pytest.raises(ValidationError, match="FARM_LIMITS__MAX_LORA_BYTES"):
        farm.add_lora(big, name="big")


def test_jobs_name_loras_unknown_ones_are_errors_and_sets_never_share_a_batch(farm, tiny, tmp_path):
    a = farm.add_lora(make_tiny_lora(tiny, tmp_path / "a.safetensors", seed=1), name="a")
    b = farm.add_lora(make_tiny_lora(tiny, tmp_path / "b.safetensors", seed=2), name="b")
    with pytest.raises(ValidationError) as caught:
        farm.submit("x", width=64, height=64, loras=[{"name": "nope", "weight": 1}])
    assert caught.value.field == "loras[0]" and "a, b" in str(caught.value)
    assert farm.latest() == []
    job = farm.submit_many([
        {"prompt": "x", "width": 64, "height": 64, "loras": [{"name": "a", "weight": 0.8}]},
        {"prompt": "x", "width": 64, "height": 64, "loras": [{"name": "a", "weight": 0.5}]},
        {"prompt": "x", "width": 64, "height": 64, "loras": [{"sha256": b.sha256, "weight": 0.5}, {"name": "a", "weight": 1}]},
        {"prompt": "x", "width": 64, "height": 64},
    ])
    recorded = [r for r in job.results()]
    with farm.sessions() as session:
        from farm.db.tables import ImageRecord

        tasks = [session.get(ImageRecord, r.id).task_id for r in recorded]
        params = [session.get(ImageRecord, r.id).params["loras"] for r in recorded]
    assert len(set(tasks)) == 4  # four LoRA sets (including none): four batches
    assert params[0] == [[a.sha256, 0.8]] and params[3] == []
    assert sorted(params[2]) == sorted([[a.sha256, 1.0], [b.sha256, 0.5]])
    with pytest.raises(ValidationError, match="weight"):
        farm.submit("x", width=64, height=64, loras=[{"name": "a", "weight": 99}])


def test_names_are_unique_and_removal_keeps_the_file(farm, tiny, tmp_path):
    file = make_tiny_lora(tiny, tmp_path / "a.safetensors", seed=1)
    record = farm.add_lora(file, name="a")
    with pytest.raises(ValidationError, match="taken"):
        farm.add_lora(file, name="a")
    farm.remove_lora("a")
    assert farm.list_loras() == [] and farm.storage.exists(record.storage_key)
