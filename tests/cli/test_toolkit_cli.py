"""The command line as a user meets it: ``-q`` silences training, run folders follow the umask,
``compare --dry-run`` plans without training."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mlcil.cli import main
from mlcil.experiment import load_config

# Small enough for seconds per session on one CPU thread.
QUICK = ["data.image_size=32", "train.epochs=1", "train.base_epochs=1", "model.embed_dim=32",
         "model.num_heads=4"]  # fmt: skip


def mlcil(*args: str, cwd: Path, umask: int = 0o022) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mlcil", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        umask=umask,
        check=False,
    )


def test_quiet_training_prints_results_only_and_the_run_follows_the_umask(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["train", "--config", "digits-b0-c2", "--run-dir", str(run_dir), "--max-sessions", "1"]
    quiet = mlcil("-q", *args, *QUICK, cwd=tmp_path, umask=0o027)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""  # no log line, no progress bar
    assert "stopped after session 0" in quiet.stdout
    log = (run_dir / "train.log").read_text()
    assert "session 0 done" in log  # the run's own log keeps the whole story

    # Without -q the same command talks (and the log lines are what -q kept off the console).
    loud = mlcil("train", "--resume", str(run_dir), "--max-sessions", "1", cwd=tmp_path,
                 umask=0o027)  # fmt: skip
    assert loud.returncode == 0, loud.stderr
    assert "INFO session 1 done" in loud.stderr

    checked = 0
    for path in [run_dir, *run_dir.rglob("*")]:
        expected = 0o750 if path.is_dir() else 0o640
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
        checked += 1
    assert checked > 10 and (run_dir / "checkpoints" / "session_01" / "model.safetensors").is_file()


def test_compare_dry_run_prints_the_plan_and_runs_nothing(tmp_path: Path, capsys) -> None:
    output = tmp_path / "cmp"
    args = ["compare", "digits-krt", "digits-finetune", "--seeds", "0", "1", "--protocols",
            "B0-C2", "B4-C2", "--output", str(output), "--dry-run"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"plan: 8 runs = 2 configs x 2 protocols x 2 seeds, into {output / 'runs'}"
    assert "[1/8] digits-krt " in out[1] and "B0-C2" in out[1] and "seed 0" in out[1]
    assert out[1].endswith(f"-> {output / 'runs' / 'digits_B0-C2_krt_s0'}  (new)")
    assert "[8/8] digits-finetune" in out[8] and "B4-C2" in out[8] and "seed 1" in out[8]
    assert out[9].startswith("8 to train")
    assert not output.exists()


def test_compare_reuses_a_run_that_differs_only_in_run_time_settings(
    tmp_path: Path, capsys
) -> None:
    output = tmp_path / "cmp"
    planned = load_config("digits-finetune", ["seed=0"])
    done = output / "runs" / planned.run_name
    done.mkdir(parents=True)
    # Made on another device without progress bars: the same run.
    made = load_config("digits-finetune", ["seed=0", "train.progress=false", "train.device=cpu"])
    (done / "config.yaml").write_text(made.to_yaml())
    (done / "metrics.json").write_text(json.dumps({"last_map": 50.0}))
    assert main(["compare", "digits-finetune", "--seeds", "0", "--output", str(output),
                 "--dry-run"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "(finished: reused)" in out and "0 to train" in out

    other = load_config("digits-finetune", ["seed=0", "train.epochs=9"])
    (done / "config.yaml").write_text(other.to_yaml())
    assert main(["compare", "digits-finetune", "--seeds", "0", "--output", str(output),
                 "--dry-run"]) == 2  # fmt: skip
    assert "holds a run made with other settings (train.epochs" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--plugin", "--print-config"])
def test_new_options_appear_in_the_help(flag: str, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert flag in capsys.readouterr().out


def test_a_reader_that_leaves_early_is_not_an_error() -> None:
    """`mlcil configs | head -1`: a pipe closed by its reader ends the command quietly, with
    status 0 (the reader here leaves before the first line, while the command still imports)."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "mlcil", "configs"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()
        errors = process.stderr.read().decode()
        status = process.wait(timeout=120)
    assert status == 0 and "Broken pipe" not in errors, errors
