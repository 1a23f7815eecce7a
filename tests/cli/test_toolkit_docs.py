"""Every code block of the README and of docs/*.md is checked; the quick ones run as written.

Run in full: the README's "Train from Python" and plugin sections, those of docs/python-api.md
and docs/tracking.md's own tracker. Each section (``###`` in the README, ``##`` in the docs)
runs in an empty folder: a block whose first line is ``# name.py`` or ``# name.yaml`` is written
to that file, other ``python`` blocks run as scripts, ``bash`` blocks run line by line
(``VAR=value`` prefixes set the environment; ``mlcil`` is this environment's console script,
which unlike ``python -m`` does not put the current folder on ``sys.path``).

Every other block (a COCO run, an hours-long grid, a benchmark) is checked without running it
(:func:`test_every_code_block_of_the_docs_is_checked`): each ``mlcil`` command (also after
``torchrun ... -m mlcil.cli`` and in ``console`` transcripts) parses with mlcil's own parser, the
configs it names resolve and validate with its overrides and their trackers exist, a benchmark's
options are ones its ``--help`` lists, set-up commands are the known ones, Python compiles and
YAML validates as a config.
"""

from __future__ import annotations

import ast
import functools
import glob
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mlcil.cli import COMMANDS, build_parser
from mlcil.config.loading import parse_yaml
from mlcil.config.packaged import expand_config_pattern
from mlcil.engine.observers import active_trackers
from mlcil.experiment import load_config
from mlcil.launch import split_arguments
from mlcil.trackers import check_trackers
from tiny import REPO

# Each document whose sections run, with the heading level of its sections.
DOCS = ((REPO / "README.md", "### "), (REPO / "docs" / "python-api.md", "## "),
        (REPO / "docs" / "tracking.md", "### "))  # fmt: skip
# The sections the tests below run in full (the generic check leaves their blocks to them).
RUN_IN_FULL = ("Shipped configs by name", "Train from Python", "Your own dataset",
               "Your own method (or network) as a plugin", "Your own tracker")  # fmt: skip
FILE_BLOCK = re.compile(r"# ([\w.-]+\.(?:py|yaml))$")


def sections() -> dict[str, list[tuple[str, str]]]:
    """Section title -> its fenced blocks as ``(language, code)``."""
    found: dict[str, list[tuple[str, str]]] = {}
    for path, heading in DOCS:
        # A section ends at the next heading (## or deeper: single-# lines in blocks are comments).
        for part in re.split(rf"^{heading}", path.read_text(), flags=re.M)[1:]:
            title = part.splitlines()[0].strip()
            body = re.split(r"^#{2,6} ", part, flags=re.M)[0]  # "# x" lines are code comments
            found[title] = re.findall(r"^```(\w+)\n(.*?)^```", body, flags=re.M | re.S)
    return found


def command(line: str) -> tuple[list[str], dict[str, str]]:
    words = shlex.split(line)
    environment = {}
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        key, value = words.pop(0).split("=", 1)
        environment[key] = value
    assert words[0] == "mlcil", line
    script = Path(sys.executable).parent / "mlcil"
    program = [str(script)] if script.is_file() else [sys.executable, "-m", "mlcil"]
    return program + words[1:], environment


def run_section(title: str, folder: Path) -> list[str]:
    """Run every block of a section in ``folder``; returns the standard output of each run."""
    base = {**os.environ, "OMP_NUM_THREADS": "1"}
    base.pop("MLCIL_PLUGINS", None)
    outputs = []
    for language, code in sections()[title]:
        first = code.splitlines()[0]
        match = FILE_BLOCK.fullmatch(first)
        if match:
            (folder / match.group(1)).write_text(code)
        elif language == "python":
            script = folder / f"snippet_{len(outputs)}.py"
            script.write_text(code)
            outputs.append(run([sys.executable, str(script)], folder, base))
        elif language == "bash":
            for line in code.splitlines():
                args, environment = command(line)
                outputs.append(run(args, folder, {**base, **environment}))
    return outputs


def run(args: list[str], folder: Path, environment: dict[str, str]) -> str:
    result = subprocess.run(
        args, cwd=folder, env=environment, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_the_doc_has_the_sections_the_tests_run() -> None:
    found = sections()
    for title in (
        "Shipped configs by name",
        "Train from Python",
        "Your own dataset",
        "Your own method (or network) as a plugin",
        "Your own tracker",
    ):
        assert found[title], title


def test_shipped_configs_by_name(tmp_path: Path) -> None:
    listing, printed, plan = run_section("Shipped configs by name", tmp_path)
    assert re.search(r"^  digits-pretrained-krt +The pretrained-regime benchmark", listing, re.M)
    assert "epochs: 2" in printed and "pretrained: pretrain:glyphs" in printed
    assert plan.startswith("plan: 4 runs = 2 configs x 1 protocol x 2 seeds")
    assert "digits_B0-C2_lwf_s1  (new)" in plan
    assert not (tmp_path / "runs").exists()  # nothing was trained


def test_train_from_python(tmp_path: Path) -> None:
    [out] = run_section("Train from Python", tmp_path)
    lines = out.splitlines()
    assert lines[0] == "2 False"
    last_map = float(re.fullmatch(r"last mAP ([\d.]+), per session \[.*\]", lines[1]).group(1))
    assert 0 < last_map <= 100 and lines[1].count(",") == 4  # mAP after each of 4 sessions
    labels = ast.literal_eval(lines[2])  # the snippet prints a list of class names
    assert isinstance(labels, list) and set(labels) <= {str(d) for d in range(10)}
    assert (tmp_path / "runs" / "from-python" / "metrics.json").is_file()


def test_your_own_dataset(tmp_path: Path) -> None:
    [out] = run_section("Your own dataset", tmp_path)
    assert out.strip() == "squares [['red', 'green'], ['blue'], ['white']]"
    assert (tmp_path / "runs" / "squares" / "checkpoints" / "session_02").is_dir()


def test_your_own_method_as_a_plugin(tmp_path: Path) -> None:
    listing, first, second = run_section("Your own method (or network) as a plugin", tmp_path)
    # Each method is listed with its default old-class rule in brackets before its description.
    plugin_line = r"^  bce-finetune +\[[^]]+\] Fine-tuning with binary cross-entropy"
    assert re.search(plugin_line, listing, re.M)
    assert "stopped after session 0" in first and "stopped after session 1" in second
    log = (tmp_path / "runs" / "bce" / "train.log").read_text()
    assert "bce" in log and "session 1 done" in log
    assert "positive_weight: 2" in (tmp_path / "runs" / "bce" / "config.yaml").read_text()


def test_docs_tracking_own_tracker_runs(tmp_path: Path) -> None:
    [out] = run_section("Your own tracker", tmp_path)
    # The tracker printed the run's name, the global step and each session's mAP.
    printed = [line.split() for line in out.splitlines() if line.startswith("digits_")]
    assert printed and all(len(words) == 3 for words in printed)
    assert all(0.0 <= float(words[2]) <= 100.0 for words in printed)


# --- every block of every document, checked ------------------------------------------------

# Set-up and look-around commands a document may show, by their first words (anything else
# fails the check).
SETUP = ("make demo", "make test", "make lint", "python3 -m venv", "python -m venv", "source ",
         "export ", ".venv/bin/pip install", "pip install", "pip wheel", "head ", "ls ", "cat ",
         "du ")  # fmt: skip


def all_blocks() -> list[tuple[str, str, str, str]]:
    """``(document, section, language, code)`` of every fenced block of README.md and
    docs/*.md (a section is the text under the nearest heading of any level)."""
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        section = ""
        parts = re.split(r"^(```\w*\n.*?^```)", path.read_text(), flags=re.M | re.S)
        for part in parts:
            if part.startswith("```"):
                language = part[3 : part.index("\n")]
                code = part[part.index("\n") + 1 : -3]
                found.append((path.name, section, language, code))
            else:
                headings = re.findall(r"^#{1,6} (.+)$", part, flags=re.M)
                section = headings[-1].strip() if headings else section
    return found


def command_lines(language: str, code: str) -> list[str]:
    """The commands of a shell block (continuations joined), or a transcript's ``$`` lines."""
    joined = code.replace("\\\n", " ")
    lines = [line.strip() for line in joined.splitlines()]
    if language == "console":
        return [line[2:] for line in lines if line.startswith("$ ")]
    return [line for line in lines if line and not line.startswith("#")]


def expand(words: list[str]) -> list[str]:
    """Shell brace and glob expansion, as bash does it in the repository's folder."""
    out: list[str] = []
    for word in words:
        braces = re.fullmatch(r"(.*)\{([^{}]*,[^{}]*)\}(.*)", word)
        variants = (
            [f"{braces[1]}{v}{braces[3]}" for v in braces[2].split(",")] if braces else [word]
        )
        for variant in variants:
            matches = sorted(glob.glob(variant, root_dir=REPO)) if "*" in variant else []
            out.extend(matches or [variant])
    return out


@functools.cache
def benchmark_help(script: str) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / script), "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def check_mlcil(words: list[str], where: str) -> None:
    """A documented ``mlcil`` command parses, and what it trains validates."""
    try:
        args = build_parser().parse_args(words)
    except SystemExit:
        pytest.fail(f"{where}: mlcil does not accept: mlcil {shlex.join(words)}")
    if args.plugins or getattr(args, "command_plugins", None):
        return  # the user's own module and config: the plugin section runs such commands
    overrides = [w for w in getattr(args, "overrides", []) if "=" in w]
    if args.command == "train" and args.config:
        configs = [str(REPO / c) if (REPO / c).is_file() else c for c in args.config]
        config = load_config(configs, overrides)
        check_trackers(active_trackers(config.train))
    elif args.command == "compare":
        for spec in [name for given in args.configs for name in expand_config_pattern(given)]:
            files = [str(REPO / f) if (REPO / f).is_file() else f for f in spec.split("+")]
            base = [str(REPO / args.base)] if args.base else []
            config = load_config([*base, *files], args.set)
            for protocol in args.protocols or []:
                load_config([*base, *files], [*args.set, f"protocol={protocol}"])
            check_trackers(active_trackers(config.train))


def check_command(line: str, where: str) -> None:
    command = line.split(" | ")[0].split(" && ")
    for part in command:
        words = shlex.split(part, comments=True)
        while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
            words.pop(0)  # environment settings
        text = " ".join(words)
        if words[:2] == ["mlcil", "torchrun"]:
            _, program = split_arguments(words[2:], COMMANDS)
            check_mlcil(expand(program), where)
        elif words[:1] == ["mlcil"]:
            check_mlcil(expand(words[1:]), where)
        elif words[:1] == ["torchrun"] and "mlcil.cli" in words:
            check_mlcil(words[words.index("mlcil.cli") + 1 :], where)
        elif words[:1] in (["python"], ["python3"]) and words[1].startswith("benchmarks/"):
            options = {w.split("=")[0] for w in words[2:] if w.startswith("--")}
            listed = benchmark_help(words[1])
            assert all(option in listed for option in options), (where, options)
        else:
            assert text.startswith(SETUP), f"{where}: an unchecked command: {text}"


def test_every_code_block_of_the_docs_is_checked(tmp_path: Path) -> None:
    # The check refuses what mlcil refuses (docs/tracking.md once showed this).
    with pytest.raises(pytest.fail.Exception, match="mlcil does not accept"):
        check_command('mlcil train --config digits-b0-c2 --set "train.trackers=[csv]"', "x")
    with pytest.raises(ValueError, match="unknown tracker 'tensorbord'"):
        check_command("mlcil train --config digits-b0-c2 train.trackers=[tensorbord]", "x")
    checked = {"command": 0, "python": 0, "yaml": 0}
    for document, section, language, code in all_blocks():
        where = f"{document}, {section!r}"
        if section in RUN_IN_FULL or language in ("", "text"):
            continue  # run by the tests above; or a file listing, a layout, an output
        if language in ("bash", "console"):
            for line in command_lines(language, code):
                check_command(line, where)
                checked["command"] += 1
        elif language == "python":
            compile(code, where, "exec")  # fragments (methods-api.md) compile too
            checked["python"] += 1
        elif language == "yaml":
            (tmp_path / "block.yaml").write_text(code)
            assert isinstance(parse_yaml(code, where), dict), where
            load_config(tmp_path / "block.yaml")  # a valid config (on the defaults)
            checked["yaml"] += 1
        else:
            pytest.fail(f"{where}: a block in {language!r}, which this test cannot check")
    assert checked["command"] >= 40 and checked["python"] >= 2 and checked["yaml"] >= 2, checked
