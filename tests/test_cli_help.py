"""`python train_X.py --help`: what the script does, the configurations and every key of defaults.yaml with its
default and comment, printed before torch, transformers or Hydra is imported (cli_help.py)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

import cli_help

RECIPE_DIR = Path(__file__).resolve().parents[1]
CONFIG_DIR = RECIPE_DIR / "hydra_config"
DEFAULTS = CONFIG_DIR / "defaults.yaml"
ENTRYPOINTS = ["train_ddp.py", "train_fsdp2.py", "train_mfsdp.py"]
HEAVY_MODULES = {"torch", "transformers", "hydra", "datasets", "training", "model", "checkpoint"}
SECTION_HEADER = re.compile(r"-{2,}\s*(.+?)\s*-{2,}")
DOCUMENTED_KEY = re.compile(r"([A-Za-z_]\w*(?:\.\w+)+):\s+(.+)")


def run_help(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The script run as a user would, with `-X importtime` so that stderr lists every module it imported."""
    env = {**os.environ, "COLUMNS": "120"}
    command = [sys.executable, "-X", "importtime", script, *args]
    return subprocess.run(command, cwd=RECIPE_DIR, env=env, capture_output=True, text=True, timeout=120)


def imported(stderr: str) -> set[str]:
    """Top-level packages named in `-X importtime` lines (`import time: self | cumulative |   package.module`)."""
    lines = [line for line in stderr.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in lines}


def flat(text: str) -> str:
    """Whitespace collapsed: the page wraps and aligns text, the words and their order stay."""
    return " ".join(text.split())


def leaves(node: object, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value, as OmegaConf reads the file (interpolations unresolved, `???` as written)."""
    if not isinstance(node, dict) or not node:  # `{}` (fp8_config.recipe_kwargs) is a value too
        return {prefix[:-1]: node}
    return {name: value for key, child in node.items() for name, value in leaves(child, f"{prefix}{key}.").items()}


def shown_default(out: str, key: str) -> str:
    """The default column of `key`'s row on the help page."""
    match = re.search(rf"^  {re.escape(key)}  +(.*?)(?:  |$)", out, re.MULTILINE)
    assert match, f"no row for {key}"
    return match.group(1)


def written_comment(key: str) -> str:
    """`key`'s comment in defaults.yaml as written: after its value, and the deeper comment lines that continue it."""
    lines = DEFAULTS.read_text().splitlines()
    start = 0
    *parents, leaf = key.split(".")
    for depth, name in enumerate([*parents, leaf]):
        start = next(i for i in range(start, len(lines)) if re.match(rf"{'  ' * depth}{name}:", lines[i]))
    comment = [lines[start].split("#", 1)[1]] if "#" in lines[start] else []
    for line in lines[start + 1 :]:
        if not line.strip().startswith("#") or line.index("#") <= 2 * len(parents):
            break
        comment.append(line.strip()[1:])
    return flat(" ".join(comment))


@pytest.fixture(scope="module")
def pages() -> dict[str, subprocess.CompletedProcess[str]]:
    return {script: run_help(script, "--help") for script in ENTRYPOINTS}


@pytest.mark.parametrize("script", ENTRYPOINTS)
def test_help_says_what_the_script_does_without_importing_torch(pages, script: str) -> None:
    result = pages[script]
    assert result.returncode == 0, result.stderr[-2000:]
    doc = ast.get_docstring(ast.parse((RECIPE_DIR / script).read_text()))
    assert doc.splitlines()[0] in result.stdout
    modules = imported(result.stderr)
    assert "cli_help" in modules and "yaml" in modules  # -X importtime did list the imports
    assert not modules & HEAVY_MODULES, f"--help imported {sorted(modules & HEAVY_MODULES)}"
    assert "--config-name" in result.stdout and "key=value" in result.stdout
    assert "Unknown keys are refused" in result.stdout


@pytest.mark.parametrize("script", ENTRYPOINTS)
def test_help_lists_every_key_of_defaults_yaml_with_its_default(pages, script: str) -> None:
    out = pages[script].stdout
    values = OmegaConf.to_container(OmegaConf.load(DEFAULTS), resolve=False)
    groups = [item for item in values.pop("defaults") if isinstance(item, dict)]
    for group in groups:  # `- precision: bf16` -> the row `precision  bf16`
        for name, option in group.items():
            assert shown_default(out, name) == option
    for key, value in leaves(values).items():
        shown = shown_default(out, key)
        assert yaml.safe_load(shown) == value, f"{key}: shows {shown!r}, defaults.yaml has {value!r}"
        comment = written_comment(key)
        assert flat(f"{key} {shown} {comment}") in flat(out), f"{key}: its comment is not beside it"


def test_help_keeps_every_comment_line_of_defaults_yaml() -> None:
    """Notes above a key, section headers and keys documented only in comments (fp8_config.*) included."""
    out = run_help("train_fsdp2.py", "--help").stdout
    preset = leaves(OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "precision" / "bf16.yaml")))
    titles = set(out.splitlines())
    for line in DEFAULTS.read_text().splitlines():
        if not line.strip().startswith("#"):
            continue
        text = line.strip()[1:].strip()
        if header := SECTION_HEADER.fullmatch(text):
            assert header.group(1) in titles
        elif (documented := DOCUMENTED_KEY.fullmatch(text)) and line.startswith("#"):
            key, what = documented.groups()
            shown = shown_default(out, key)
            assert yaml.safe_load(shown) == preset[key], f"{key}: shows {shown!r}, the bf16 preset has {preset[key]!r}"
            assert flat(f"{key} {shown} {what}") in flat(out)
        else:
            assert flat(text) in flat(out), f"comment line missing: {text}"


def test_help_lists_the_shipped_configurations_and_the_chosen_one() -> None:
    out = run_help("train_ddp.py", "--config-name", "L1_650M", "--help").stdout
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        assert re.search(rf"^  {path.stem}  ", out, re.MULTILINE), f"{path.name} is not listed"
        first = next(line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#"))
        assert flat(" ".join(first.split()[:6])) in flat(out), f"{path.name}: its description is missing"
    for path in sorted((CONFIG_DIR / "precision").glob("*.yaml")):
        assert f"precision={path.stem}" in out
    chosen = OmegaConf.load(CONFIG_DIR / "L1_650M.yaml")
    assert f"L1_650M sets: model_tag={chosen.model_tag}" in flat(out)


def test_short_flag_prints_the_same_page() -> None:
    long, short = run_help("train_mfsdp.py", "--help"), run_help("train_mfsdp.py", "-h")
    assert short.returncode == 0
    assert short.stdout == long.stdout


@pytest.mark.parametrize(
    "argv", [["--hydra-help"], ["--cfg", "job"], ["--info"], ["-sc", "install=bash"], ["--help", "-sc", "query=bash"]]
)
def test_hydra_options_are_left_to_hydra(argv: list[str]) -> None:
    assert cli_help.exit_if_help("Doc.", "__main__", argv) is None


def test_only_the_script_run_as_main_answers(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmark.py imports the entrypoints for their strategies; its own --help must not be theirs."""
    assert cli_help.exit_if_help("Doc.", "train_ddp", ["--help"]) is None
    with pytest.raises(SystemExit) as stop:
        cli_help.exit_if_help("Pretrain something.", "__main__", ["-h"])
    assert stop.value.code == 0
    assert "Pretrain something." in capsys.readouterr().out


@pytest.mark.e2e
def test_hydra_help_still_reaches_hydra() -> None:
    result = run_help("train_ddp.py", "--hydra-help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Hydra (" in result.stdout
    assert "torch" in imported(result.stderr)
