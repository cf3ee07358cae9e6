"""Text encoders on disk in the key layout every transformers version loads.

transformers 4.x names CLIPTextModel's weights `text_model.embeddings...`, `text_model.encoder...`;
transformers 5 dropped that level in memory and restores it on save only for a model loaded from a file
that had it (`revert_weight_conversion`): a model built from a config (a tiny test model, a single-file
checkpoint, the shapes model's pretraining) is saved flattened, and transformers 4.x (kohya pins 4.54,
AUTOMATIC1111 4.30) then loads none of its weights, with only a warning. transformers 5 loads both
layouts (its CLIPTextModel mapping removes the prefix on load), so we always write the nested one.
"""
from __future__ import annotations

import json
from pathlib import Path

PREFIX = "text_model."
TOP_LEVEL = ("text_projection.",)  # CLIPTextModelWithProjection keeps its projection beside text_model


def nested(key: str) -> str:
    """The transformers 4.x name of a CLIP text-encoder weight."""
    return key if key.startswith((PREFIX, *TOP_LEVEL)) else PREFIX + key


def save_text_encoder(text_encoder, folder: str | Path) -> Path:
    """`save_pretrained` (config and safetensors), then every weight key in the nested layout."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    text_encoder.save_pretrained(folder, safe_serialization=True)
    index = folder / "model.safetensors.index.json"
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as r:
            keys, meta = list(r.keys()), r.metadata() or {"format": "pt"}
            if all(nested(k) == k for k in keys):
                continue
            tensors = {nested(k): r.get_tensor(k) for k in keys}
        save_file(tensors, str(f), metadata=meta)
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {nested(k): v for k, v in data.get("weight_map", {}).items()}
        index.write_text(json.dumps(data, indent=2, sort_keys=True))
    return folder
