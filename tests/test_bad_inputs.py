"""Hostile and mistaken inputs on every sampling, model, LoRA-tool, TI-tool and benchmark command.

Each case runs the CLI in-process and must give: the expected exit code (2 = bad input), one line on
stderr with the expected words, no traceback, nothing written and nothing deleted in the working
folder (files, contents and modes compared before and after). Training commands have their own
table in test_bad_inputs_train.py. Placeholders: {d} is the case's folder of fixture files."""
from __future__ import annotations

import hashlib
import os
import shlex
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdknobs.cli import main

P = "a red circle"
G = f'generate --prompt "{P}" --steps 2'
I2I = f'img2img --image {{d}}/img.png --prompt "{P}" --steps 2'
INP = f'inpaint --image {{d}}/img.png --mask {{d}}/mask.png --prompt "{P}" --steps 2'
OUT = f'outpaint --image {{d}}/img.png --prompt "{P}" --steps 2'
SW = f'sweep-strength --image {{d}}/img.png --prompt "{P}" --steps 2'
O = "--out {d}/out/x.png"

# (id, argv, exit code, words the one-line message must contain (lower case))
CASES = [
    # --- numbers: NaN/inf anywhere a float is accepted, ranges, impossible sizes -------------------
    ("guidance-nan", f"{G} --guidance nan {O}", 2, ["--guidance", "finite"]),
    ("guidance-inf", f"{G} --guidance inf {O}", 2, ["--guidance", "finite"]),
    ("guidance-neg-inf", f"{G} --guidance=-inf {O}", 2, ["--guidance", "finite"]),
    ("guidance-negative", f"{G} --guidance -1 {O}", 2, ["--guidance", ">= 0"]),
    ("guidance-word", f"{G} --guidance high {O}", 2, ["--guidance", "not a number"]),
    ("strength-nan", f"{I2I} --strength nan {O}", 2, ["--strength", "finite"]),
    ("strength-above-1", f"{I2I} --strength 1.5 {O}", 2, ["--strength", "[0, 1]"]),
    ("strength-negative", f"{I2I} --strength -0.1 {O}", 2, ["--strength", "[0, 1]"]),
    ("inpaint-strength-inf", f"{INP} --strength inf {O}", 2, ["--strength", "finite"]),
    ("mask-blur-nan", f"{INP} --mask-blur nan {O}", 2, ["--mask-blur", "finite"]),
    ("mask-blur-negative", f"{INP} --mask-blur -2 {O}", 2, ["--mask-blur", ">= 0"]),
    ("outpaint-mask-blur-inf", f"{OUT} --left 8 --mask-blur inf {O}", 2, ["--mask-blur", "finite"]),
    ("outpaint-strength-nan", f"{OUT} --left 8 --strength nan {O}", 2, ["--strength", "finite"]),
    ("sweep-strength-nan", f"{SW} --strengths 0 nan {O}", 2, ["--strengths", "finite"]),
    ("sweep-strength-2", f"{SW} --strengths 0 2 {O}", 2, ["--strength", "[0, 1]"]),
    ("sweep-scale-0", f"{SW} --scale 0 {O}", 2, ["--scale"]),
    ("sweep-seed-huge", f"{SW} --seeds 0 99999999999999999999999 {O}", 2, ["--seed", "18446744073709551615"]),
    ("steps-0", f"{G} --steps 0 {O}", 2, ["--steps", ">= 1"]),
    ("steps-negative", f"{G} --steps -5 {O}", 2, ["--steps"]),
    ("steps-above-scheduler", f'generate --prompt "{P}" --steps 5000 {O}', 2, ["--steps", "1000"]),
    ("steps-1000-ddim-leading", f'generate --prompt "{P}" --steps 1000 {O}', 2, ["--steps", "at most 999"]),
    ("steps-float", f'generate --prompt "{P}" --steps 2.5 {O}', 2, ["--steps", "invalid int"]),
    ("batch-0", f"{G} --batch 0 {O}", 2, ["--batch", "1..1024"]),
    ("batch-negative", f"{G} --batch -1 {O}", 2, ["--batch"]),
    ("seed-too-big", f"{G} --seed 18446744073709551616 {O}", 2, ["--seed", "18446744073709551615"]),
    ("seed-too-small", f"{G} --seed -2 {O}", 2, ["--seed", "-1"]),
    ("seed-word", f"{G} --seed abc {O}", 2, ["--seed", "invalid int"]),
    ("width-not-multiple", f"{G} --width 30 {O}", 2, ["--width", "multiple of 8"]),
    ("height-not-multiple", f"{G} --height 33 {O}", 2, ["--height", "multiple of 8"]),
    ("width-negative", f"{G} --width -32 {O}", 2, ["--width"]),
    ("size-too-big", f"{G} --width 200000 --height 200000 {O}", 2, ["200000x200000", "gib", "free"]),
    ("batch-absurd", f"{G} --batch 100000000 {O}", 2, ["--batch", "1..1024"]),
    ("batch-too-big-for-memory", f"{G} --batch 1024 --width 4096 --height 4096 {O}", 2, ["batch 1024", "gib"]),
    ("outpaint-left-negative", f"{OUT} --left -8 {O}", 2, ["--left", ">= 0"]),
    ("outpaint-overlap-negative", f"{OUT} --left 8 --overlap -1 {O}", 2, ["--overlap", ">= 0"]),
    ("outpaint-overlap-too-big", f"{OUT} --left 8 --overlap 40 {O}", 2, ["--overlap", "32x32"]),
    ("outpaint-overlap-both-sides", f"{OUT} --left 8 --right 8 --overlap 16 {O}", 2, ["--overlap", "half"]),
    ("outpaint-nothing", f"{OUT} {O}", 2, ["nothing to extend"]),
    ("outpaint-odd-extension", f"{OUT} --left 5 {O}", 2, ["multiple of 8"]),
    ("outpaint-fill-unknown", f"{OUT} --left 8 --fill mirror {O}", 2, ["--fill", "mirror"]),
    ("padding-negative", f"{INP} --only-masked --padding -4 {O}", 2, ["--padding", ">= 0"]),
    ("lora-weight-nan", f"{G} --lora {{d}}/lora_ok.safetensors:nan {O}", 2, ["--lora", "weight"]),
    ("lora-weight-inf", f"{G} --lora {{d}}/lora_ok.safetensors:inf {O}", 2, ["--lora", "weight"]),
    ("lora-weight-word", f"{G} --lora {{d}}/lora_ok.safetensors:strong {O}", 2, ["--lora", "weight"]),
    ("lora-window-reversed", f"{G} --lora {{d}}/lora_ok.safetensors@0.8-0.2 {O}", 2, ["window"]),
    ("lora-window-garbage", f"{G} --lora {{d}}/lora_ok.safetensors@0.2-x {O}", 2, ["window"]),
    ("lora-empty", f'{G} --lora "" {O}', 2, ["--lora", "empty"]),
    ("scheduler-unknown", f"{G} --scheduler dpm9000 {O}", 2, ["--scheduler", "dpm9000"]),
    ("dtype-unknown", f"{G} --dtype fp8 {O}", 2, ["--dtype", "fp8"]),
    ("dtype-fp16-cpu", f"{G} --device cpu --dtype fp16 {O}", 2, ["fp16", "cpu"]),
    ("verify-steps-0", "ti verify {d}/emb_ok.safetensors --steps 0", 2, ["--steps"]),
    ("verify-guidance-nan", "ti verify {d}/emb_ok.safetensors --guidance nan", 2, ["--guidance", "finite"]),
    ("nearest-k-0", "ti nearest {d}/emb_ok.safetensors --k 0", 2, ["--k", ">= 1"]),
    ("targets-rank-0", "lora targets --rank 0", 2, ["--rank", ">= 1"]),
    ("targets-rank-negative", "lora targets --rank -3", 2, ["--rank"]),
    ("targets-preset-unknown", "lora targets --preset everything-please", 2, ["everything-please"]),
    ("conflict-top-negative", "lora conflict {d}/lora_ok.safetensors {d}/lora_ok.safetensors --top -1", 2, ["--top"]),
    ("merge-rank-negative", "lora merge {d}/lora_ok.safetensors --out {d}/out/m.safetensors --method svd --rank -1",
     2, ["--rank"]),
    ("merge-svd-no-rank", "lora merge {d}/lora_ok.safetensors --out {d}/out/m.safetensors --method svd", 2, ["--rank"]),
    ("merge-method-unknown", "lora merge {d}/lora_ok.safetensors --out {d}/out/m.safetensors --method average", 2,
     ["--method", "average"]),
    ("merge-format-unknown", "lora merge {d}/lora_ok.safetensors --out {d}/out/m.safetensors --format comfy", 2,
     ["--format", "comfy"]),
    ("merge-weight-nan", "lora merge {d}/lora_ok.safetensors:nan --out {d}/out/m.safetensors", 2, ["weight"]),
    ("merge-window", "lora merge {d}/lora_ok.safetensors@0.5-1 --out {d}/out/m.safetensors", 2, ["window"]),
    ("bench-zero-prompts", "bench quality --n-single 0 --n-two 0", 2, ["--n-single", "no prompts"]),
    ("bench-zero-steps", "bench quality --steps 0", 2, ["--steps", ">= 1"]),
    ("bench-negative-baseline", "bench quality --n-baseline -1", 2, ["--n-baseline"]),
    ("bench-guidance-nan", "bench quality --guidance nan", 2, ["--guidance", "finite"]),
    ("bench-steps-above-scheduler", "bench quality --steps 100000", 2, ["--steps", "1000"]),
    ("verify-steps-above-scheduler", "ti verify {d}/emb_ok.safetensors --steps 5000", 2, ["--steps", "1000"]),
    # --- devices ---------------------------------------------------------------------------------
    ("device-unknown", f"{G} --device tpu {O}", 2, ["--device", "tpu"]),
    ("device-garbage", f"{G} --device 'cuda:x' {O}", 2, ["--device", "cuda:x"]),
    ("device-mps", f"{G} --device mps {O}", 2, ["--device", "mps", "cpu or cuda"]),
    ("device-cuda", f"{G} --device cuda {O}", 2, ["--device", "cuda"]),
    ("device-cuda-7", f"{G} --device cuda:7 {O}", 2, ["--device", "cuda"]),
    ("img2img-device-mps", f"{I2I} --device mps {O}", 2, ["mps"]),
    ("info-device-cuda", "info --device cuda", 2, ["--device", "cuda"]),
    ("info-dtype-unknown", "info --dtype int8", 2, ["--dtype"]),
    ("targets-device-mps", "lora targets --device mps", 2, ["mps"]),
    ("verify-device-cuda", "ti verify {d}/emb_ok.safetensors --device cuda", 2, ["cuda"]),
    ("nearest-device-xla", "ti nearest {d}/emb_ok.safetensors --device xla", 2, ["xla"]),
    ("merge-device-cuda", "lora merge {d}/lora_ok.safetensors --out {d}/out/merged --device cuda", 2, ["cuda"]),
    # --- output paths: existing files, folders, files as parents, suffixes ------------------------
    ("out-exists", f"{G} --out {{d}}/existing.png", 2, ["existing.png", "already exists", "--overwrite"]),
    ("out-exists-batch", f"{G} --batch 2 --out {{d}}/pair.png", 2, ["pair-1.png", "--overwrite"]),
    ("out-is-folder", f"{G} --out {{d}}/sub", 2, ["must end in .png"]),
    ("out-is-folder-png", f"{G} --out {{d}}/folder.png", 2, ["folder.png", "is a folder"]),
    ("out-parent-is-file", f"{G} --out {{d}}/afile/x.png", 2, ["afile", "is a file"]),
    ("out-deep-parent-is-file", f"{G} --out {{d}}/afile/a/b/x.png", 2, ["afile", "is a file"]),
    ("out-folder-read-only", f"{G} --out {{d}}/readonly/x.png", 2, ["readonly", "not writable"]),
    ("out-folder-read-only-deep", f"{G} --out {{d}}/readonly/a/x.png", 2, ["readonly", "not writable"]),
    ("merge-out-read-only", "lora merge {d}/lora_ok.safetensors --out {d}/readonly/m.safetensors", 2, ["not writable"]),
    ("prompt-not-utf8", "generate --prompt \udcff --steps 1 " + O, 2, ["--prompt", "utf-8"]),
    ("out-not-png", f"{G} --out {{d}}/out/x.jpg", 2, ["--out", ".png"]),
    ("out-empty", f'{G} --out ""', 2, ["--out"]),
    ("img2img-out-exists", f"{I2I} --out {{d}}/existing.png", 2, ["already exists"]),
    ("inpaint-out-exists", f"{INP} --out {{d}}/existing.png", 2, ["already exists"]),
    ("outpaint-out-exists", f"{OUT} --left 8 --out {{d}}/existing.png", 2, ["already exists"]),
    ("sweep-out-exists", f"{SW} --out {{d}}/existing.png", 2, ["already exists"]),
    ("sweep-out-not-png", f"{SW} --out {{d}}/out/x.gif", 2, [".png"]),
    ("merge-out-user-folder", "lora merge {d}/lora_ok.safetensors --out {d}/userdir", 2, ["userdir", "not empty"]),
    ("merge-out-user-folder-overwrite", "lora merge {d}/lora_ok.safetensors --out {d}/userdir --overwrite", 2,
     ["userdir", "no model"]),
    ("merge-out-file-exists", "lora merge {d}/lora_ok.safetensors --out {d}/lora_ok.safetensors", 2,
     ["already exists", "--overwrite"]),
    ("merge-out-model-file", "lora merge {d}/lora_ok.safetensors --out {d}/out/model.ckpt", 2, [".safetensors", "folder"]),
    ("merge-out-parent-file", "lora merge {d}/lora_ok.safetensors --out {d}/afile/merged", 2, ["afile", "is a file"]),
    ("merge-out-is-file", "lora merge {d}/lora_ok.safetensors --out {d}/afile", 2, ["afile", "is a file"]),
    ("bench-grid-exists", "bench quality --n-single 1 --n-two 0 --n-baseline 0 --steps 1 --grid {d}/existing.png", 2,
     ["--grid", "already exists"]),
    # --- input images ------------------------------------------------------------------------------
    ("image-missing", f'img2img --image {{d}}/nope.png --prompt "{P}" {O}', 2, ["--image", "nope.png", "no such file"]),
    ("image-folder", f'img2img --image {{d}}/sub --prompt "{P}" {O}', 2, ["--image", "folder"]),
    ("image-garbage", f'img2img --image {{d}}/bad.png --prompt "{P}" {O}', 2, ["--image", "not a readable image"]),
    ("image-empty-file", f'img2img --image {{d}}/empty.png --prompt "{P}" {O}', 2, ["--image", "not a readable image"]),
    ("image-text-file", f'img2img --image {{d}}/notes.txt --prompt "{P}" {O}', 2, ["--image", "not a readable image"]),
    ("image-truncated", f'img2img --image {{d}}/truncated.png --prompt "{P}" {O}', 2, ["--image", "truncated.png"]),
    ("image-huge-file", f'img2img --image {{d}}/huge.png --prompt "{P}" --steps 2 {O}', 2, ["20000x20000", "megapixels"]),
    ("image-too-big-to-sample", f'img2img --image {{d}}/big.png --prompt "{P}" --steps 2 {O}', 2, ["12000x12000", "gib"]),
    ("mask-missing", f'inpaint --image {{d}}/img.png --mask {{d}}/nope.png --prompt "{P}" {O}', 2, ["--mask", "no such"]),
    ("mask-garbage", f'inpaint --image {{d}}/img.png --mask {{d}}/bad.png --prompt "{P}" {O}', 2, ["--mask", "readable"]),
    ("mask-wrong-size", f'inpaint --image {{d}}/img.png --mask {{d}}/mask16.png --prompt "{P}" {O}', 2,
     ["--mask", "16x16", "--resize-mask"]),
    ("outpaint-image-missing", f'outpaint --image {{d}}/nope.png --prompt "{P}" --left 8 {O}', 2, ["--image", "no such"]),
    ("sweep-image-garbage", f'sweep-strength --image {{d}}/bad.png --prompt "{P}" {O}', 2, ["--image", "readable"]),
    ("image-missing-flag", f'img2img --prompt "{P}" {O}', 2, ["--image", "required"]),
    ("prompt-missing", f"generate {O}", 2, ["--prompt", "required"]),
    ("flag-unknown", f"{G} --cfg 7 {O}", 2, ["unrecognized", "--cfg"]),
    ("command-unknown", "paint --prompt x", 2, ["invalid choice", "paint"]),
    # --- models ---------------------------------------------------------------------------------
    ("model-missing", f"{G} --model {{d}}/nomodel {O}", 2, ["--model", "no such"]),
    ("model-unknown-name", f"{G} --model shapes-xxl {O}", 2, ["--model", "shapes-xxl", "embedded"]),
    ("model-empty-folder", f"{G} --model {{d}}/sub {O}", 2, ["missing component"]),
    ("model-bin-folder", f"{G} --model {{d}}/binmodel {O}", 2, ["pickled", "safetensors"]),
    ("model-garbage-file", f"{G} --model {{d}}/bad.safetensors {O}", 2, ["bad.safetensors"]),
    ("model-ckpt-pickle", f"{G} --model {{d}}/model.ckpt {O}", 2, ["model.ckpt"]),
    ("model-text-file", f"{G} --model {{d}}/notes.txt {O}", 2, ["notes.txt"]),
    ("model-a-lora", f"{G} --model {{d}}/lora_ok.safetensors {O}", 2, ["lora_ok.safetensors"]),
    ("info-model-missing", "info --model {d}/nomodel", 2, ["--model", "no such"]),
    ("info-model-bin", "info --model {d}/binmodel", 2, ["pickled"]),
    ("model-config-for-embedded", f"{G} --model-config {{d}}/sub {O}", 2, ["--model-config", "single-file"]),
    ("model-config-for-folder", "info --model {d}/sub --model-config {d}/sub", 2, ["--model-config", "single-file"]),
    ("targets-model-missing", "lora targets --model {d}/nomodel", 2, ["no such"]),
    ("nearest-model-missing", "ti nearest {d}/emb_ok.safetensors --model {d}/nomodel", 2, ["no such"]),
    ("bench-model-missing", "bench quality --model {d}/nomodel", 2, ["no such"]),
    # --- LoRA files (generate, inspect, conflict, merge) ---------------------------------------------
    ("lora-missing", f"{G} --lora {{d}}/nope.safetensors {O}", 2, ["nope.safetensors"]),
    ("lora-nan", f"{G} --lora {{d}}/lora_nan.safetensors {O}", 2, ["lora_nan.safetensors", "nan"]),
    ("lora-inf", f"{G} --lora {{d}}/lora_inf.safetensors {O}", 2, ["lora_inf.safetensors", "inf"]),
    ("lora-int", f"{G} --lora {{d}}/lora_int.safetensors {O}", 2, ["lora_int.safetensors", "int"]),
    ("lora-rank0", f"{G} --lora {{d}}/lora_rank0.safetensors {O}", 2, ["lora_rank0.safetensors", "rank"]),
    ("lora-mismatch", f"{G} --lora {{d}}/lora_mismatch.safetensors {O}", 2, ["lora_mismatch.safetensors"]),
    ("lora-garbage", f"{G} --lora {{d}}/bad.safetensors {O}", 2, ["bad.safetensors"]),
    ("lora-pickle", f"{G} --lora {{d}}/model.ckpt {O}", 2, ["model.ckpt"]),
    ("lora-wrong-shape-for-model", f"{G} --lora {{d}}/lora_wide.safetensors {O}", 2, ["lora_wide.safetensors"]),
    ("inspect-missing", "lora inspect {d}/nope.safetensors", 2, ["nope.safetensors"]),
    ("inspect-nan", "lora inspect {d}/lora_nan.safetensors", 2, ["nan"]),
    ("inspect-int", "lora inspect {d}/lora_int.safetensors", 2, ["int"]),
    ("inspect-rank0", "lora inspect {d}/lora_rank0.safetensors", 2, ["rank"]),
    ("inspect-mismatch", "lora inspect {d}/lora_mismatch.safetensors", 2, ["lora_mismatch.safetensors"]),
    ("inspect-garbage", "lora inspect {d}/bad.safetensors", 2, ["bad.safetensors"]),
    ("inspect-folder", "lora inspect {d}/sub", 2, ["sub"]),
    ("inspect-sdxl", "lora inspect {d}/lora_sdxl.safetensors --model shapes", 2, ["sdxl", "sd1.x/sd2.x"]),
    ("inspect-embedding", "lora inspect {d}/emb_ok.safetensors", 2, ["emb_ok.safetensors"]),
    ("conflict-nan", "lora conflict {d}/lora_ok.safetensors {d}/lora_nan.safetensors", 2, ["nan"]),
    ("conflict-missing", "lora conflict {d}/lora_ok.safetensors {d}/nope.safetensors", 2, ["nope.safetensors"]),
    ("conflict-rank0", "lora conflict {d}/lora_rank0.safetensors {d}/lora_ok.safetensors", 2, ["rank"]),
    ("merge-nan", "lora merge {d}/lora_nan.safetensors --out {d}/out/m.safetensors", 2, ["nan"]),
    ("merge-int", "lora merge {d}/lora_int.safetensors --out {d}/out/merged", 2, ["int"]),
    ("merge-missing", "lora merge {d}/nope.safetensors --out {d}/out/merged", 2, ["nope.safetensors"]),
    ("merge-mismatch", "lora merge {d}/lora_mismatch.safetensors --out {d}/out/m.safetensors", 2, ["lora_mismatch"]),
    # --- embedding files (generate, verify, nearest) -------------------------------------------------
    ("embedding-missing", f"{G} --embedding {{d}}/nope.safetensors {O}", 2, ["nope.safetensors"]),
    ("embedding-nan", f"{G} --embedding {{d}}/emb_nan.safetensors {O}", 2, ["emb_nan.safetensors", "nan"]),
    ("embedding-int", f"{G} --embedding {{d}}/emb_int.safetensors {O}", 2, ["emb_int.safetensors", "int"]),
    ("embedding-width", f"{G} --embedding {{d}}/emb_768.safetensors {O}", 2, ["768", "64"]),
    ("embedding-garbage", f"{G} --embedding {{d}}/bad.safetensors {O}", 2, ["bad.safetensors"]),
    ("embedding-a-lora", f"{G} --embedding {{d}}/lora_ok.safetensors {O}", 2, ["lora_ok.safetensors"]),
    ("embedding-pickle-pt", f"{G} --embedding {{d}}/evil.pt {O}", 2, ["evil.pt"]),
    ("verify-nan", "ti verify {d}/emb_nan.safetensors --steps 1", 2, ["nan"]),
    ("verify-missing", "ti verify {d}/nope.safetensors", 2, ["nope.safetensors"]),
    ("nearest-width", "ti nearest {d}/emb_768.safetensors", 2, ["768"]),
    ("nearest-garbage", "ti nearest {d}/bad.safetensors", 2, ["bad.safetensors"]),
    ("nearest-lora", "ti nearest {d}/lora_ok.safetensors", 2, ["lora_ok.safetensors"]),
]

EXPECTED_MIN_CASES = 150  # this table alone; training adds its own


def _lora(path: Path, down: torch.Tensor, up: torch.Tensor, alpha=4.0, layer="down_blocks_0_attentions_0_transformer_"
          "blocks_0_attn2_to_k", extra: dict | None = None) -> None:
    k = f"lora_unet_{layer}"
    save_file({f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up, f"{k}.alpha": torch.tensor(alpha),
               **(extra or {})}, str(path))


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """The read-only inputs every case may name (shapes model: attn2.to_k is 64 -> 64, text width 64)."""
    d = tmp_path_factory.mktemp("fixtures")
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.01  # noqa: E731
    y, x = np.mgrid[0:32, 0:32]
    Image.fromarray(np.stack([x * 8, y * 8, (x + y) * 4], -1).astype(np.uint8)).save(d / "img.png")
    m = Image.new("L", (32, 32), 0)
    m.paste(255, (16, 0, 32, 32))
    m.save(d / "mask.png")
    Image.new("L", (16, 16), 255).save(d / "mask16.png")
    (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage, not a picture")
    (d / "empty.png").write_bytes(b"")
    (d / "notes.txt").write_text("just words\n")
    raw = (d / "img.png").read_bytes()
    (d / "truncated.png").write_bytes(raw[: len(raw) // 2])
    Image.new("1", (20000, 20000)).save(d / "huge.png")  # 180 kB on disk, 400 MP decoded: refused before decoding
    Image.new("1", (12000, 12000)).save(d / "big.png")  # readable, but sampling at that size does not fit
    (d / "sub").mkdir()
    (d / "folder.png").mkdir()
    (d / "afile").write_text("a file, not a folder")
    Image.new("RGB", (8, 8), "blue").save(d / "existing.png")
    Image.new("RGB", (8, 8), "blue").save(d / "pair-1.png")
    (d / "userdir").mkdir()
    (d / "userdir" / "keep.txt").write_text("the user's own file")
    (d / "binmodel").mkdir()
    for c in ("tokenizer", "text_encoder", "unet", "vae", "scheduler"):
        (d / "binmodel" / c).mkdir()
    for c in ("text_encoder", "unet", "vae"):
        (d / "binmodel" / c / "config.json").write_text("{}")
        (d / "binmodel" / c / ("pytorch_model.bin" if c == "text_encoder" else "diffusion_pytorch_model.bin")
         ).write_bytes(b"PK pickled")
    (d / "binmodel" / "scheduler" / "scheduler_config.json").write_text("{}")
    (d / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    torch.save({"state_dict": {"x": torch.zeros(1)}}, d / "model.ckpt")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {d}/PWNED",))

    torch.save({"string_to_param": {"*": Evil()}}, d / "evil.pt")
    _lora(d / "lora_ok.safetensors", rnd(4, 64), rnd(64, 4))
    _lora(d / "lora_nan.safetensors", rnd(4, 64), torch.full((64, 4), float("nan")))
    _lora(d / "lora_inf.safetensors", torch.full((4, 64), float("inf")), rnd(64, 4))
    _lora(d / "lora_int.safetensors", torch.ones(4, 64, dtype=torch.int32), torch.ones(64, 4, dtype=torch.int32))
    _lora(d / "lora_rank0.safetensors", rnd(0, 64), rnd(64, 0))
    _lora(d / "lora_mismatch.safetensors", rnd(4, 64), rnd(64, 5))
    _lora(d / "lora_wide.safetensors", rnd(4, 768), rnd(320, 4))
    _lora(d / "lora_sdxl.safetensors", rnd(4, 2048), rnd(640, 4), layer="input_blocks_4_1_transformer_blocks_1_attn2_to_k")
    save_file({"<x>": rnd(1, 64)}, str(d / "emb_ok.safetensors"))
    save_file({"<x>": torch.full((1, 64), float("nan"))}, str(d / "emb_nan.safetensors"))
    save_file({"<x>": torch.ones(1, 64, dtype=torch.int64)}, str(d / "emb_int.safetensors"))
    save_file({"<x>": rnd(1, 768)}, str(d / "emb_768.safetensors"))
    (d / "readonly").mkdir(mode=0o555)
    for p in d.rglob("*"):
        os.utime(p, (1e9, 1e9))
    return d


def snapshot(root: Path) -> dict:
    """Every path under root with its kind, mode and content hash: what 'nothing written, nothing
    deleted, nothing changed' compares."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
        out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), digest)
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("argv,code,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(argv, code, words, fixtures, capsys, monkeypatch):
    monkeypatch.chdir(fixtures)
    before = snapshot(fixtures)
    rc, out, err = run_cli(shlex.split(argv.format(d=fixtures)), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == code, f"exit {rc}, stderr: {err}"
    assert "Traceback" not in err and len(lines) == 1, f"not one line: {err!r}"
    for w in words:
        assert w in lines[0].lower(), f"{w!r} not in: {lines[0]}"
    assert snapshot(fixtures) == before, "files were written, changed or deleted"
    assert not (fixtures / "PWNED").exists(), "an unpickled file ran code"


def test_case_count():
    assert len(CASES) >= EXPECTED_MIN_CASES
    assert len({c[0] for c in CASES}) == len(CASES), "duplicate case ids"


# --- rules that are not one argv each -------------------------------------------------------------

def test_unexpected_exception_is_one_line_and_exit_1(capsys, monkeypatch):
    """A bug shows one line naming the command and the exception, and -v the traceback."""
    import sdknobs.cli as cli

    def boom(cfg):
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setitem(cli.SAMPLERS, "generate", (*cli.SAMPLERS["generate"][:2], boom))
    rc, _, err = run_cli(["generate", "--prompt", "x"], capsys)
    assert rc == 1 and err.count("\n") == 1
    assert "sdknobs generate" in err and "RuntimeError: kaboom" in err and "-v" in err and "Traceback" not in err
    rc, _, err = run_cli(["generate", "--prompt", "x", "-v"], capsys)
    assert rc == 1 and "Traceback" in err


def test_disk_full_is_named_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """ENOSPC while writing: the path is named, exit 2, no temp file and no created folder left."""
    import errno

    from PIL import Image as PILImage

    def full(self, fp, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PILImage.Image, "save", full)
    rc, _, err = run_cli(["generate", "--prompt", P, "--steps", "1", "--out", str(tmp_path / "new" / "x.png")], capsys)
    assert rc == 2 and "No space left on device" in err and "x.png" in err
    assert list(tmp_path.iterdir()) == []


def test_ti_nearest_into_closed_pipe_ends_quietly(fixtures, tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "sdknobs", "ti", "nearest", str(fixtures / "emb_ok.safetensors"), "--k", "2000"]
    p = subprocess.run(" ".join(map(shlex.quote, cmd)) + " | head -n 1", shell=True, capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert p.stdout.count("\n") == 1 and "BrokenPipe" not in p.stderr and "Traceback" not in p.stderr, p.stderr


@pytest.mark.parametrize("name,make", [
    ("palette.png", lambda: Image.new("P", (32, 32), 3)),
    ("grey16.png", lambda: Image.fromarray((np.ones((32, 32)) * 40000).astype(np.uint16))),
    ("alpha.png", lambda: Image.new("RGBA", (32, 32), (255, 0, 0, 0))),
    ("grey.png", lambda: Image.new("L", (32, 32), 128)),
    ("la.png", lambda: Image.new("LA", (32, 32), (10, 255))),
    ("one.png", lambda: Image.new("RGB", (1, 1), "red")),
    ("odd.png", lambda: Image.new("RGB", (37, 29), "red")),
])
def test_unusual_images_work(name, make, tmp_path, capsys):
    """Image modes and odd sizes convert (16-bit scaled, transparency on white; sizes rounded to a multiple
    of 8 with a notice): a picture, never a crash."""
    make().save(tmp_path / name)
    out = tmp_path / "o.png"
    rc, _, err = run_cli(["img2img", "--image", str(tmp_path / name), "--prompt", P, "--steps", "2", "--strength",
                          "0.5", "--out", str(out)], capsys)
    assert rc == 0, err
    w, h = Image.open(out).size
    assert w % 8 == 0 and h % 8 == 0


def test_ctrl_c_while_sampling_exits_130_and_leaves_nothing(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "o" / "x.png"
    # SIG_DFL: a shell's background job inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    p = subprocess.Popen([sys.executable, "-m", "sdknobs", "generate", "--prompt", P, "--steps", "999", "--out", str(out)],
                         stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        seen = ""
        deadline = time.time() + 120
        while "denoise" not in seen and time.time() < deadline:  # the loop has started (its progress bar)
            seen += p.stderr.read(1)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    err = seen + err
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_16bit_is_scaled_and_exif_applied(tmp_path):
    from sdknobs.images import load_image

    Image.fromarray((np.ones((4, 4)) * 32896).astype(np.uint16)).save(tmp_path / "g.png")  # 32896 / 257 = 128
    assert np.asarray(load_image(tmp_path / "g.png"))[0, 0].tolist() == [128, 128, 128]
    im = Image.new("RGB", (40, 20), "red")
    ex = im.getexif()
    ex[0x0112] = 6  # rotate 90 degrees
    im.save(tmp_path / "phone.jpg", exif=ex)
    assert load_image(tmp_path / "phone.jpg").size == (20, 40)


def test_outputs_keep_umask_modes(tmp_path, capsys, fixtures):
    """PNGs, LoRA files and merged model folders get 0644 / 0755 under umask 022 (not 0600 / 0700), and
    --overwrite replaces our own outputs."""
    old = os.umask(0o022)
    try:
        png = tmp_path / "a" / "x.png"
        assert run_cli(["generate", "--prompt", P, "--steps", "1", "--out", str(png)], capsys)[0] == 0
        assert stat.S_IMODE(png.stat().st_mode) == 0o644 and stat.S_IMODE(png.parent.stat().st_mode) == 0o755
        assert run_cli(["generate", "--prompt", P, "--steps", "1", "--out", str(png)], capsys)[0] == 2
        assert run_cli(["generate", "--prompt", P, "--steps", "1", "--out", str(png), "--overwrite"], capsys)[0] == 0
        lora = tmp_path / "c.safetensors"
        rc, _, err = run_cli(["lora", "merge", str(fixtures / "lora_ok.safetensors"), "--out", str(lora)], capsys)
        assert rc == 0, err
        assert stat.S_IMODE(lora.stat().st_mode) == 0o644
        folder = tmp_path / "merged"
        rc, _, err = run_cli(["lora", "merge", str(fixtures / "lora_ok.safetensors"), "--out", str(folder)], capsys)
        assert rc == 0, err
        modes = {stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")] if p.is_dir()}
        assert modes == {0o755}
        assert {stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()} == {0o644}
        rc, _, err = run_cli(["lora", "merge", str(fixtures / "lora_ok.safetensors"), "--out", str(folder),
                              "--overwrite"], capsys)
        assert rc == 0, err
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left"
    finally:
        os.umask(old)


def test_seed_minus_one_draws_and_records(tmp_path, capsys):
    out = tmp_path / "r.png"
    assert run_cli(["generate", "--prompt", P, "--steps", "1", "--seed", "-1", "--out", str(out)], capsys)[0] == 0
    params = Image.open(out).info["parameters"]
    seed = int(params.split("Seed: ")[1].split(",")[0])
    assert seed >= 0
