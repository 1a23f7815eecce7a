"""A run records the plugins it was made with (``plugins`` in its config.yaml): ``--resume``,
``eval``, ``predict`` and ``mlcil.load`` in a new process import them again without being told,
and a run whose plugin is missing says which one to pass."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from tiny import tiny_overrides

PLUGIN = textwrap.dedent(
    '''
    """A method of the user's own, in a file outside the package."""
    from mlcil.methods.finetune import Finetune
    from mlcil.methods.registry import register_method


    @register_method
    class RecordedFinetune(Finetune):
        """Fine-tuning under a plugin's name."""

        name = "recorded-finetune"
    '''
)
TINY = [*tiny_overrides(protocol="B0-C5", train__batch_size="64"), "model.network=linear"]


def mlcil(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key != "MLCIL_PLUGINS"}
    environment["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "mlcil", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_plugin_is_recorded_and_imported_again_on_resume_eval_predict_and_load(
    tmp_path: Path,
) -> None:
    plugin = tmp_path / "plugins" / "my_method.py"
    plugin.parent.mkdir()
    plugin.write_text(PLUGIN)
    elsewhere = tmp_path / "elsewhere"  # later commands run from another folder
    elsewhere.mkdir()
    run_dir = tmp_path / "run"
    first = mlcil(tmp_path, "-q", "train", "--plugin", "plugins/my_method.py", "--config",
                  "digits-b0-c2", "--run-dir", str(run_dir), "--max-sessions", "1",
                  "method.name=recorded-finetune", *TINY)  # fmt: skip
    assert first.returncode == 0, first.stderr
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())["plugins"]
    assert recorded == [str(plugin.resolve())]  # by absolute path: found from anywhere
    assert "continue with:\n  mlcil train --resume" in first.stdout

    # A new process, another folder, no --plugin, no MLCIL_PLUGINS.
    resumed = mlcil(elsewhere, "-q", "train", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert "recorded-finetune" in (run_dir / "metrics.json").read_text()
    evaluated = mlcil(elsewhere, "eval", "--run", str(run_dir))
    assert evaluated.returncode == 0 and "reproduced" in evaluated.stdout, evaluated.stderr
    image = tmp_path / "scene.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 200, 200)).save(image)
    predicted = mlcil(elsewhere, "predict", "--run", str(run_dir), str(image))
    assert predicted.returncode == 0, predicted.stderr
    loaded = subprocess.run(
        [sys.executable, "-c", f"import mlcil; print(mlcil.load({str(run_dir)!r}).classes)"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        check=False,
    )
    assert loaded.returncode == 0 and "'0'" in loaded.stdout, loaded.stderr

    # The config.yaml of the run, given as a config, brings its plugin along too.
    printed = mlcil(elsewhere, "train", "--config", str(run_dir / "config.yaml"), "--print-config")
    assert printed.returncode == 0 and "name: recorded-finetune" in printed.stdout, printed.stderr
    code = f"import mlcil.api as a; print(a.resolve_config({str(run_dir / 'config.yaml')!r}))"
    resolved = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, check=False
    )
    assert resolved.returncode == 0 and "recorded-finetune" in resolved.stdout, resolved.stderr

    # A recorded plugin that is gone is named, with what to do.
    plugin.rename(plugin.with_name("moved.py"))
    gone = mlcil(elsewhere, "eval", "--run", str(run_dir))
    assert gone.returncode == 2
    assert gone.stderr.strip() == (
        f"error: the run {run_dir} was made with the plugin '{plugin.resolve()}', which cannot "
        f"be imported here: plugin file {plugin.resolve()} (from --plugin or MLCIL_PLUGINS) does "
        "not exist. Make it importable (current folder or PYTHONPATH) or give its file with "
        "--plugin FILE.py"
    )


def test_a_run_that_records_no_plugin_says_to_pass_one(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # A run from before plugins were recorded, made with a plugin's method.
    config = yaml.safe_load(
        mlcil(tmp_path, "train", "--config", "digits-b0-c2", "--print-config").stdout
    )
    config["method"] = {"name": "recorded-finetune"}
    config.pop("plugins")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    resumed = mlcil(tmp_path, "train", "--resume", str(run_dir))
    assert resumed.returncode == 2
    assert "unknown method 'recorded-finetune'" in resumed.stderr
    assert resumed.stderr.strip().endswith(
        "(a run made with a plugin needs it again: pass --plugin MODULE or set MLCIL_PLUGINS)"
    )
