"""Training defaults per model and method (training/defaults.py): a flag the run leaves unset takes the model
folder's sdknobs.json "training" value, else the family's (model.TRAINING_DEFAULTS), else the dataclass's
fallback; a given flag wins; bad values in sdknobs.json are one-line errors naming the file and key."""
import json
import shutil
from types import SimpleNamespace

import pytest

from sdknobs import SdknobsError
from sdknobs.cli import main
from sdknobs.lora.train import LoraTrainConfig
from sdknobs.model import EMBEDDED, TRAINING_DEFAULTS, load_model
from sdknobs.shapes import world
from sdknobs.ti.train import TITrainConfig
from sdknobs.training import defaults

SHIPPED = json.loads((EMBEDDED["shapes"] / "sdknobs.json").read_text())["training"]


def fake(family="custom", settings=None, source=""):
    return SimpleNamespace(family=family, settings=settings or {}, source=source)


def lora(**kw):
    return LoraTrainConfig(data_dir="d", out="o.safetensors", **kw)


def test_fields_default_to_none_and_fallbacks():
    assert set(defaults.defaultable(LoraTrainConfig)) == {"steps", "learning_rate", "batch_size", "min_snr_gamma", "rank"}
    assert set(defaults.defaultable(TITrainConfig)) == {"steps", "learning_rate", "batch_size", "min_snr_gamma"}
    cfg = lora()
    assert (cfg.steps, cfg.learning_rate, cfg.batch_size, cfg.rank) == (None, None, None, None)


def test_model_over_family_over_fallback_and_flag_over_all():
    # custom family, no settings: the dataclass fallbacks
    cfg = lora()
    src = defaults.resolve(cfg, fake(), "lora")
    assert (cfg.steps, cfg.learning_rate, cfg.batch_size, cfg.rank, cfg.min_snr_gamma) == (500, 1e-4, 1, 4, 0.0)
    assert set(src.values()) == {"fallback"}
    # SD1.x: the family table
    cfg = TITrainConfig(data_dir="d", token="<t>", init_word="shape")
    src = defaults.resolve(cfg, fake("SD1.x"), "ti")
    assert cfg.learning_rate == TRAINING_DEFAULTS["SD1.x"]["ti"]["learning_rate"] and src["learning_rate"] == "family"
    assert cfg.steps == TRAINING_DEFAULTS["SD1.x"]["ti"]["steps"]
    # the model's settings over the family; a partial section leaves the rest to the family; a flag wins
    cfg = lora(steps=7)
    src = defaults.resolve(cfg, fake("SD1.x", {"training": {"lora": {"learning_rate": 3e-3, "rank": 16}}}), "lora")
    assert (cfg.steps, cfg.learning_rate, cfg.rank, cfg.batch_size) == (7, 3e-3, 16, 1)
    assert src == {"steps": "flag", "learning_rate": "model", "rank": "model", "batch_size": "family",
                   "min_snr_gamma": "family"}
    # another method's section does not leak in
    cfg = TITrainConfig(data_dir="d", token="<t>", init_word="shape")
    defaults.resolve(cfg, fake("custom", {"training": {"lora": {"learning_rate": 3e-3}}}), "ti")
    assert cfg.learning_rate == 5e-3


def test_shipped_shapes_model_defaults():
    m = load_model("shapes")
    cfg = lora(batch_size=2)
    src = defaults.resolve(cfg, m, "lora")
    assert cfg.learning_rate == SHIPPED["lora"]["learning_rate"] and cfg.rank == SHIPPED["lora"]["rank"]
    assert cfg.steps == SHIPPED["lora"]["steps"] and cfg.batch_size == 2 and src["batch_size"] == "flag"
    cfg = TITrainConfig(data_dir="d", token="<t>", init_word="shape")
    defaults.resolve(cfg, m, "ti")
    assert (cfg.learning_rate, cfg.batch_size, cfg.steps) == tuple(SHIPPED["ti"][k] for k in ("learning_rate", "batch_size", "steps"))


@pytest.mark.parametrize("section, words", [
    ({"lora": {"steps": 0}}, ['"training".lora.steps = 0', "--steps must be >= 1"]),
    ({"lora": {"learning_rate": -1.0}}, ['"training".lora.learning_rate', "--learning-rate must be > 0"]),
    ({"lora": {"rank": 0}}, ['"training".lora.rank', "--rank must be >= 1"]),
    ({"lora": {"steps": "many"}}, ['"training".lora.steps must be an integer', "'many'"]),
    ({"lora": {"batch_size": 2.5}}, ['"training".lora.batch_size must be an integer']),
    ({"lora": {"steps": True}}, ['"training".lora.steps must be an integer']),
    ({"lora": {"lr": 1e-3}}, ['"training".lora.lr is not known', "learning_rate"]),
    ({"lora": [1, 2]}, ['"training".lora must be an object']),
    ("x", ['"training" must be an object']),
])
def test_bad_settings_name_file_and_key(tmp_path, section, words):
    (tmp_path / "sdknobs.json").write_text(json.dumps({"training": section}))
    with pytest.raises(SdknobsError) as e:
        defaults.resolve(lora(), fake("SD1.x", {"training": section}, str(tmp_path)), "lora")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "sdknobs.json") in msg
    for w in words:
        assert w in msg


@pytest.fixture(scope="module")
def bad_model(tmp_path_factory):
    """The shapes model's folder (weights linked) with a bad training value in its sdknobs.json."""
    root = tmp_path_factory.mktemp("m") / "shapes-bad"
    root.mkdir()
    for p in EMBEDDED["shapes"].iterdir():
        if p.name != "sdknobs.json":
            (root / p.name).symlink_to(p)
    settings = json.loads((EMBEDDED["shapes"] / "sdknobs.json").read_text())
    settings["training"]["lora"]["learning_rate"] = 0
    (root / "sdknobs.json").write_text(json.dumps(settings))
    return root


def test_cli_bad_settings_exit_2_nothing_written(tmp_path, bad_model, capsys):
    data = world.write_dataset(tmp_path / "d", 2, seed=0)
    out = tmp_path / "o" / "x.safetensors"
    assert main(["train-lora", str(data), "--model", str(bad_model), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sdknobs.json" in err and '"training".lora.learning_rate = 0' in err
    assert not (tmp_path / "o").exists()
    # a flag replaces the bad value: nothing of the file is used then
    assert main(["train-lora", str(data), "--model", str(bad_model), "--out", str(out), "--no-progress",
                 "--learning-rate", "1e-3", "--steps", "1", "--batch-size", "1", "--rank", "2"]) == 0
    hist = json.loads((tmp_path / "o" / "x-run" / "history.json").read_text())
    assert hist["defaults_from"]["learning_rate"] == "flag" and hist["defaults_from"]["min_snr_gamma"] == "model"
    assert hist["config"]["min_snr_gamma"] == SHIPPED["lora"]["min_snr_gamma"]
    shutil.rmtree(tmp_path / "o")


def test_help_names_the_models_default(capsys):
    with pytest.raises(SystemExit):
        main(["train-lora", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"the model's: shapes: {SHIPPED['lora']['steps']}; SD1.x/SD2.x: 500" in text
    assert "--save-every" in text and "--sample-prompts" in text
    with pytest.raises(SystemExit):
        main(["train-ti", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"shapes: {SHIPPED['ti']['learning_rate']:g}" in text
