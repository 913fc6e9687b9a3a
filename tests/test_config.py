"""Typed configs: YAML + overrides; unknown keys and bad values are errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dida.cli.main import main
from dida.config import ConfigError, config_from_dict, config_to_dict, load_config, save_config
from dida.experiments import find_experiment, list_experiments


def test_defaults_are_the_paper_setting() -> None:
    cfg = load_config()
    assert (cfg.model.variant, cfg.model.num_classes, cfg.model.embed_dim) == ("mit_b5", 19, 256)
    assert (cfg.optim.lr, cfg.optim.warmup_iters, cfg.train.max_iters) == (6e-5, 1500, 40000)
    assert (cfg.method.teacher.alpha, cfg.method.teacher.pseudo_threshold) == (0.999, 0.968)
    assert (cfg.method.bank.size, cfg.method.bank.update_interval) == (300, 50)
    assert cfg.method.instance.weight == 0.5 and cfg.data.rcs.temperature == 0.01


def test_overrides_and_round_trip(tmp_path: Path) -> None:
    cfg = load_config(find_experiment("8").path, ["train.max_iters=7", "data.crop_size=[64,64]"])
    assert cfg.train.max_iters == 7 and cfg.data.crop_size == [64, 64]
    assert cfg.train.seed == 2 and cfg.data.source.kind == "synthia"
    assert set(cfg.eval.subsets) == {"16", "13"}
    save_config(cfg, tmp_path / "c.json")
    assert load_config(tmp_path / "c.json") == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.bogus=1"], "model.bogus"),
        (["train.max_iters=abc"], "train.max_iters"),
        (["method.bank.sise=3"], "method.bank.sise"),
        (["novalue"], "expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_unknown_key_in_a_file_is_a_one_line_cli_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  variant: mit_b0\n  dropot: 0.2\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.dropot" in err and str(bad) in err


@pytest.mark.parametrize(
    ("overrides", "bad_key", "where"),
    [
        ([], "train.precision", "(in {file})"),  # the file's value
        (["train.max_iters=3"], "train.precision", "(in {file})"),  # another key overridden
        (["train.precision=bf16", "method.mic.ratio=2"], "method.mic.ratio", "(from --set)"),
        # a cross-field rule names the override that broke it, even through the other key
        (
            ["train.precision=bf16", "method.mic.enabled=false", "method.compose.mic_view=add"],
            "method.compose.mic_view",
            "(from --set)",
        ),
        (
            ["train.precision=bf16", "method.compose.hrda_scale=hr"],
            "method.compose.hrda_scale",
            "(from --set)",
        ),
    ],
)
def test_a_bad_value_names_where_it_came_from(
    tmp_path: Path, overrides: list[str], bad_key: str, where: str
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  precision: int8\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad, overrides)
    message = str(err.value)
    assert message.startswith(f"{bad_key}=") and message.endswith(where.format(file=bad))


def test_missing_weights_are_reported_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no pretrained/mit_b5.pth here
    assert main(["train", "--exp", "7", "--work-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mit_b5.pth" in err
    assert not (tmp_path / "run").exists()  # nothing written


def test_missing_dataset_is_reported_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["train", "--exp", "7", "--set", "model.pretrained=null", "--work-dir", "run"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data/gta" in err
    assert not (tmp_path / "run").exists()


def test_random_bank_with_the_reference_normaliser_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["train", "--exp", "7", "--set", "model.pretrained=null", "--work-dir", "run",
            "--set", "method.bank.init=random"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "safe_normaliser" in err
    assert not (tmp_path / "run").exists()


def test_experiments_listing(capsys: pytest.CaptureFixture[str]) -> None:
    assert {e.exp for e in list_experiments()} >= {"7", "8", "7-daformer", "8-daformer"}
    assert find_experiment("7").config.method.name == "dida"
    assert main(["experiments"]) == 0
    out = capsys.readouterr().out
    assert "gta2cs_dida_mitb5_s0" in out and "syn2cs_daformer_mitb5_s2" in out
    assert main(["train", "--exp", "99"]) == 2
    assert "unknown experiment '99'" in capsys.readouterr().err


def test_loading_a_config_does_not_import_torch() -> None:
    """Configs are plain data: validating one (the MiT variant names included) imports no torch,
    so config-only commands and the quickstart's parent process start ~1.4 s sooner; the models
    package still exports its names on first use."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from dida.experiments import find_experiment, list_experiments\n"
        "assert len(list_experiments()) > 10 and find_experiment('7').config.model.variant\n"
        "print('torch' in sys.modules)\n"
        "from dida.models import MIT_VARIANTS, build_segmentor\n"
        "print('torch' in sys.modules, sorted(MIT_VARIANTS)[0], build_segmentor.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "mit_b0", "build_segmentor"]
