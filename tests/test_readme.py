"""Every command in the README (and docs/*.md) is real: parsed by the program it names, never run.

Shell lines in ```bash blocks must be covered: `dida ...`, `python -m dida ...` and
`torchrun ... -m dida ...` parse with `dida.cli.main.build_parser()` (with `--set` keys checked
against the config schema and `--exp` ids against the shipped experiments); the seed scripts
exist and pass `sh -n`, and their extra arguments parse as the `dida` command they forward to;
`python FILE` / `python -m MODULE` scripts parse their arguments with their own argparse (stopped
right after parsing); `pip install` names only the project's own dependencies and extras.
Inline `dida ...` spans and dotted config keys in the prose must exist too, ```yaml blocks must
load as configs, and the ```python block of the custom-dataset section runs on a tiny folder
dataset that training then reads with rare-class sampling.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from dida.cli.main import build_parser
from dida.config import ExperimentConfig, apply_overrides, load_config
from dida.errors import DataError
from dida.experiments import list_experiments

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md"] + sorted(
    str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md") if p.name != "deviations.md"
)
SEED_SCRIPTS = {"run_exp.sh": ("train", "--exp"), "test.sh": ("test",), "run_config.sh": ("train",)}
# documented bash scripts and their options (tests/test_gpu_check.py runs gpu_check.sh on a CPU)
BASH_SCRIPTS = {"benchmarks/gpu_check.sh": {"--fetch"}}
# harmless shell words that need no coverage (environment set-up)
SHELL_BUILTINS = {".", "source", "cd", "export", "mkdir", "ln", "ls", "unzip", "tar"}
PYTEST_OPTIONS = {"-q", "-x", "-v", "-k", "-m", "--lf"}
CONFIG_SECTIONS = {
    f.name for f in fields(ExperimentConfig) if is_dataclass(getattr(ExperimentConfig(), f.name))
}
FILE_SUFFIXES = (".log", ".txt", ".json", ".jsonl", ".pth", ".pt", ".yaml", ".png", ".py", ".md")


def _blocks(text: str, lang: str) -> list[str]:
    """Bodies of the fenced ```LANG blocks, also those indented inside list items."""
    return re.findall(rf"^[ \t]*```{lang}\n(.*?)^[ \t]*```", text, flags=re.S | re.M)


def shell_commands(text: str) -> list[list[str]]:
    """Token lists of every command in the text's ```bash blocks (`&&` chains split)."""
    commands = []
    for block in _blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            while tokens:
                cut = tokens.index("&&") if "&&" in tokens else len(tokens)
                commands.append(tokens[:cut])
                tokens = tokens[cut + 1 :]
    return [c for c in commands if c]


def inline_spans(text: str) -> list[str]:
    """`code` spans of the prose (fenced blocks removed)."""
    prose = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", prose)


def _parse_error(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(argv)
        except SystemExit as exit_:
            return None if exit_.code == 0 else err.getvalue().strip().splitlines()[-1]
    return None


@functools.cache
def _experiment_ids() -> frozenset[str]:
    return frozenset(e.exp for e in list_experiments())


def check_dida(argv: list[str]) -> None:
    """`dida ARGV` parses, its `--set` keys exist, its `--exp` is shipped, repo paths exist."""
    parser = build_parser()
    error = _parse_error(parser, argv)
    assert error is None, f"dida {shlex.join(argv)}: {error}"
    if "--help" in argv or "-h" in argv:
        return
    args = parser.parse_args(argv)
    apply_overrides(ExperimentConfig(), list(getattr(args, "overrides", [])))
    if args.command == "train" and args.exp is not None:
        assert args.exp in _experiment_ids(), f"dida {shlex.join(argv)}: no experiment {args.exp}"
    for token in argv:
        if token.startswith(("configs/", "src/", "tools/", "benchmarks/", "tests/")):
            assert (REPO / token).exists(), f"dida {shlex.join(argv)}: {token} does not exist"


class _Parsed(Exception):
    """Raised right after a script's argparse succeeded, so that the script does not run."""


def check_script(run: object, argv0: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a script's entry point until its argparse has parsed `args`, then stop it."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):  # noqa: ANN001, ANN202
        original(self, args, namespace)
        raise _Parsed

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        patch.setattr(sys, "argv", [argv0, *args])
        patch.syspath_prepend(str(REPO))
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                run()
        except _Parsed:
            return
        except SystemExit as exit_:
            if exit_.code == 0 and "--help" in args:
                return
            pytest.fail(f"{argv0} {shlex.join(args)}: {err.getvalue().strip()}")
    pytest.fail(f"{argv0} {shlex.join(args)}: finished without parsing arguments")


def _project_requirements() -> tuple[set[str], set[str]]:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    reqs = project["dependencies"] + [r for group in extras.values() for r in group]
    names = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}
    return names, set(extras)


def check_pip(args: list[str]) -> None:
    assert args[:1] == ["install"], f"pip {shlex.join(args)}: only `pip install` is documented"
    pytest.importorskip("tomllib")
    names, extras = _project_requirements()
    for i, arg in enumerate(args[1:], 1):
        if arg.startswith("-") or args[i - 1] in ("--index-url", "--extra-index-url"):
            continue
        if arg.startswith("."):
            wanted = re.findall(r"\[(.*)\]", arg)
            for extra in wanted[0].split(",") if wanted else []:
                assert extra.strip() in extras, f"pip install {arg}: no extra '{extra}'"
            continue
        name = re.split(r"[<>=!~\[]", arg, maxsplit=1)[0].lower().replace("_", "-")
        assert name in names, f"pip install {arg}: not a dependency in pyproject.toml"


def check_python(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    if args[0] == "-m":
        module, rest = args[1], args[2:]
        if module == "dida":
            check_dida(rest)
        elif module == "venv":
            pass
        elif module == "pytest":
            conftest = (REPO / "tests" / "conftest.py").read_text()
            for opt in (a for a in rest if a.startswith("-")):
                assert opt in PYTEST_OPTIONS or f'"{opt}"' in conftest, f"pytest {opt}: unknown"
        else:
            assert (REPO / f"{module}.py").is_file(), f"python -m {module}: no {module}.py"
            run = lambda: runpy.run_module(module, run_name="__main__", alter_sys=True)
            check_script(run, module, rest, monkeypatch)
        return
    script = REPO / args[0]
    assert script.is_file(), f"python {args[0]}: no such file"
    monkeypatch.syspath_prepend(str(script.parent))  # as `python SCRIPT` puts its folder first
    check_script(lambda: runpy.run_path(str(script), run_name="__main__"), str(script), args[1:],
                 monkeypatch)  # fmt: skip


def check_sh(args: list[str]) -> None:
    script = REPO / args[0]
    assert args[0] in SEED_SCRIPTS and script.is_file(), f"sh {args[0]}: not a seed script"
    subprocess.run(["sh", "-n", str(script)], check=True)
    forwarded = SEED_SCRIPTS[args[0]]
    if args[0] == "run_config.sh":  # run_config.sh GPUID [CONFIG] [dida train arguments]
        assert len(args) > 1, f"sh {shlex.join(args)}: missing GPUID"
        rest = args[2:]
        if rest and not rest[0].startswith("-"):
            rest = ["--config", rest[0], *rest[1:]]
        check_dida(["train", *(rest if "--config" in rest else ["--exp", "7", *rest])])
        return
    positional = 2 if args[0] == "run_exp.sh" else 1  # run_exp.sh EXPID GPUID; test.sh RUN_DIR
    assert len(args) > positional, f"sh {shlex.join(args)}: missing arguments"
    check_dida([*forwarded, args[1], *args[positional + 1 :]])


def check_bash(args: list[str]) -> None:
    """`bash SCRIPT [OPTION]`: a documented script, valid bash, with options it knows."""
    assert args and args[0] in BASH_SCRIPTS, f"bash {shlex.join(args)}: not a documented script"
    script = REPO / args[0]
    assert script.is_file(), f"bash {args[0]}: no such file"
    subprocess.run(["bash", "-n", str(script)], check=True)
    unknown = set(args[1:]) - BASH_SCRIPTS[args[0]]
    assert not unknown, f"bash {shlex.join(args)}: unknown options {sorted(unknown)}"
    for option in args[1:]:
        assert option in script.read_text(), f"bash {args[0]}: does not handle {option}"


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):", text, flags=re.M))


def check_make(args: list[str]) -> None:
    """`make TARGET [VAR=value ...]`: the target exists in the Makefile; variables are known."""
    targets = [a for a in args if "=" not in a]
    assert targets, f"make {shlex.join(args)}: no target"
    for target in targets:
        assert target in _make_targets(), f"make {target}: no such target in the Makefile"
    makefile = (REPO / "Makefile").read_text()
    for assignment in (a for a in args if "=" in a):
        name = assignment.split("=", 1)[0]
        assert re.search(rf"^{name} \?=", makefile, flags=re.M), f"make: unknown variable {name}"


def check_command(tokens: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Assert that one documented shell command is covered; fail with the command otherwise."""
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):  # VAR=value prefixes
        if tokens[1:2] == ["make"]:  # `VAR=value make TARGET` sets a Makefile variable
            assert re.search(rf"^{tokens[0].split('=')[0]} \?=", (REPO / "Makefile").read_text(),
                             flags=re.M), f"make: unknown variable in {tokens[0]}"  # fmt: skip
        tokens = tokens[1:]
    head, args = tokens[0], tokens[1:]
    if head == "dida":
        check_dida(args)
    elif head in ("python", "python3"):
        check_python(args, monkeypatch)
    elif head == "torchrun":
        assert "-m" in args and args[args.index("-m") + 1] == "dida", shlex.join(tokens)
        assert any(a.startswith("--nproc_per_node") for a in args), shlex.join(tokens)
        check_dida(args[args.index("-m") + 2 :])
    elif head == "sh":
        check_sh(args)
    elif head == "bash":
        check_bash(args)
    elif head == "pip":
        check_pip(args)
    elif head == "make":
        check_make(args)
    else:
        assert head in SHELL_BUILTINS, f"`{shlex.join(tokens)}`: no test covers this command"


@pytest.mark.parametrize("doc", DOCS)
def test_every_shell_command_is_covered(doc: str, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = shell_commands((REPO / doc).read_text())
    assert commands, f"{doc}: no ```bash commands found"
    for tokens in commands:
        check_command(tokens, monkeypatch)


def test_readme_keeps_the_two_commands() -> None:
    """The README's first commands are `make quickstart` and `make test`; the Makefile runs
    `dida quickstart` and `python -m pytest` in the environment it sets up, and CI runs
    `make test` too."""
    commands = [shlex.join(c) for c in shell_commands((REPO / "README.md").read_text())]
    assert commands[:2] == ["make quickstart", "make test"]
    makefile = (REPO / "Makefile").read_text()
    recipes = dict(re.findall(r"^([a-z][\w-]*):.*\n\t(.*)", makefile, flags=re.M))
    assert recipes["quickstart"] == "$(BIN)/dida quickstart $(ARGS)"
    assert recipes["test"] == "$(BIN)/python -m pytest -n $(TEST_JOBS) --maxprocesses 4 $(ARGS)"
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test ARGS=--runslow" in ci and "make lint" in ci
    assert "python -m pytest" in commands and "dida quickstart" in commands  # the manual path


def _check_inline_dida(span: str) -> None:
    """`dida SUB [ACTION] --opt ...`: the subcommand, action and every option exist."""
    tokens = shlex.split(span)[1:]
    parser = build_parser()
    words = [t for t in tokens if not t.startswith("-")]
    if not words:
        return
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert words[0] in sub.choices, f"`{span}`: no subcommand {words[0]}"
    parser = sub.choices[words[0]]
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if actions and len(words) > 1:
        assert words[1] in actions[0].choices, f"`{span}`: no action {words[1]}"
        parser = actions[0].choices[words[1]]
    for opt in (t.split("=")[0] for t in tokens if t.startswith("-")):
        assert opt in parser._option_string_actions, f"`{span}`: no option {opt}"


def _check_config_key(span: str) -> None:
    key, _, value = span.partition("=")
    if value:
        apply_overrides(ExperimentConfig(), [span])
        return
    node: object = ExperimentConfig()
    for part in key.split("."):
        assert hasattr(node, part), f"`{span}`: no config key {key}"
        node = getattr(node, part)


@pytest.mark.parametrize("doc", DOCS)
def test_inline_commands_and_config_keys_exist(doc: str) -> None:
    sections = "|".join(sorted(CONFIG_SECTIONS))
    key_pattern = re.compile(rf"^(?:--set )?((?:{sections})(?:\.[a-z_0-9]+)+(?:=\S+)?)$")
    for span in inline_spans((REPO / doc).read_text()):
        if span.startswith("dida "):
            _check_inline_dida(span)
        match = key_pattern.match(span)
        if match and not span.endswith(FILE_SUFFIXES):
            _check_config_key(match.group(1))


@pytest.mark.parametrize("doc", DOCS)
def test_yaml_blocks_are_valid_configs(doc: str, tmp_path: Path) -> None:
    for i, block in enumerate(_blocks((REPO / doc).read_text(), "yaml")):
        path = tmp_path / f"block{i}.yaml"
        path.write_text(block)
        load_config(path)


def _write_folder_dataset(cfg, n: int, with_labels: bool) -> None:  # noqa: ANN001
    """Tiny images (and labels with every class) for one `kind: folder` DatasetConfig."""
    rng = np.random.default_rng(0)
    root = Path(cfg.root)
    for i in range(n):
        image = root / cfg.img_dir / f"{i:03d}{cfg.img_suffix}"
        image.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(image), rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
        if with_labels:
            label = np.repeat(np.arange(len(cfg.classes), dtype=np.uint8), 16)[None]  # [1, 64]
            label = np.repeat(label, 48, axis=0)  # [48, 64]
            label[:4] = 255
            path = root / cfg.ann_dir / f"{i:03d}{cfg.seg_suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), label)


def test_custom_dataset_recipe_trains_with_rcs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's folder-dataset YAML and its RCS statistics command give a working dataset;
    without the statistics, training names that very command."""
    from dida.cli.main import main
    from dida.data.uda import build_train_dataset, build_val_dataset

    text = (REPO / "README.md").read_text()
    yaml = next(b for b in _blocks(text, "yaml") if "kind: folder" in b)
    command = next(b for b in _blocks(text, "bash") if "dida convert folder" in b)
    command = command.split("#")[0].strip()
    monkeypatch.chdir(tmp_path)  # the recipe's paths are relative to the working directory
    Path("my_experiment.yaml").write_text(yaml)
    overrides = ["data.rcs.enabled=true", "data.rcs.min_pixels=100", "data.crop_size=[32,32]",
                 "data.source.scale=[64,48]", "data.target.scale=[64,48]"]  # fmt: skip
    cfg = load_config("my_experiment.yaml", overrides)
    _write_folder_dataset(cfg.data.source, 3, with_labels=True)
    _write_folder_dataset(cfg.data.target, 2, with_labels=False)
    _write_folder_dataset(cfg.data.val, 2, with_labels=True)
    with pytest.raises(DataError, match=f"run `{command}` once"):
        build_train_dataset(cfg.data, seed=0)
    assert main(shlex.split(command)[1:]) == 0
    assert Path(cfg.data.source.root, "samples_with_class.json").is_file()
    train_set = build_train_dataset(cfg.data, seed=0)
    assert train_set.rcs is not None
    assert sorted(train_set.rcs.classes.tolist()) == list(range(cfg.model.num_classes))
    item = train_set[0]
    assert item["src_img"].shape == (3, 32, 32) and item["tgt_img"].shape == (3, 32, 32)
    assert int(item["src_label"].max()) in (*range(cfg.model.num_classes), 255)
    val = build_val_dataset(cfg.data.val, cfg.eval.scale)
    assert len(val) == 2 and val.classes == tuple(cfg.data.source.classes)
