"""The shipped LoRA (models/shapes/loras/green.safetensors) turns shapes green; at weight 0 it is gone."""

from safetensors import safe_open

from evaluation import checks as S


def test_lora_file_is_diffusers_layout():
    path = S.lora_path()
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys), keys[:4]


def test_lora_effect_and_weight_zero(shapes_model):
    result = S.check_lora(shapes_model)
    print(result)
    assert result.passed, str(result)
