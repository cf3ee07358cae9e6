"""`sdknobs grid` (A1111's X/Y/Z plot) and sweep-strength as a case of it: axis strings and ranges, every cell
equal to the single command with its values (pixels and parameters), the old sweep-strength picture
unchanged, and bad axes refused before anything is sampled or written."""
import numpy as np
import pytest
from PIL import Image
from test_lora import random_lora

from sdknobs import SdknobsError, load_model
from sdknobs import images as im
from sdknobs.cli import main
from sdknobs.grid import GridConfig, parse_axis, split_values
from sdknobs.grid import run as run_grid
from sdknobs.lora.files import write_lora
from sdknobs.pipelines import generate, img2img, inpaint, sweep_strength

P = "a large red circle in the centre, white background"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def px(path):
    return np.asarray(Image.open(path).convert("RGB"))


def params(path):
    return Image.open(path).text["parameters"]


# --- axis strings ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,values", [
    ("seed=0,1,2", [0, 1, 2]),
    ("seed=1-5", [1, 2, 3, 4, 5]),  # A1111: range(1, 5 + 1)
    ("steps=10-30 (+10)", [10, 20, 30]),  # A1111: range(10, 31, 10)
    ("steps=10-35 (+10)", [10, 20, 30]),  # the end need not be reached
    ("steps=30-10 (-10)", [30, 20, 10]),
    ("steps=10-30 (10)", [10, 20, 30]),  # the sign may be left out
    ("steps=1-10 [4]", [1, 4, 7, 10]),  # A1111: int(x) for x in linspace(1, 10, 4)
    ("steps=1-4 [3]", [1, 2, 4]),  # linspace 1, 2.5, 4 truncated
    ("strength=0.2-1 [5]", [0.2, 0.4, 0.6, 0.8, 1.0]),
    ("strength=0-1 (+0.25)", [0.0, 0.25, 0.5, 0.75, 1.0]),
    ("strength=0-1 (+0.1)", [round(0.1 * i, 10) for i in range(11)]),  # no 1.1 from rounding, no 0.30000000000000004
    ("guidance=1-3", [1.0, 2.0, 3.0]),  # float axes: whole steps of 1 (A1111's arange default)
    ("guidance= 1, 3 ,7.5", [1.0, 3.0, 7.5]),
    ("seed=3,1-2,0", [3, 1, 2, 0]),  # ranges mix with single values
    ("cfg=2", [2.0]),  # A1111-ish alias
    ("prompt=red,\"blue, big\",", ["red", "blue, big", ""]),  # CSV: quotes keep commas; an empty replacement
    ("scheduler=ddim, Euler a,DPM++ 2M Karras", ["ddim", "euler-a", "dpm++2m-karras"]),  # A1111's sampler names
])
def test_axis_values(text, values):
    a = parse_axis(text)
    assert a.values == values and all(type(v) is type(w) for v, w in zip(a.values, values))


def test_csv_split_and_seed_minus_one_drawn_once():
    assert split_values('a, "b, c" ,d') == ["a", "b, c", "d"]
    a = parse_axis("seed=-1,5")
    assert 0 <= a.values[0] < 2**32 and a.values[1] == 5


@pytest.mark.parametrize("text,words", [
    ("strength=1.5", ["--x strength", "'1.5'", "[0, 1]"]),
    ("scheduler=heun", ["--x scheduler", "'heun'", "ddim"]),
    ("steps=0", ["--x steps", "'0'", ">= 1"]),
    ("steps=1-5 (+0)", ["--x steps", "step 0"]),
    ("steps=5-1 (+1)", ["--x steps", "does not go"]),
    ("guidance=nan", ["--x guidance", "finite"]),
    ("guidance=-1", ["--x guidance", "'-1'", ">= 0"]),
    ("seed=1.5", ["--x seed", "'1.5'", "integer"]),
    ("seed=-2", ["--x seed", "'-2'"]),
    ("seed=1,,2", ["--x seed", "empty value"]),
    ("seed=0-5000", ["5001 values", "1024"]),
    ("strength=0-1 [0]", ["0 values"]),
    ("colour=1,2", ["unknown axis", "'colour'", "seed"]),
    ("seed", ["NAME=VALUES"]),
    ("prompt=,a", ["first value", "empty"]),
])
def test_bad_axis_strings(text, words):
    with pytest.raises(SdknobsError) as e:
        parse_axis(text)
    assert all(w in str(e.value) for w in words), str(e.value)


# --- the command ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("grid")
    y, x = np.mgrid[0:32, 0:32]
    a = np.stack([x * 8, y * 8, (x + y) * 4], -1).astype(np.uint8)
    a[8:20, 10:22] = (220, 40, 40)
    Image.fromarray(a).save(d / "in.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (16, 0, 32, 32))
    mask.save(d / "mask.png")
    mask.resize((16, 16)).save(d / "small_mask.png")
    write_lora(random_lora(load_model(tiny_dir)), d / "loras" / "style.safetensors")
    return d


def common(tiny_dir, out):
    return ["--model", tiny_dir, "--steps", "3", "--prompt", P, "--out", out]


def test_txt2img_cells_equal_single_commands_and_sheet_records_axes(capsys, tiny_dir, files, tmp_path):
    out = tmp_path / "g.png"
    code, so, err = run(capsys, "grid", *common(tiny_dir, out), "--x", "seed=3,4", "--y", "guidance=1,4",
                        "--z", "scheduler=ddim,euler-a", "--save-cells", "--cell-labels", "values")
    assert code == 0, err
    sheets = [tmp_path / "g-z0.png", tmp_path / "g-z1.png"]
    assert [p.exists() for p in sheets] == [True, True] and not out.exists()
    assert len(list(tmp_path.glob("g-x*-y*-z*.png"))) == 8
    text = params(sheets[1])
    assert "Script: X/Y/Z plot" in text and 'X Values: "3,4"' in text and 'Y Values: "1,4"' in text
    assert 'Z Type: scheduler' in text and "Z Value: euler-a" in text
    w, h = Image.open(sheets[0]).size
    assert w >= 2 * 32 * 4 and h >= 2 * 32 * 4  # 32 px cells drawn at 4x by default
    # cell (x=1, y=0, z=1): seed 4, guidance 1, Euler a = this generate command, bit for bit
    cell = tmp_path / "g-x1-y0-z1.png"
    code, _, err = run(capsys, "generate", *common(tiny_dir, tmp_path / "one.png"), "--seed", "4", "--guidance", "1",
                       "--scheduler", "euler-a")
    assert code == 0, err
    assert np.array_equal(px(cell), px(tmp_path / "one.png")) and params(cell) == params(tmp_path / "one.png")
    # and it re-renders alone from its own PNG
    code, _, err = run(capsys, "generate", "--model", tiny_dir, "--from-png", cell, "--out", tmp_path / "again.png")
    assert code == 0, err
    assert np.array_equal(px(cell), px(tmp_path / "again.png"))
    assert not np.array_equal(px(cell), px(tmp_path / "g-x0-y0-z1.png"))  # the seeds do differ
    # an existing sheet is not replaced without --overwrite, and nothing else is written
    before = sorted(p.name for p in tmp_path.iterdir())
    stamp = sheets[0].stat().st_mtime_ns
    code, _, err = run(capsys, "grid", *common(tiny_dir, out), "--x", "seed=3,4", "--z", "steps=1,2")
    assert code == 2 and "--out" in err and "already exists" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before and sheets[0].stat().st_mtime_ns == stamp


def test_img2img_and_lora_flag_cells_equal_single_commands(capsys, tiny_dir, files, tmp_path):
    lora = files / "loras" / "style.safetensors"
    out = tmp_path / "i.png"
    base = [*common(tiny_dir, out), "--image", files / "in.png", "--seed", "7", "--lora", lora]
    code, _, err = run(capsys, "grid", *base, "--x", "strength=0.5,1", "--y", "lora=0,0.7", "--save-cells",
                       "--cell-labels", "start")
    assert code == 0, err
    code, _, err = run(capsys, "img2img", *common(tiny_dir, tmp_path / "one.png"), "--image", files / "in.png",
                       "--seed", "7", "--strength", "0.5", "--lora", f"{lora}:0.7")  # applied at load, not per cell
    assert code == 0, err
    cell = tmp_path / "i-x0-y1.png"
    assert np.array_equal(px(cell), px(tmp_path / "one.png")) and params(cell) == params(tmp_path / "one.png")
    assert not np.array_equal(px(cell), px(tmp_path / "i-x0-y0.png"))  # the weight acts


def _grid_cells(model, cfg, image=None, mask=None):
    got = {}
    run_grid(model, cfg.plan(), image, mask, on_cell=lambda c, r: got.__setitem__(c.index, r))
    return got


def test_inpaint_lora_tag_and_mask_blur_cells_equal_pipeline_calls(tiny, tiny_dir, files):
    """The library: each cell is the pipeline call the single command makes, with the cell's values."""
    image, mask = Image.open(files / "in.png").convert("RGB"), Image.open(files / "mask.png").convert("L")
    loras = files / "loras"
    cfg = GridConfig(model=str(tiny_dir), prompt=P + " <lora:style:0.3>", steps=3, seed=2, image="x", mask="y",
                     lora_dir=str(loras), x="lora:style=0.3,1", y="mask-blur=0,2")
    got = _grid_cells(tiny, cfg, image, mask)
    one = inpaint(tiny, image, mask, P + " <lora:style:1>", mask_blur=2.0, steps=3, seed=2, lora_dir=loras, progress=False)
    assert np.array_equal(np.asarray(got[(1, 1, 0)].images[0]), np.asarray(one.images[0]))
    assert got[(1, 1, 0)].parameters == one.parameters and "Mask blur: 2.0" in one.parameters[0]
    assert not np.array_equal(np.asarray(got[(0, 1, 0)].images[0]), np.asarray(one.images[0]))
    assert "lora" not in tiny.extra  # applied for each cell only


def test_only_masked_cells_equal_pipeline_calls(tiny, tiny_dir, files):
    image, mask = Image.open(files / "in.png").convert("RGB"), Image.new("L", (32, 32), 0)
    mask.paste(255, (20, 20, 28, 28))  # a small box: --only-masked samples a 12x12 crop at 32x32
    cfg = GridConfig(model=str(tiny_dir), prompt=P, steps=3, image="x", mask="y", only_masked=True, padding=2,
                     x="seed=1,2")
    got = _grid_cells(tiny, cfg, image, mask)
    one = inpaint(tiny, image, mask, P, only_masked=True, padding=2, steps=3, seed=2, progress=False)
    assert np.array_equal(np.asarray(got[(1, 0, 0)].images[0]), np.asarray(one.images[0]))
    assert got[(1, 0, 0)].parameters == one.parameters
    plain = inpaint(tiny, image, mask, P, steps=3, seed=2, progress=False)  # the flag reaches the cells
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(one.images[0]))


def test_prompt_sr_cells(tiny, tiny_dir):
    cfg = GridConfig(model=str(tiny_dir), prompt=P, negative_prompt="red noise", steps=3, x="prompt=red,blue,")
    got = _grid_cells(tiny, cfg)
    one = generate(tiny, P.replace("red", "blue"), negative_prompt="blue noise", steps=3, progress=False)
    assert np.array_equal(np.asarray(got[(1, 0, 0)].images[0]), np.asarray(one.images[0]))
    assert got[(1, 0, 0)].parameters == one.parameters
    assert got[(2, 0, 0)].parameters[0].startswith(P.replace("red", "") + "\nNegative prompt:  noise\n")


def test_sweep_strength_is_unchanged(tiny, photo):
    """The grid-based sweep draws what the old loop did: img2img per (seed, strength), labelled cells, seed rows."""
    strengths, seeds, kw = (0.0, 0.5, 1.0), (0, 3), dict(steps=4, guidance=3.0, scheduler="euler")
    cells, labels, infos = [], [], []
    for seed in seeds:  # the old implementation, written out
        rs = [img2img(tiny, photo, P, strength=s, seed=seed, progress=False, **kw) for s in strengths]
        cells.append([r.images[0] for r in rs])
        labels.append([f"s={s:.2f}\nstart {r.start.index}/4\nabar={r.start.alpha_bar:.3f}" for s, r in zip(strengths, rs)])
        infos.append([r.start for r in rs])
    ref = im.grid(cells, labels, scale=4, row_titles=[f"seed {s}" for s in seeds])
    g, got = sweep_strength(tiny, photo, P, strengths=strengths, seeds=seeds, scale=4, **kw)
    assert g.size == ref.size and np.array_equal(np.asarray(g), np.asarray(ref))
    assert got == infos and got[0][1].index == 2


BAD = [
    (["--x", "strength=0.5,1.5", "--image", "{in}"], ["--x strength", "'1.5'", "[0, 1]"]),
    (["--x", "scheduler=ddim,heun"], ["--x scheduler", "'heun'"]),
    (["--x", "seed=0,1", "--y", "steps=2,0"], ["--y steps", "'0'"]),
    (["--x", "steps=2,5000"], ["--x steps value 5000", "1..1000"]),  # the model's scheduler, checked before sampling
    (["--x", "prompt=blue,green"], ["--x prompt", "'blue'", "not in --prompt"]),
    (["--x", "seed=0,1", "--y", "seed=2"], ["--y", "seed axis is already --x"]),
    (["--x", "seed=0-40", "--y", "guidance=1-30"], ["41 x 30 x 1 = 1230 cells", "1024"]),
    (["--x", "strength=0,1"], ["strength axis needs --image"]),
    (["--x", "mask-blur=0,1", "--image", "{in}"], ["mask-blur axis needs --mask"]),
    (["--x", "lora=0,1"], ["--x lora", "no LoRA"]),
    (["--x", "lora:nope=0,1", "--lora", "{lora}"], ["--x lora:nope", "no LoRA named 'nope'", "style.safetensors"]),
    (["--x", "prompt=red,<lora:missing:1>"], ["--x prompt value", "<lora:missing>"]),
    (["--x", "lora=0,1", "--lora", "{missing}"], ["--lora", "no such file"]),
    (["--x", "seed=0,1", "--batch", "2"], ["--batch 2", "one picture per cell"]),
    (["--x", "seed=0,1", "--strength", "0.5"], ["--strength 0.5 needs --image"]),
    (["--x", "seed=0,1", "--no-grid"], ["--no-grid"]),
    (["--x", "seed=0,1", "--out", "{jpg}"], ["--out", "must end in .png"]),
    (["--x", "seed=0,1", "--cell-labels", "start"], ["--cell-labels start", "--image"]),
    (["--x", "seed=0,1", "--cell-labels", "all"], ["--cell-labels 'all'"]),
    (["--x", "seed=0,1", "--image", "{missing}"], ["--image", "no such file"]),
    (["--x", "seed=0,1", "--image", "{in}", "--mask", "{small}"], ["--mask is 16x16", "--resize-mask"]),
    (["--x", "seed=0,1", "--only-masked"], ["--only-masked", "needs --mask"]),
    (["--x", "  "], ["--x is empty"]),
]


@pytest.mark.parametrize("argv,words", BAD)
def test_bad_inputs_write_nothing(capsys, tiny_dir, files, tmp_path, argv, words):
    subst = {"{in}": files / "in.png", "{small}": files / "small_mask.png", "{lora}": files / "loras" / "style.safetensors", "{missing}": tmp_path / "no.png",
             "{jpg}": tmp_path / "out" / "g.jpg"}
    outdir = tmp_path / "out"
    code, out, err = run(capsys, "grid", *common(tiny_dir, outdir / "g.png"), "--save-cells",
                         *[subst.get(a, a) for a in argv])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert all(w in err for w in words), err
    assert not outdir.exists()


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["grid", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--x", "--y", "--z", "--save-cells", "--cell-labels", "--scale", "--image", "--mask", "--strength",
                 "--mask-blur", "10-30 (+10)"):
        assert flag in text


def test_a1111_axis_labels_and_library_sheets(tiny, tiny_dir):
    assert parse_axis("CFG Scale=1,2").kind == "guidance" and parse_axis("Prompt S/R=a,b").kind == "prompt"
    assert parse_axis("Sampler=Euler a").values == ["euler-a"] and parse_axis("Denoising=0.5").kind == "strength"
    cfg = GridConfig(model=str(tiny_dir), prompt=P, steps=2, x="seed=0,1", z="guidance=1,2")  # X and Z, no Y
    sheets = run_grid(tiny, cfg.plan())
    assert len(sheets) == 2 and "Z Type: guidance" in sheets[1][1] and "Z Value: 2" in sheets[1][1]
    assert "Y Type" not in sheets[0][1] and sheets[0][0].size == sheets[1][0].size


def test_sheet_size_and_memory_refused_before_sampling(tiny, tiny_dir, monkeypatch):
    sampled = []
    monkeypatch.setattr("sdknobs.grid.sample_cells", lambda *a, **k: sampled.append(1))
    big = GridConfig(model=str(tiny_dir), prompt=P, x="seed=0-40", y="guidance=1-20", scale=64)
    with pytest.raises(SdknobsError, match=r"--x/--y: a sheet of 41 x 20 cells of 2048x2048 px .* megapixels"):
        run_grid(tiny, big.plan(), scale=64)
    monkeypatch.setattr("sdknobs.model.available_memory", lambda device=None: 2**20)  # 1 MiB free
    small = GridConfig(model=str(tiny_dir), prompt=P, x="seed=0-3", y="guidance=1,3")
    with pytest.raises(SdknobsError, match=r"--x/--y: a sheet of 4 x 2 cells needs .* GiB of memory"):
        run_grid(tiny, small.plan())
    assert not sampled
