"""The training entrypoints' command line, checked before torch, transformers and Hydra are imported.

Two things are answered here: `--help`, and overrides of keys that no configuration has (a typo), refused in one
message naming the closest known key (Hydra's own refusal suggests `+key=...`, which would add the typo).

Hydra's own help comes only after the entrypoint's imports (seconds of torch and transformers) and lists the keys
without a word of what they mean. What they mean is written once, as the comments of hydra_config/defaults.yaml, so
this module reads that file with PyYAML alone (fast to import) and prints the script's docstring, the shipped
configurations, how overrides work and every key with its default and comment. Only `--help` and `-h` are answered
here; Hydra's own options (`--hydra-help`, `--cfg job`, `--info`, `--shell-completion`) still reach Hydra.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from errors import exit_refused

CONFIG_DIR = Path(__file__).resolve().parent / "hydra_config"
HELP_FLAGS = frozenset({"--help", "-h"})
HYDRA_FLAGS = frozenset({"--shell-completion", "-sc", "--hydra-help"})  # Hydra answers these, even next to --help
SECTION_HEADER = re.compile(r"-{2,}\s*(.+?)\s*-{2,}")  # `# --- model ---`
DOCUMENTED_KEY = re.compile(r"([A-Za-z_]\w*(?:\.\w+)+):\s+(.+)")  # `# fp8_config.recipe:  what it does`
KEYS_DOCUMENTED = "Every key is documented in hydra_config/defaults.yaml."
MAX_DEFAULT_WIDTH = 24  # a longer default pushes its comment to the next line instead of widening every row


@dataclass
class Key:
    """One key as the YAML file writes it: what a user overrides and what the file says about it."""

    name: str  # dotted, e.g. dataset.path
    default: str  # the value as written (`???`, `4.0e-4`, `checkpoints/${model_tag}`); "" for a mapping
    indent: int  # column of the key: deeper comment lines below it continue its comment
    comment: list[str] = field(default_factory=list)  # the inline comment and its continuation lines
    notes: list[str] = field(default_factory=list)  # comment lines just above the key
    is_mapping: bool = False
    is_group: bool = False  # an item of the defaults list (`- precision: bf16`), overridden as group=option
    comment_only: bool = False  # documented in a comment (`# fp8_config.recipe: ...`), set by a group option


@dataclass
class Section:
    """Keys under one `# --- title ---` header of the file."""

    title: str
    keys: list[Key] = field(default_factory=list)


@dataclass
class ConfigFile:
    """A Hydra YAML file read for its documentation: what it is, and its keys in file order."""

    intro: list[str]
    sections: list[Section]

    def groups(self) -> list[Key]:
        return [key for key in self.all_keys() if key.is_group]

    def all_keys(self) -> list[Key]:
        return [key for section in self.sections for key in section.keys]

    def values(self) -> dict[str, str]:
        """Dotted key -> value as written, for every leaf key (config-group choices included)."""
        return {key.name: key.default for key in self.all_keys() if not key.is_mapping and key.default}


def _inline_comment(line: str) -> str | None:
    """The comment after a key's value (`line` starts where the value ends), or None."""
    match = re.match(r"\s*:?\s*#\s?(.*)", line)
    return match.group(1).strip() if match else None


def _wrap(text: str, width: int, **options: str) -> list[str]:
    """Wrap at spaces only: keys, paths and `micro-batch` stay whole, and the page reads back as the file's text."""
    return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False, **options)


def _source(text: str, node: yaml.Node) -> str:
    value = text[node.start_mark.index : node.end_mark.index].strip()
    return value or "null"


def read_config(path: Path) -> ConfigFile:
    """Parse `path` (a Hydra YAML file) into its documented keys, grouped by the file's `# --- title ---` headers.

    Comments are not part of YAML's data, so the keys come from PyYAML's node tree (which knows each key's line and
    where its value ends) and the comments from the raw lines around them: a comment after a value, deeper comment
    lines continuing it, comment lines at a key's own depth as notes above the next key, and `# dotted.key: text`
    lines as keys the file documents but does not set (their defaults come from the config-group options the file
    selects, e.g. hydra_config/precision/bf16.yaml).
    """
    text = path.read_text()
    lines = text.splitlines()
    config = _document(lines, _keys_by_line(text, lines))
    values = group_option_values(config, path.parent)
    for key in config.all_keys():
        if key.comment_only:
            key.default = values.get(key.name, "")
    return config


def _keys_by_line(text: str, lines: list[str]) -> dict[int, Key]:
    """Every key the file sets, by its line number, with its value as written and its inline comment."""
    root = yaml.compose(text)
    by_line: dict[int, Key] = {}

    def add(key: Key, line: int, value_end: int) -> None:
        comment = _inline_comment(lines[line][value_end:])
        key.comment = [comment] if comment else []
        by_line[line] = key

    def walk(node: yaml.MappingNode, prefix: str) -> None:
        for key_node, value_node in node.value:
            name, line, indent = prefix + key_node.value, key_node.start_mark.line, key_node.start_mark.column
            if isinstance(value_node, yaml.MappingNode) and not value_node.flow_style:  # `{}` is a value
                add(Key(name, "", indent, is_mapping=True), line, key_node.end_mark.column)
                walk(value_node, f"{name}.")
            elif name == "defaults" and isinstance(value_node, yaml.SequenceNode):
                for item in value_node.value:  # `- precision: bf16`: a config-group choice, overridden as group=option
                    if isinstance(item, yaml.MappingNode) and len(item.value) == 1:
                        group, option = item.value[0]
                        key = Key(group.value, _source(text, option), group.start_mark.column, is_group=True)
                        add(key, group.start_mark.line, option.end_mark.column)
            elif isinstance(value_node, yaml.SequenceNode) and not value_node.flow_style:
                items = ", ".join(_source(text, item) for item in value_node.value)
                add(Key(name, f"[{items}]", indent), line, key_node.end_mark.column)
            else:
                value_end = value_node.end_mark.column if value_node.end_mark.line == line else len(lines[line])
                add(Key(name, _source(text, value_node), indent), line, value_end)

    if isinstance(root, yaml.MappingNode):
        walk(root, "")
    return by_line


def _document(lines: list[str], by_line: dict[int, Key]) -> ConfigFile:
    """Attach the comment lines to the keys (continuations, notes above, `# dotted.key:` lines) under their sections."""
    intro: list[str] = []
    sections = [Section("")]
    groups = Section("config groups (group=option)")
    sections.append(groups)
    notes: list[str] = []
    last: Key | None = None  # the key whose comment a deeper comment line continues
    at_start = True  # the leading comment lines are the file's description
    for number, line in enumerate(lines):
        stripped = line.strip()
        if number in by_line:
            key = by_line[number]
            key.notes, notes = notes, []
            if key.name == "hydra":
                sections.append(Section("hydra (Hydra's own settings, see --hydra-help)"))
            (groups if key.is_group else sections[-1]).keys.append(key)
            last, at_start = (key if key.comment else None), False
            continue
        if not stripped.startswith("#"):  # a blank line, or a list item
            last, at_start = None, False
            continue
        column, comment = line.index("#"), stripped[1:].strip()
        indented = stripped[1:].startswith("  ")  # `#      more text`: continues a `# dotted.key: text` comment
        if at_start:
            if not comment.startswith("@package"):
                intro.append(comment)
        elif last is not None and (column > last.indent or (last.comment_only and indented)):
            last.comment.append(comment)
        elif header := SECTION_HEADER.fullmatch(comment):
            sections.append(Section(header.group(1)))
            last = None
        elif documented := DOCUMENTED_KEY.fullmatch(comment):
            name, what = documented.groups()
            last = Key(name, "", column, [what.strip()], notes, comment_only=True)
            notes = []
            sections[-1].keys.append(last)
        else:
            notes.append(comment)
            last = None
    return ConfigFile(intro, [section for section in sections if section.keys])


def describe(path: Path) -> str:
    """The first sentence of a YAML file's leading comment: what that configuration is for ("" without one)."""
    prose: list[str] = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:]
        if text.strip().startswith("@package"):
            continue
        if prose and text.startswith("   "):  # an indented example command ends the prose
            break
        prose.append(text.strip())
    sentence = re.split(r"(?<=[.!?])\s+(?=[A-Z(`])", " ".join(prose), maxsplit=1)[0]
    return sentence.rstrip(":")


def group_option_values(config: ConfigFile, config_dir: Path) -> dict[str, str]:
    """Values set by the config-group options a file selects (`precision: bf16` -> hydra_config/precision/bf16.yaml)."""
    values: dict[str, str] = {}
    for key in config.groups():
        option = config_dir / key.name / f"{key.default}.yaml"
        if option.is_file():
            is_global = "@package _global_" in option.read_text()
            prefix = "" if is_global else f"{key.name}."
            values |= {prefix + name: value for name, value in read_config(option).values().items()}
    return values


def _option(argv: list[str], names: tuple[str, ...]) -> str | None:
    """The value of an argparse-style option (`--config-name X`, `--config-name=X`, `-cn X`) in argv, if given."""
    for index, arg in enumerate(argv):
        for name in names:
            if arg == name and index + 1 < len(argv):
                return argv[index + 1]
            if arg.startswith(f"{name}="):
                return arg.split("=", 1)[1]
    return None


def _default_config_name(script: Path) -> str | None:
    """The `config_name` of the script's `@hydra.main`, read from its source: the one place it is written."""
    try:
        match = re.search(r"config_name\s*=\s*[\"']([^\"']+)[\"']", script.read_text())
    except OSError:
        return None
    return match.group(1) if match else None


def _rows(rows: list[tuple[str, str]], width: int, indent: int = 2) -> list[str]:
    """`name  text` rows with the text aligned in one column and wrapped to `width`."""
    name_width = max((len(name) for name, _ in rows), default=0)
    column = indent + name_width + 2
    out = []
    for name, text in rows:
        wrapped = _wrap(text, max(width - column, 30)) or [""]
        out.append(f"{' ' * indent}{name:<{name_width}}  {wrapped[0]}".rstrip())
        out += [" " * column + line for line in wrapped[1:]]
    return out


def _key_rows(keys: list[Key], name_width: int, default_width: int, width: int) -> list[str]:
    """Aligned `name  default  comment` rows, the notes above a key first, comments wrapped to `width`."""
    column = 2 + name_width + 2 + default_width + 2
    narrow = width - column < 40  # too little room beside the key: the comment goes below it instead
    comment_column = 6 if narrow else column
    out = []
    for key in keys:
        out += _wrap(" ".join(key.notes), width - 2, initial_indent="  ", subsequent_indent="  ")
        comment = _wrap(" ".join(key.comment), width - comment_column)
        row = f"  {key.name:<{name_width}}  {key.default:<{default_width}}".rstrip()
        if comment and not narrow and len(row) < column - 1:
            out.append(f"{row:<{column}}{comment.pop(0)}")
        else:
            out.append(row)
        out += [" " * comment_column + line for line in comment]
    return out


def help_text(doc: str | None, script: Path, argv: list[str], width: int, config_dir: Path = CONFIG_DIR) -> str:
    """The whole `--help` page of `script`: what it does, which configuration, how to override, every key."""
    name = script.name
    default_config = _default_config_name(script)
    chosen = _option(argv, ("--config-name", "-cn")) or default_config
    defaults = read_config(config_dir / "defaults.yaml")
    out = [
        f"usage: python {name} [--config-name NAME] [key=value ...]",
        f"       torchrun --nproc_per_node=N {name} [--config-name NAME] [key=value ...]",
        "",
        textwrap.dedent(doc or "").strip(),
        "",
        f"Configurations: --config-name NAME (default: {default_config}) picks {config_dir.name}/NAME.yaml",
    ]
    out += _rows([(path.stem, describe(path)) for path in sorted(config_dir.glob("*.yaml"))], width)
    groups = sorted(path for path in config_dir.iterdir() if path.is_dir() and any(path.glob("*.yaml")))
    if groups:
        out.append(f"Config groups: group=option picks {config_dir.name}/GROUP/OPTION.yaml")
        options = [(f"{group.name}={path.stem}", describe(path)) for group in groups for path in group.glob("*.yaml")]
        out += _rows(sorted(options), width)
    if chosen and chosen != "defaults":
        path = config_dir / f"{chosen}.yaml"
        if path.is_file():
            sets = " ".join(f"{key}={value}" for key, value in read_config(path).values().items())
            line = f"{chosen} sets: {sets}. Every other key keeps its default below; --cfg job prints them all."
        else:
            line = f"{chosen}: there is no {config_dir.name}/{chosen}.yaml."
        out += ["", *_wrap(line, width, subsequent_indent="  ")]
    out += ["", "Overrides: key=value after the options, as many as needed (no spaces around =)"]
    out += _rows(
        [
            ("num_train_steps=50", "a top-level key"),
            ("dataset.micro_batch_size=16", "a nested key, by its dotted name"),
            ("precision=fp8_current", "a config-group option"),
            ("optimizer.betas=[0.9,0.95]", "values in YAML: lists, null, true/false, numbers, strings"),
        ],
        width,
    )
    prose = (
        "Unknown keys are refused with the closest known key named: key=value for a key the configuration does "
        "not have before anything is imported, and a key forced in with +key=value by the start-up check "
        "(config_validation.py), at the top level and in the training sections. A refusal prints its message "
        "alone and exits with status 1; HYDRA_FULL_ERROR=1 shows its traceback too. "
        "Hydra's own options still work: --cfg job (print the composed configuration), --info, --hydra-help, "
        "--shell-completion (TAB completion, e.g. -sc install=bash)."
    )
    out += _wrap(prose, width, initial_indent="  ", subsequent_indent="  ")
    out += ["", f"Keys of {config_dir.name}/defaults.yaml, every configuration's starting point:"]
    out += _wrap(" ".join(defaults.intro), width, initial_indent="  ", subsequent_indent="  ")
    keys = [key for key in defaults.all_keys() if not key.is_mapping or key.comment or key.notes]
    name_width = max(len(key.name) for key in keys)
    default_width = min(max(len(key.default) for key in keys), MAX_DEFAULT_WIDTH)
    for section in defaults.sections:
        shown = [key for key in section.keys if key in keys]
        if shown:
            out += ["", section.title or "general", *_key_rows(shown, name_width, default_width, width)]
    return "\n".join(out) + "\n"


def exit_if_help(doc: str | None, module_name: str, argv: list[str] | None = None) -> None:
    """Print the help page and exit 0 if the command line asks for `--help`/`-h`; otherwise do nothing.

    Call it first in an entrypoint, before its heavy imports, as `exit_if_help(__doc__, __name__)`: only a script run
    as `__main__` answers (benchmark.py imports the entrypoints for their strategies and has its own command line).
    """
    argv = sys.argv[1:] if argv is None else argv
    if module_name != "__main__" or not HELP_FLAGS.intersection(argv) or HYDRA_FLAGS.intersection(argv):
        return
    width = max(shutil.get_terminal_size((120, 24)).columns, 80)
    try:
        script = getattr(sys.modules["__main__"], "__file__", None) or sys.argv[0]
        sys.stdout.write(help_text(doc, Path(script), argv, width))
        sys.stdout.flush()
    except BrokenPipeError:  # `--help | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(0)


def config_keys(config_name: str | None, config_dir: Path = CONFIG_DIR) -> tuple[set[str], set[str]]:
    """(every dotted key, the mappings whose every key is listed) of defaults.yaml, `config_name` and all group options.

    Every option of a group counts (a command line may pick another one); a mapping written as a flow value (`{}`)
    is free-form, so only block mappings have their keys listed in full.
    """
    keys: set[str] = set()
    mappings: set[str] = set()
    files = [(config_dir / "defaults.yaml", ""), (config_dir / f"{config_name}.yaml", "")]
    for group in (path for path in config_dir.iterdir() if path.is_dir()):
        for option in group.glob("*.yaml"):
            files.append((option, "" if "@package _global_" in option.read_text() else f"{group.name}."))
    for path, prefix in files:
        if path.is_file():
            for key in read_config(path).all_keys():
                keys.add(prefix + key.name)
                if key.is_mapping:
                    mappings.add(prefix + key.name)
    return keys, mappings


def unknown_key_problem(key: str, known: set[str], listing: str) -> str:
    """One line for a key the configuration does not have: the closest known key, and where the known ones are."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"{key}: unknown key.{f' Did you mean {close[0]}?' if close else ''} {listing}"


def unknown_override_problems(argv: list[str], config_name: str | None, config_dir: Path = CONFIG_DIR) -> list[str]:
    """A problem for each `key=value` override naming a key the configuration does not have.

    `+key=...` (add) and `~key` (delete) are left to Hydra and the start-up check, as are Hydra's own keys, config
    groups addressed by path (`group/sub=...`) and keys under free-form mappings, whose children this cannot know.
    """
    keys, mappings = config_keys(config_name, config_dir)
    problems = []
    for arg in argv:
        key = arg.split("=", 1)[0]
        if "=" not in arg or arg.startswith(("-", "+", "~")) or key.split(".")[0] == "hydra" or "/" in key:
            continue
        parent = key.rpartition(".")[0]
        if key in keys or (parent and parent not in mappings and parent in keys):
            continue
        siblings = sorted(k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent) if parent else []
        listing = f"Known: {', '.join(siblings)}." if siblings else KEYS_DOCUMENTED
        problems.append(unknown_key_problem(key, keys, listing))
    return problems


def check_command_line(doc: str | None, module_name: str, argv: list[str] | None = None) -> None:
    """Answer `--help`, and refuse overrides of unknown keys (exit 1), before an entrypoint's heavy imports.

    Call it first in an entrypoint as `check_command_line(__doc__, __name__)`; it does nothing where the entrypoint
    is imported rather than run (benchmark.py imports them for their strategies).
    """
    argv = sys.argv[1:] if argv is None else argv
    exit_if_help(doc, module_name, argv)
    if module_name != "__main__":
        return
    script = Path(getattr(sys.modules["__main__"], "__file__", None) or sys.argv[0])
    config_name = _option(argv, ("--config-name", "-cn")) or _default_config_name(script)
    problems = unknown_override_problems(argv, config_name)
    if problems:
        exit_refused("Invalid command line:\n  - " + "\n  - ".join(problems))
