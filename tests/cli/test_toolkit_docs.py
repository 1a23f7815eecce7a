"""The README's "Train from Python" and plugin snippets, and those of docs/python-api.md, run as
written.

Each section (``###`` in the README, ``##`` in docs/python-api.md) runs in an empty folder: a
block whose first line is ``# name.py`` or ``# name.yaml`` is written to that file, other
``python`` blocks run as scripts, ``bash`` blocks run line by line (``VAR=value`` prefixes set the
environment; ``mlcil`` is this environment's console script, which unlike ``python -m`` does not
put the current folder on ``sys.path``).
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tiny import REPO

# Each document with the heading level of its sections.
DOCS = ((REPO / "README.md", "### "), (REPO / "docs" / "python-api.md", "## "))
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
