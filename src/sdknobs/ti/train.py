"""`sdknobs train-ti`: textual inversion as a Method of the shared trainer.

Trainable: the text encoder's whole token-embedding matrix E' = [E; e_new] [V + N, D] (one tensor, as
diffusers' textual_inversion.py trains it); every other weight is frozen. Per step the loss is the
shared diffusion loss with the caption's text encoding c = TextEncoder(ids(caption with <t>)):

    L = || eps_theta(x_t, t, c) - eps ||^2,   dL/dE[i] != 0 for every row i whose token is in the batch

Autograd gives a gradient to every row used by the captions (their words, BOS, EOS/padding), not only
to the new rows; AdamW would also decay all rows. So after every optimizer step `RowGuard.restore`
copies rows 0..V-1 back from a copy taken at setup: only e_new ever changes, and at the end every
model weight is bit-identical to the base model's.

SDXL: the token gets new rows in BOTH tables (CLIP-L's and OpenCLIP bigG's, the same names in both tokenizers),
both matrices are trainable and both guarded, so the two row sets learn together from the one loss (the U-Net
sees both encoders' hidden states, and the second's pooled output); the file holds clip_l and clip_g.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sdknobs.errors import SdknobsError
from sdknobs.ti.files import FORMATS, default_filename, save_embedding
from sdknobs.ti.tokens import (MAX_VECTORS, RowGuard, add_pseudo_tokens_all, check_token, encoders, initial_vectors,
                               vector_names)
from sdknobs.training.trainer import Method, TrainConfig, _f

# Caption templates of diffusers' textual_inversion.py (imagenet_templates_small / imagenet_style_templates_small).
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
)
TEMPLATES = ("object", "style", "captions")


@dataclass
class TITrainConfig(TrainConfig):
    """train-ti: the shared training options plus the token's."""

    METHOD = "ti"  # (not a field) the "training" section of sdknobs.json these defaults come from
    learning_rate: float | None = _f(None, "AdamW peak learning rate (TI moves a few vectors: far higher than LoRA's; "
                                           "diffusers' example, 5e-4 scaled by batch x accumulation 16, is 8e-3)",
                                     type=float, fallback=5e-3)
    token: str = _f("", "the new word, e.g. '<my-shape>' (lowercase, not in the vocabulary yet)", required=True)
    init_word: str = _f("", "start from this word's vector (must be one token), e.g. 'shape'")
    init: str = _f("word", "word (start from --init-word) or random (vocabulary mean + std noise)")
    vectors: int = _f(1, f"vectors (new rows) for the token, 1-{MAX_VECTORS}; <t> expands to <t> <t>_1 ... in prompts")
    template: str = _f("object", "captions from templates: object ('a photo of a {}'), style ('a painting in the "
                                 "style of {}'), or captions (the dataset's own, with --caption-word replaced by the token)")
    caption_word: str = _f("", "with --template captions: the word in the dataset's captions that the token replaces")
    format: str = _f("diffusers", f"file format: {', '.join(FORMATS)} (diffusers: learned_embeds.safetensors "
                                  f"{{token: [N, D]}}; kohya: emb_params; a1111: .pt with string_to_param)")

    def __post_init__(self):
        if self.format not in FORMATS:
            raise SdknobsError(f"--format {self.format!r} is not known; choose one of {', '.join(FORMATS)}")
        if not self.token:
            raise SdknobsError("--token is required: the new word, e.g. '<my-shape>'")
        if not self.out:  # default: out/ti-<name>/<the format's file name>
            stem = re.sub(r"[^a-z0-9_-]+", "", self.token.lower()) or "token"
            self.out = str(Path("out") / f"ti-{stem}" / default_filename(self.token, self.format))
        if self.init not in ("word", "random"):
            raise SdknobsError(f"--init {self.init!r} is not known; choose word or random")
        if self.init == "word" and not self.init_word:
            raise SdknobsError("--init-word is required with --init word (e.g. --init-word shape), or pass --init random")
        if not 1 <= self.vectors <= MAX_VECTORS:
            raise SdknobsError(f"--vectors must be between 1 and {MAX_VECTORS}, got {self.vectors}")
        if self.template not in TEMPLATES:
            raise SdknobsError(f"--template {self.template!r} is not known; choose one of {', '.join(TEMPLATES)}")
        want = ".pt" if self.format == "a1111" else ".safetensors"
        if Path(self.out).suffix != want:
            raise SdknobsError(f"--out {self.out!r}: format {self.format} is written as a {want} file")
        super().__post_init__()


class TIMethod(Method):
    """New token rows in the embedding matrix; everything else restored after each step."""

    name = "ti"

    def __init__(self, cfg: TITrainConfig):
        self.cfg = cfg
        self.needs_captions = cfg.template == "captions"
        self.guard: RowGuard | None = None  # the first (or only) table's; `guards`: one per text encoder
        self.guards: list[RowGuard] = []
        self.names = vector_names(cfg.token, cfg.vectors)
        self.ids: list[int] = []  # rows in the first table; `ids_by_encoder` per table
        self.ids_by_encoder: list[list[int]] = []
        self.init_vectors: torch.Tensor | None = None
        self.record_moved = False
        self.moved_rows: list[int] = []
        self.moved_rows_by_encoder: list[list[int]] = []

    # --- Method interface ---
    def setup(self, model) -> None:
        cfg = self.cfg
        encs = encoders(model)
        if len(encs) > 1 and cfg.format == "a1111":
            raise SdknobsError("--format a1111: an SDXL embedding is a .safetensors file with clip_l and clip_g (what "
                               "A1111, ComfyUI and kohya read for SDXL); use --format kohya or diffusers")
        for tok, _ in encs:
            check_token(tok, cfg.token, cfg.vectors)
        inits = [initial_vectors(model, cfg.vectors, cfg.init, cfg.init_word, cfg.seed, encoder=i) for i in range(len(encs))]
        self.init_vectors = inits[0]
        self.ids_by_encoder = add_pseudo_tokens_all(model, cfg.token, inits)
        self.ids = self.ids_by_encoder[0]
        self.guards = [RowGuard(enc.get_input_embeddings().weight, ids) for (_, enc), ids in zip(encs, self.ids_by_encoder)]
        self.guard = self.guards[0]

    def parameters(self):
        return [g.weight for g in self.guards]

    def caption(self, text: str, example) -> str:
        cfg, tok = self.cfg, self.cfg.token
        if cfg.template == "captions":
            if tok in text.lower():
                return text
            if cfg.caption_word and re.search(rf"\b{re.escape(cfg.caption_word)}\b", text, re.IGNORECASE):
                return re.sub(rf"\b{re.escape(cfg.caption_word)}\b", tok, text, flags=re.IGNORECASE)
            return f"{tok}, {text}" if text else tok
        templates = OBJECT_TEMPLATES if cfg.template == "object" else STYLE_TEMPLATES
        # the trainer reseeds the global torch RNG from (seed, step) before every step: resumable choice
        return templates[int(torch.randint(len(templates), (1,)))].format(tok)

    def encode_text(self, model, captions):
        from sdknobs.text import embed_text

        emb, _ = embed_text(model, captions, warn=False)  # expands <t> -> <t> <t>_1 ..., keeps autograd
        return emb

    def encode(self, model, captions):
        """(hidden states, pooled output or None) with autograd: the gradient reaches the new rows of every table."""
        if len(self.guards) < 2:
            return self.encode_text(model, captions), None
        from sdknobs.text import embed_text_pooled

        hidden, pooled, _ = embed_text_pooled(model, captions, warn=False)
        return hidden, pooled

    def after_optimizer_step(self) -> None:
        if self.record_moved:  # for trace-step: which rows the optimizer step moved, before the restore
            self.moved_rows_by_encoder = [g.changed_rows() for g in self.guards]
            self.moved_rows = self.moved_rows_by_encoder[0]
        for g in self.guards:
            g.restore()  # E[i] <- E_orig[i] for every row i not in the token's ids, in each table

    def vectors(self) -> torch.Tensor:
        return self.guard.trained()

    def all_vectors(self) -> list[torch.Tensor]:
        """The trained rows of each table (SDXL: [clip_l, clip_g])."""
        return [g.trained() for g in self.guards]

    def state_dict(self):
        keys = ("vectors", "vectors_2")
        return {k: v for k, v in zip(keys, self.all_vectors())}

    def load_state_dict(self, sd):
        for key, g in zip(("vectors", "vectors_2"), self.guards):
            v = sd.get(key)
            want = (len(g.ids), g.weight.shape[1])
            if v is None or tuple(v.shape) != want:
                raise SdknobsError(f"checkpoint {key} are {None if v is None else tuple(v.shape)}, expected {want}")
            with torch.no_grad():
                g.weight[g.ids] = v.to(g.weight)

    def metadata(self) -> dict:
        c = self.cfg
        return {"token": c.token, "vectors": c.vectors, "init": c.init, "init_word": c.init_word if c.init == "word" else "",
                "template": c.template, "text_width": " ".join(str(g.weight.shape[1]) for g in self.guards)}

    def save(self, model, path, metadata):
        v = self.all_vectors()
        return save_embedding(path, self.cfg.token, v[0], format=self.cfg.format, metadata=metadata,
                              vectors_2=v[1] if len(v) > 1 else None)


def train_ti(cfg: TITrainConfig, model=None, *, log=print):
    """Load the base model (fp32) unless given, train the token, write the file; returns the TrainResult."""
    from sdknobs.training.trainer import accelerator_from_env, load_for_training, train

    model = model if model is not None else load_for_training(cfg)
    method = TIMethod(cfg)
    return train(model, method, cfg, accelerator=accelerator_from_env(cfg), log=log), method
