"""What a shared file says about itself: text-encoder key layout (transformers 4.x and 5.x), and LoRA
metadata as kohya and ModelSpec define it (architecture ids, model names without local paths)."""
import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdknobs import load_model
from sdknobs.model import EMBEDDED, save_model


def test_text_encoders_saved_in_the_layout_transformers_4_loads(tmp_path):
    """transformers 4.x's CLIPTextModel names every weight text_model.<...> (modeling_clip.py: CLIPTextModel
    holds a CLIPTextTransformer as .text_model); transformers 5 loads that layout too. A model built from a
    config under transformers 5 (no text_model. level in memory) is written with it, same bits."""
    from sdknobs.tiny import build_model

    m = build_model(seed=0)
    save_model(m, tmp_path / "m")
    keys = set(load_file(str(tmp_path / "m" / "text_encoder" / "model.safetensors")))
    mine = {k if k.startswith("text_model.") else "text_model." + k for k in m.text_encoder.state_dict()}
    assert keys == mine
    back = load_model(tmp_path / "m")
    for k, v in m.text_encoder.state_dict().items():
        assert torch.equal(back.text_encoder.state_dict()[k], v), k


def test_shipped_text_encoder_layout():
    with safe_open(str(EMBEDDED["shapes"] / "text_encoder" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 68 and all(k.startswith("text_model.") for k in keys)


def test_lora_metadata_names_and_architecture(tiny_dir, tmp_path):
    from sdknobs.lora.train import LoraTrainConfig, kohya_metadata

    (tmp_path / "data").mkdir()
    cfg = LoraTrainConfig(data_dir=str(tmp_path / "data"), model=str(tiny_dir), text_encoder=True,
                          out=str(tmp_path / "x.safetensors"))
    model = load_model(tiny_dir)
    meta = kohya_metadata(model, cfg, {"base_model": str(tiny_dir), "steps": "3"}, text_encoder=True)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"  # ModelSpec / kohya's sai_model_spec.py
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_sd_model_name"] == meta["sdknobs.base_model"] == tiny_dir.name  # not /tmp/.../tiny
    assert json.loads(meta["ss_network_args"])["text_encoder"] is True and meta["ss_network_train_unet_only"] == "False"
    te_only_by_regex = kohya_metadata(model, cfg, {}, text_encoder=False)
    assert json.loads(te_only_by_regex["ss_network_args"])["text_encoder"] is False
