"""Shipped configs by short name: naming, lookup, includes, and the commands that show them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlcil.cli import main
from mlcil.config import packaged
from mlcil.errors import ConfigError
from mlcil.experiment import load_config
from mlcil.version import __version__
from tiny import CONFIGS


def test_short_names_follow_the_path_under_configs() -> None:
    assert packaged.short_name("digits_pretrained_b0_c2.yaml") == "digits-pretrained-b0-c2"
    assert packaged.short_name("digits_pretrained/krt.yaml") == "digits-pretrained-krt"
    assert packaged.short_name("digits/krt_no_dpl") == "digits-krt-no-dpl"
    assert packaged.short_name("Digits-B0-C2") == "digits-b0-c2"


def test_every_shipped_config_has_a_name_and_the_names_map_back_to_the_files() -> None:
    configs = packaged.packaged_configs()
    files = sorted(CONFIGS.rglob("*.yaml"))
    assert packaged.packaged_root() == CONFIGS  # a source checkout reads configs/ in place
    assert sorted(configs.values()) == files
    assert configs["digits-pretrained-b0-c2"] == CONFIGS / "digits_pretrained_b0_c2.yaml"
    assert configs["digits-pretrained-krt"] == CONFIGS / "digits_pretrained" / "krt.yaml"


def test_a_name_loads_the_same_config_as_its_file() -> None:
    by_name = load_config("digits-pretrained-b0-c2", ["train.epochs=2"])
    by_path = load_config(CONFIGS / "digits_pretrained_b0_c2.yaml", ["train.epochs=2"])
    assert by_name.to_dict() == by_path.to_dict()
    assert by_name.model.pretrained == "pretrain:glyphs"  # its include chain was followed
    # The path spelling of a name, and the README's configs/ path from another folder.
    assert packaged.resolve_config("digits_pretrained/krt") == (
        CONFIGS / "digits_pretrained" / "krt.yaml"
    )
    assert packaged.find_packaged("configs/digits_b0_c2.yaml") == CONFIGS / "digits_b0_c2.yaml"


def test_a_file_that_exists_wins_over_a_shipped_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("digits-b0-c2").write_text("protocol: B4-C2\ndata:\n  dataset: digits\n")
    assert load_config("digits-b0-c2").protocol == "B4-C2"
    assert load_config("digits-b0-c2").model.backbone != "resnet18"  # not the shipped file


def test_an_unknown_name_is_an_error_with_the_closest_names() -> None:
    with pytest.raises(
        ConfigError, match=r"not found: digits-pretrained-b0-c3 .*digits-pretrained-b0-c2"
    ):
        load_config("digits-pretrained-b0-c3")


def test_a_users_config_includes_a_shipped_one_by_name(tmp_path: Path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("include: [digits-pretrained-b0-c2]\ntrain:\n  epochs: 7\n")
    config = load_config(mine)
    assert config.train.epochs == 7
    assert config.model.pretrained == "pretrain:glyphs"
    # A relative file of that name would win; a name that is neither is an error naming both.
    (tmp_path / "broken.yaml").write_text("include: [no-such-config]\n")
    with pytest.raises(
        ConfigError, match=r"broken.yaml: included config file not found: .*no-such"
    ):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "bad.yaml").write_text("include: [3]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: include entries must be file names, got 3"):
        load_config(tmp_path / "bad.yaml")


def test_two_files_with_one_short_name_are_refused(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b.yaml").write_text("seed: 1\n")
    (tmp_path / "a_b.yaml").write_text("seed: 2\n")
    monkeypatch.setattr(packaged, "packaged_root", lambda: tmp_path)
    with pytest.raises(ConfigError, match=r"a_b.yaml and .*b.yaml share the short name 'a-b'|"
                       r"b.yaml and .*a_b.yaml share the short name 'a-b'"):  # fmt: skip
        packaged.packaged_configs()


def test_the_description_is_the_whole_leading_comment_block(tmp_path: Path) -> None:
    described = tmp_path / "x.yaml"
    described.write_text("\n# First line, cut\n# mid-sentence.\n#\n# Not this.\nseed: 1\n")
    assert packaged.summary(described) == "First line, cut mid-sentence."
    bare = tmp_path / "y.yaml"
    bare.write_text("seed: 1\n# late comment\n")
    assert packaged.summary(bare) == ""


def listed(out: str) -> dict[str, str]:
    """``mlcil configs`` output: name -> its whole description (wrapped lines joined), per
    section (``runnable`` / ``fragments``)."""
    entries: dict[str, str] = {}
    name = None
    for line in out.splitlines()[1:]:
        if not line.startswith(" "):
            name = None  # a section heading
            continue
        if line.startswith("  ") and not line.startswith("   "):
            name, _, text = line.strip().partition(" ")
            entries[name] = text.strip()
        elif name is not None:
            entries[name] += " " + line.strip()
    return entries


def test_mlcil_configs_lists_names_whole_descriptions_and_fragments_apart(capsys) -> None:
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    entries = listed(out)
    assert set(entries) == set(packaged.packaged_configs())
    # Whole: the last words of the first config's comment block are there too.
    whole = entries["digits-pretrained-b0-c2"]
    assert whole.startswith("The embedded benchmark in the pretrained regime")
    assert whole.endswith("LwF's and PODNet's weights.")
    assert whole == packaged.summary(CONFIGS / "digits_pretrained_b0_c2.yaml")
    # Fragments (a method without data or protocol) are listed after the runnable configs.
    runnable, fragments = out.split("\nfragments (partial configs")
    assert "  methods-lwf " in fragments and "  methods-lwf " not in runnable
    assert "  ablations-krt-no-dpl " in fragments
    assert "  digits-lwf " in runnable and "  coco-b0-c10 " in runnable


def test_mlcil_configs_pattern_filters_by_name_path_or_part(capsys) -> None:
    assert main(["configs", "digits_pretrained/*"]) == 0
    names = set(listed(capsys.readouterr().out))
    assert names == {packaged.short_name(f"digits_pretrained/{p.name}")
                     for p in (CONFIGS / "digits_pretrained").glob("*.yaml")}  # fmt: skip
    assert main(["configs", "digits-pretrained-k*"]) == 0
    names = set(listed(capsys.readouterr().out))
    assert "digits-pretrained-krt-no-dpl" in names and "digits-pretrained-lwf" not in names
    assert main(["configs", "coco"]) == 0  # no glob: a part of the name
    assert set(listed(capsys.readouterr().out)) == {
        name for name in packaged.packaged_configs() if "coco" in name
    }
    assert main(["configs", "nothing-like-this-*"]) == 2
    assert "no shipped config matches 'nothing-like-this-*'" in capsys.readouterr().err


def test_patterns_name_runnable_configs_only_and_files_win(tmp_path: Path, monkeypatch) -> None:
    found = packaged.expand_config_pattern("configs/digits/*.yaml")  # as a shell passes it on
    assert sorted(found) == sorted(str(p) for p in (CONFIGS / "digits").glob("*.yaml"))
    with pytest.raises(ConfigError, match=r"methods-\*: .*no runnable shipped config matches"):
        packaged.expand_config_pattern("methods-*")  # fragments only
    assert packaged.expand_config_pattern("digits-b0-c2") == ["digits-b0-c2"]  # a name: as given
    monkeypatch.chdir(tmp_path)
    Path("odd[1].yaml").write_text("seed: 1\n")
    assert packaged.expand_config_pattern("odd[1].yaml") == ["odd[1].yaml"]  # a file wins


def test_print_config_prints_the_resolved_yaml_and_trains_nothing(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    code = main(["train", "--config", "digits-b0-c2", "--run-dir", str(run_dir),
                 "--print-config", "train.epochs=3", "seed=5"])  # fmt: skip
    assert code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["epochs"] == 3 and printed["seed"] == 5
    assert printed["method"]["name"] == "krt" and printed["data"]["dataset"] == "digits"
    assert load_config(CONFIGS / "digits_b0_c2.yaml", ["train.epochs=3", "seed=5"]).to_dict() == (
        printed
    )
    assert not run_dir.exists()
    assert main(["train", "--resume", str(run_dir), "--print-config"]) == 2
    assert "--print-config goes with --config" in capsys.readouterr().err


def test_version_from_the_command_and_from_python_m(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"mlcil {__version__}"
    result = subprocess.run(
        [sys.executable, "-m", "mlcil", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"mlcil {__version__}"
