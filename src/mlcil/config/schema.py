"""The typed schema of a run: pydantic models whose fields hold every default.

Each section rejects unknown keys, non-finite numbers and values of the wrong type (no silent
coercion: ``epochs: 2.5`` is an error, not 2). Two sections are *registered*: their keys depend on
a name looked up in a registry. ``method`` holds ``name`` plus the method's own ``Params``, and
``model`` holds the backbone fields plus ``network`` and that network's ``Params``. The schema
itself imports no method and no network: ``mlcil.config.loading`` receives the lookup.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mlcil.data.catalog import DATASETS, dataset_spec, resolved_root
from mlcil.limits import MAX_BATCH_SIZE, MAX_IMAGE_SIZE, MAX_JOBS, MAX_SEED
from mlcil.memory_policies import MEMORY_POLICIES
from mlcil.protocol import parse_protocol
from mlcil.rundir import is_folder_name

STRICT = ConfigDict(
    extra="forbid", strict=True, allow_inf_nan=False, validate_assignment=True, frozen=False
)

Augmentation = Literal["cutout", "randaugment", "hflip"]
_DEFAULT_AUGMENT: list[Augmentation] = ["cutout", "randaugment"]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]
# Sizes are bounded (mlcil.limits) so that a typo is an error, not an attempt to allocate.
BatchSize = Annotated[int, Field(gt=0, le=MAX_BATCH_SIZE)]


class Params(BaseModel):
    """Base of a method's or a network's own hyperparameters (the YAML keys next to its name)."""

    model_config = STRICT


class Section(BaseModel):
    model_config = STRICT


class DataConfig(Section):
    """Which images and labels, and how they are fed to the model."""

    dataset: str = "digits"
    root: str | None = None  # None: the dataset's default root (mlcil.data.catalog)
    train_manifest: str | None = None  # manifest dataset only
    test_manifest: str | None = None
    class_list: str | None = None  # manifest: file with one class name per line, in order
    # The order in which classes arrive (every class name once); None: the dataset's order
    # (lexicographic for COCO/VOC/digits, the class file's for manifests).
    class_order: list[str] | None = None
    image_size: Annotated[int, Field(gt=0, le=MAX_IMAGE_SIZE)] = 224
    overlap: Literal["all", "disjoint"] = "all"  # "all": the published protocol
    augment: list[Augmentation] = Field(default_factory=lambda: _DEFAULT_AUGMENT.copy())
    # RandAugment's implementation: torchvision's, or "released", the PyPI package randaugment
    # 1.0.2 the KRT release uses (pip install 'mlcil[released]').
    randaugment: Literal["torchvision", "released"] = "torchvision"
    num_workers: Annotated[int, Field(ge=0, le=MAX_JOBS)] = 4
    # Decode and resize each image file once, to image_size, into memory-mapped uint8 shards
    # that training and evaluation then read (built on first use; mlcil.data.image_cache).
    # The tensors are identical to decoding the files, so this changes speed, never results.
    image_cache: bool = False
    image_cache_dir: str | None = None  # None: <mlcil cache folder>/images ($MLCIL_CACHE)
    # Keep the label matrix parsed from COCO's instances JSON / VOC's XMLs and reuse it while
    # the annotation files keep their size and modification time.
    annotation_cache: bool = True

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value not in DATASETS:
            raise ValueError(f"{value!r} is not one of {', '.join(map(repr, DATASETS))}")
        return value

    @field_validator("class_order", mode="before")
    @classmethod
    def _class_names_are_text(cls, value: Any) -> Any:
        # Digit classes are named "0".."9"; YAML reads an unquoted 3 as a number.
        if isinstance(value, list):
            return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        return value

    @field_validator("augment", mode="before")
    @classmethod
    def _one_augmentation_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _manifests_present(self) -> DataConfig:
        spec = dataset_spec(self.dataset)
        if spec.needs_manifests and not (self.train_manifest and self.test_manifest):
            raise ValueError(
                f"data.dataset={self.dataset} needs data.train_manifest and data.test_manifest"
            )
        return self

    @property
    def resolved_root(self) -> str | None:
        return resolved_root(self)


class ModelConfig(Section):
    """Backbone and classification network (``network`` names a registered network whose own
    parameters sit next to these keys in YAML)."""

    backbone: str = "tresnet_m"  # any timm model with forward_intermediates
    pretrained: str | None = None  # local weights file (timm or ASL/KRT format); None: random
    feature_stage: Annotated[int, Field(ge=0)] | None = None  # timm stage to read; None: last
    network: str = "ica"
    # Mean/std normalisation of the input: "imagenet" divides by the ImageNet statistics timm's
    # pretrained config gives the backbone; "none" feeds [0, 1] pixels (TResNet's convention);
    # "auto" is "imagenet" for ``imagenet:`` weights and "none" otherwise.
    input_normalisation: Literal["auto", "none", "imagenet"] = "auto"
    params: Params = Field(default_factory=Params)  # the network's Params, set by the loader

    def to_dict(self) -> dict[str, Any]:
        fields = self.model_dump(exclude={"params"})
        return {**fields, **self.params.model_dump()}


class LossConfig(Section):
    """Asymmetric loss of every method's classification term (docs/method.md, loss)."""

    gamma_neg: Annotated[float, Field(ge=0)] = 4.0
    gamma_pos: Annotated[float, Field(ge=0)] = 0.0
    clip: Annotated[float, Field(ge=0, lt=1)] = 0.05
    # R: the classification term is R x (ASL summed over a step's images) / (images in the global
    # optimiser step), i.e. R x the per-image mean, so lambda and weight decay mean the same at any
    # batch size, accumulation or process count. 64 with a global batch of 128 is exactly the
    # release's ASL_sum(128) / 2 (64 images per GPU on 2 GPUs, docs/distributed.md).
    reference_images: BatchSize = 64


class MemoryConfig(Section):
    """Exemplar replay (docs/method.md, memory). ``per_class: 0`` and no ``total`` disable it."""

    per_class: Annotated[int, Field(ge=0)] = 0  # m exemplars per class (growing memory)
    total: PositiveInt | None = None  # fixed total budget; per class = total // seen classes
    labels: Literal["strict", "official"] = "strict"  # official: the released code's labels
    # Which images a session keeps (mlcil.memory_policies): herding (published), random, prs
    # (Partitioning Reservoir Sampling) or ocdm (Optimizing Class Distribution in Memory).
    policy: str = "herding"
    # PRS's and OCDM's class-balance power: class c's share ~ n_c ** rho (its images in the
    # session); 0 balances the classes, 1 keeps the data's proportions.
    rho: float = 0.0

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in MEMORY_POLICIES:
            raise ValueError(f"{value!r} is not one of {', '.join(map(repr, MEMORY_POLICIES))}")
        return value

    @property
    def enabled(self) -> bool:
        return self.per_class > 0 or self.total is not None


class TrainConfig(Section):
    """Optimisation schedule (docs/method.md, optimisation) and run-time behaviour."""

    epochs: PositiveInt = 20
    base_epochs: PositiveInt | None = None  # epochs of the first session; None: same as epochs
    batch_size: BatchSize = 64  # the global batch: all processes and accumulation steps
    grad_accumulation: BatchSize = 1  # micro-batches per optimiser step and process
    lr: PositiveFloat = 4e-5  # first session
    incremental_lr: PositiveFloat = 1e-4  # every later session
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    pct_start: Fraction = 0.2
    grad_clip_norm: PositiveFloat | None = None  # clip the global gradient norm; None: never
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: bf16 on CUDA, else fp32
    # The frozen teacher's forward passes (pseudo-labels, distillation): under the run's autocast
    # ("amp"), or in full precision as the released code ("fp32": no flipped pseudo-label at the
    # threshold from a half-precision score; the published configs use it).
    teacher_precision: Literal["amp", "fp32"] = "amp"
    channels_last: Literal["auto"] | bool = "auto"  # auto: on for CUDA (faster convolutions)
    compile: bool = False  # torch.compile the trained network (checkpoints hold plain weights)
    # On CUDA the loss parts and the finite-loss check are read every this many steps, not every
    # step: reading a value from the GPU waits for it (the CPU reads every step: it costs nothing).
    log_every_steps: PositiveInt = 50
    device: str = "auto"  # auto: cuda when available, else cpu
    eval_every_epoch: bool = False  # logged only, never used to pick a model
    eval_batch_size: BatchSize | None = None  # None: 2 x batch_size
    f1_threshold: Fraction = 0.8  # CF1/OF1 threshold on sigmoid scores (some papers use 0.525)
    progress: bool = True
    tensorboard: bool = True
    diagnostics: bool = True  # restore quality and old-knowledge drift per session (metrics.json)
    # Write a mid-session checkpoint every N epochs (and always on SIGTERM); None: only at the
    # end of each session.
    checkpoint_every_epochs: PositiveInt | None = None
    # Experiment trackers fed with the config, the learning rate and losses of every step and
    # each session's metrics (docs/tracking.md): tensorboard, csv, wandb, mlflow or a name
    # registered with mlcil.trackers.register_tracker. train.tensorboard=false drops tensorboard
    # from the list (the older switch; existing configs keep their output). The default, csv,
    # needs no package beyond the base install.
    trackers: list[str] = Field(default_factory=lambda: ["csv"])
    # Deterministic kernels (torch.use_deterministic_algorithms, cuDNN without autotuning,
    # CUBLAS_WORKSPACE_CONFIG): repeatable on one machine at some speed cost; an operation
    # without a deterministic kernel then raises instead of running.
    deterministic: bool = False

    @field_validator("trackers", mode="before")
    @classmethod
    def _one_tracker_is_a_list(cls, value: Any) -> Any:
        # train.trackers=csv on the command line reads as a string; null means none.
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("trackers")
    @classmethod
    def _trackers_named_once(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name.strip() or name != name.strip():
                raise ValueError(f"{name!r} is not a tracker name")
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"{', '.join(map(repr, repeated))} listed more than once")
        return value

    def epochs_for(self, session_index: int) -> int:
        if session_index == 0 and self.base_epochs is not None:
            return self.base_epochs
        return self.epochs

    def lr_for(self, session_index: int) -> float:
        return self.lr if session_index == 0 else self.incremental_lr


class MethodConfig(Section):
    """The method's registry name and its own typed hyperparameters."""

    name: str = "krt"
    params: Params = Field(default_factory=Params)  # the method's Params, set by the loader

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.params.model_dump()}


class RunConfig(Section):
    """Everything one run needs; saved resolved as ``config.yaml`` next to its results."""

    name: str | None = None  # run folder name; None: <dataset>_<protocol>_<label>_s<seed>
    label: str | None = None  # name shown in reports (e.g. an ablation); None: the method's name
    output_dir: str = "runs"
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = 3407
    protocol: str = "B0-C10"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    # The plugin modules (or .py files) the run was made with, recorded by mlcil when the run
    # starts (mlcil.plugins): --resume, eval, predict and mlcil.load import them again.
    plugins: list[str] = Field(default_factory=list)

    @field_validator("name", "label")
    @classmethod
    def _folder_name(cls, value: str | None) -> str | None:
        # Both end up in the run folder's name, which must stay inside output_dir.
        if value is not None and not is_folder_name(value):
            raise ValueError(
                "must be usable as one folder name inside output_dir (no '/', '\\', '..' or "
                "surrounding spaces)"
            )
        return value

    @field_validator("protocol")
    @classmethod
    def _valid_protocol(cls, value: str) -> str:
        parse_protocol(value)  # fail before any work starts
        return value

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        order = ""
        if self.data.class_order is not None:
            # Runs over another class order are another experiment: a short, stable tag.
            digest = hashlib.sha1("\n".join(self.data.class_order).encode()).hexdigest()[:6]
            order = f"-order{digest}"
        label = self.display_label
        return f"{self.data.dataset}_{self.protocol_label}{order}_{label}_s{self.seed}"

    @property
    def protocol_label(self) -> str:
        return self.protocol.upper().replace(" ", "")

    @property
    def display_label(self) -> str:
        return self.label or self.method.name

    def to_dict(self) -> dict[str, Any]:
        """The plain YAML form: registered sections flattened back to name + parameters."""
        result = self.model_dump(exclude={"model", "method"})
        ordered: dict[str, Any] = {}
        for key in type(self).model_fields:
            if key == "model":
                ordered[key] = self.model.to_dict()
            elif key == "method":
                ordered[key] = self.method.to_dict()
            else:
                ordered[key] = result[key]
        return ordered

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
