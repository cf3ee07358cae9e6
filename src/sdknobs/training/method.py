"""What LoRA and textual inversion plug into the shared trainer (`trainer.train`): a `Method` says
which weights exist and learn, how captions become text embeddings, and what is restored after each
optimizer step; the trainer owns everything else (data, loss, optimizer, checkpoints, validation)."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from sdknobs.atomic import save_safetensors, write_text
from sdknobs.errors import SdknobsError
from sdknobs.training.data import Example


class Method:
    """What LoRA and textual inversion plug into the trainer. Subclass and override."""

    name = "method"
    needs_captions = True  # False: images without caption files get caption "" (TI captions from templates)

    def setup(self, model) -> None:
        """Attach trainable weights (LoRA layers, new token rows). Called once, after every model weight
        was frozen and before the optimizer is built."""

    def parameters(self) -> list[torch.nn.Parameter]:
        """The only parameters the optimizer sees (or AdamW param-group dicts). Everything else stays frozen."""
        raise NotImplementedError(f"{type(self).__name__}.parameters()")

    def caption(self, text: str, example: Example) -> str:
        """The caption the text encoder sees. Not called for captions dropped by --caption-dropout (they stay "")."""
        return text

    def encode_text(self, model, captions: list[str]) -> torch.Tensor:
        """[B, 77, D]: the text encoder's last hidden state. Gradient flows only when a text-encoder
        parameter is trainable (TI's embedding row); otherwise it runs under no_grad."""
        cache = self.__dict__.setdefault("_token_cache", {})
        tok = model.tokenizer
        new = [c for c in dict.fromkeys(captions) if c not in cache]
        if new:
            ids = tok(new, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            cache.update(zip(new, ids))
        ids = torch.stack([cache[c] for c in captions]).to(model.text_encoder.device)
        trainable = any(p.requires_grad for p in model.text_encoder.parameters())
        with nullcontext() if trainable else torch.no_grad():
            return model.text_encoder(ids)[0]

    def encode(self, model, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the trainer calls: (hidden states [B, 77, D], pooled output [B, P] or None). One-encoder models:
        `encode_text`, no pooled output. SDXL: both encoders' penultimate hidden states concatenated and the
        second's projected pooled output (`text.embed_text_pooled`, as sampling encodes a one-window prompt), with
        gradients only when a text-encoder parameter is trainable."""
        if len(getattr(model, "text_encoders", [model.text_encoder])) == 1:
            return self.encode_text(model, captions), None
        from sdknobs.text import embed_text_pooled

        trainable = any(p.requires_grad for enc in model.text_encoders for p in enc.parameters())
        with nullcontext() if trainable else torch.no_grad():
            hidden, pooled, _ = embed_text_pooled(model, captions, warn=False)
        return hidden, pooled

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step (TI restores the frozen embedding rows here)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__}.state_dict()")

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError(f"{type(self).__name__}.load_state_dict()")

    def save(self, model, path: str | Path, metadata: dict[str, str]) -> Path:
        """Write the final artifact atomically; `metadata` values are strings (safetensors metadata)."""
        return atomic_save_file(self.state_dict(), path, metadata)

    def metadata(self) -> dict:
        return {}


class ParamSubsetMethod(Method):
    """Train existing weights of the model whose names contain one of `patterns`, e.g.
    ParamSubsetMethod(["unet.mid_block"]) (names are prefixed "unet." / "text_encoder.")."""

    name = "subset"

    def __init__(self, patterns):
        self.patterns = list(patterns)
        self.params: dict[str, torch.nn.Parameter] = {}

    def setup(self, model) -> None:
        self.params = {n: p for n, p in _named_parameters(model).items() if any(s in n for s in self.patterns)}
        if not self.params:
            raise SdknobsError(f"no model weight matches {self.patterns}")

    def parameters(self):
        return list(self.params.values())

    def state_dict(self):
        return {n: p.detach() for n, p in self.params.items()}

    def load_state_dict(self, sd):
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(sd[n])


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> Path:
    """safetensors.save_file under a temporary name in the same folder, then rename into place."""
    return save_safetensors(tensors, path, metadata)


def _atomic_write_text(path: Path, text: str) -> None:
    write_text(path, text)


def _named_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {f"{c}.{n}": p for c, m in model.components().items() for n, p in m.named_parameters()}
