"""YAML configs resolved into typed dataclasses; overrides; unknown keys are errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mlcil.config import RunConfig
from mlcil.errors import ConfigError, ProtocolError
from mlcil.experiment import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def write(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content))
    return path


def test_defaults_come_from_the_dataclasses() -> None:
    config = load_config()
    assert isinstance(config, RunConfig)
    assert config.seed == 3407 and config.train.epochs == 20 and config.method.name == "krt"
    assert config.method.params.token_loss_weight == 100.0
    assert config.data.resolved_root is None  # digits need no root


def test_every_shipped_config_loads(tmp_path: Path) -> None:
    files = sorted(CONFIGS.rglob("*.yaml"))
    assert len(files) >= 14
    for path in files:
        config = load_config(path)
        assert config.to_dict()["method"]["name"] == config.method.name


def test_published_configs_carry_the_released_hyperparameters() -> None:
    coco = load_config(CONFIGS / "coco_b0_c10.yaml")
    assert coco.protocol == "B0-C10" and coco.data.resolved_root == "datasets/coco2014"
    assert coco.model.backbone == "tresnet_m" and coco.model.params.embed_dim == 384
    assert coco.model.pretrained == "pretrained_models/tresnet_m_224_21k.pth"
    assert (coco.train.lr, coco.train.incremental_lr, coco.train.epochs) == (4e-5, 1e-4, 20)
    assert coco.memory.per_class == 20 and coco.method.params.token_loss_weight == 100
    assert load_config(CONFIGS / "coco_b40_c10.yaml").method.params.token_loss_weight == 300
    voc = load_config(CONFIGS / "voc_b10_c2.yaml")
    assert voc.model.params.embed_dim == 768 and voc.memory.per_class == 2
    assert voc.train.incremental_lr == 4e-5 and voc.method.params.token_loss_weight == 80
    assert voc.data.resolved_root == "datasets/voc2007"


def test_unknown_keys_are_errors_naming_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", {"train": {"epochs": 2, "epoch": 3}})
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.epoch'"):
        load_config(path)
    path = write(tmp_path / "bad_top.yaml", {"trian": {}})
    with pytest.raises(ConfigError, match="trian"):
        load_config(path)
    path = write(tmp_path / "bad_method.yaml", {"method": {"name": "krt", "lambda": 3}})
    with pytest.raises(ConfigError, match="lambda"):
        load_config(path)


def test_types_are_checked(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"train\.epochs: Input should be a valid integer, got 2\.5"
    ):
        load_config(overrides=["train.epochs=2.5"])
    with pytest.raises(ConfigError, match=r"train\.progress: .*boolean, got 'yes please'"):
        load_config(overrides=["train.progress=yes please"])
    with pytest.raises(ConfigError, match=r"train\.lr: .*number, got 'fast'"):
        load_config(overrides=["train.lr=fast"])
    # YAML 1.1 reads 1e-4 as a string; a float field still accepts it.
    assert load_config(overrides=["train.lr=1e-4"]).train.lr == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.lr=nan", r"train\.lr: Input should be a valid number, got 'nan'"),
        ("train.lr=.inf", r"train\.lr: Input should be a finite number"),
        ("train.weight_decay=-1", r"train\.weight_decay: .*greater than or equal to 0, got -1"),
        ("seed=-1", r"seed: .*greater than or equal to 0, got -1"),
        ("train.batch_size=0", r"train\.batch_size: .*greater than 0, got 0"),
        ("data.augment=[blur]", r"data\.augment\.0: .*'cutout'"),
        ("model.feature_stage=-2", r"model\.feature_stage"),
    ],
)
def test_values_out_of_range_name_the_key_and_value(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(overrides=[override])


def test_empty_and_non_utf8_config_files_are_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("# nothing but a comment\n")
    with pytest.raises(ConfigError, match=r"empty\.yaml: the config file is empty"):
        load_config(tmp_path / "empty.yaml")
    (tmp_path / "latin1.yaml").write_bytes("seed: 1 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not a UTF-8 text file"):
        load_config(tmp_path / "latin1.yaml")


def test_network_parameters_belong_to_their_network(tmp_path: Path) -> None:
    # The ICA network takes embed_dim; the linear one has no parameter, so the key is unknown.
    assert load_config(overrides=["model.embed_dim=64"]).model.params.embed_dim == 64
    with pytest.raises(ConfigError, match=r"unknown key 'model\.embed_dim' of network 'linear'"):
        load_config(overrides=["model.network=linear", "model.embed_dim=64"])
    with pytest.raises(ConfigError, match="unknown network 'mlp'"):
        load_config(overrides=["model.network=mlp"])
    # Switching network in a stacked file drops the earlier network's parameters.
    digits = CONFIGS / "digits_b0_c2.yaml"
    no_ica = load_config([digits, CONFIGS / "ablations" / "krt_no_ica.yaml"])
    assert no_ica.model.network == "linear" and no_ica.model.backbone == "resnet18"
    assert no_ica.model.to_dict() == {
        "backbone": "resnet18",
        "pretrained": None,
        "feature_stage": 2,
        "network": "linear",
        "input_normalisation": "auto",
    }


def test_bad_values_are_errors() -> None:
    with pytest.raises(ConfigError, match="data.overlap"):
        load_config(overrides=["data.overlap=sometimes"])
    with pytest.raises(ConfigError, match="memory.labels"):
        load_config(overrides=["memory.labels=guess"])
    with pytest.raises(ProtocolError, match="B<base>-C<increment>"):
        load_config(overrides=["protocol=ten-by-ten"])
    with pytest.raises(ConfigError, match="divisible"):
        load_config(overrides=["model.embed_dim=100", "model.num_heads=8"])
    with pytest.raises(ConfigError, match="unknown method 'magic'"):
        load_config(overrides=["method.name=magic"])


def test_bare_override_keys_resolve_to_their_unique_section() -> None:
    config = load_config(overrides=["root=/data/coco", "epochs=3", "token_loss_weight=7"])
    assert config.data.root == "/data/coco"
    assert config.train.epochs == 3
    assert config.method.params.token_loss_weight == 7.0
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(overrides=["nonsense=1"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(overrides=["epochs"])


def test_includes_merge_and_a_method_switch_drops_old_params(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", {"seed": 5, "method": {"name": "krt", "token_loss_weight": 9}})
    child = write(tmp_path / "child.yaml", {"include": ["base.yaml"], "train": {"epochs": 4}})
    config = load_config(child)
    assert (config.seed, config.train.epochs, config.method.params.token_loss_weight) == (5, 4, 9)
    # Stacking a different method must not carry krt's token_loss_weight into lwf.
    lwf = load_config([child, CONFIGS / "methods" / "lwf.yaml"])
    assert lwf.method.name == "lwf" and lwf.method.params.distillation_weight == 1.0
    assert lwf.model.network == "linear" and lwf.memory.per_class == 0
    # Stacking the same method keeps the earlier file's tuned weight.
    same = load_config([child, CONFIGS / "ablations" / "krt_no_dpl.yaml"])
    assert (
        same.method.params.token_loss_weight == 9 and same.method.params.old_classes == "negative"
    )
    assert same.label == "krt-no-dpl" and same.run_name.endswith("krt-no-dpl_s5")


def test_include_cycles_and_missing_files_are_errors(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", {"include": ["b.yaml"]})
    write(tmp_path / "b.yaml", {"include": ["a.yaml"]})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found: .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "voc_b0_c4.yaml", ["train.epochs=3", "memory.labels=official"])
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    again = load_config(path)
    assert again.to_dict() == config.to_dict()


def test_manifest_dataset_needs_both_manifests() -> None:
    with pytest.raises(ConfigError, match="train_manifest"):
        load_config(overrides=["data.dataset=manifest"])
