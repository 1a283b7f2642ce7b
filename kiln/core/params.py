"""The params.yaml schema (every knob of the pipeline, one section per owner), validated before any compute starts.
Its choices come from the catalogs: datasets (kiln.prepare.catalog), models (kiln.core.model_catalog), compression
variants (kiln.compress.catalog) and fine-tuning methods (kiln.finetune.catalog)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kiln.compress.catalog import VARIANTS
from kiln.core.errors import InputError
from kiln.core.model_catalog import MODELS, TORCHVISION_PREFIX
from kiln.finetune.catalog import ADAPTERS, METHODS
from kiln.prepare.catalog import DATASETS

DatasetName = Literal[tuple(DATASETS)]
TUNABLE_TRAIN_KEYS = ("lr", "momentum", "weight_decay", "batch_size", "label_smoothing", "dropout")


class ParamsError(InputError):
    """params.yaml (or an override) is invalid; the message names every offending key."""


def local_cpu_limit() -> int | None:
    """CPUs a local Ray gets, or None when RAY_ADDRESS points at a cluster we cannot size yet."""
    return None if os.environ.get("RAY_ADDRESS") else os.cpu_count()


def _reject_unknown(names: Iterable[str], allowed: Sequence[str], problem: str, allowed_label: str = "allowed") -> None:
    """Raise `<problem> [names not in allowed]; <allowed_label>: <allowed>` when any name is not allowed."""
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise ValueError(f"{problem} {unknown}; {allowed_label}: {', '.join(allowed)}")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PrepareParams(Strict):
    dataset: DatasetName
    data_dir: Path = Field(description="Raw files (ignored for digits, which ships with scikit-learn).")
    val_fraction: float = Field(gt=0, lt=0.5)
    test_fraction: float = Field(gt=0, lt=0.5, description="Used only when the dataset has no official test split.")
    image_side: int | None = Field(None, ge=4, description="Resize to this side (antialiased bilinear); null: as is.")
    seed: int

    @property
    def side(self) -> int:
        """The side of the prepared images."""
        return self.image_side or DATASETS[self.dataset].side


class AugmentParams(Strict):
    """Training-time augmentation for one dataset (see kiln.train.augment); all off by default."""

    crop_padding: int = Field(0, ge=0, description="Random crop of the zero-padded image (pixels per side).")
    hflip: bool = False
    rotation: float = Field(0.0, ge=0, le=180, description="Degrees.")
    translate: float = Field(0.0, ge=0, lt=0.5, description="Fraction of the side.")
    scale: float = Field(0.0, ge=0, lt=1, description="Zoom in [1 - scale, 1 + scale].")
    erasing: float = Field(0.0, ge=0, le=1, description="Probability of erasing a random rectangle.")


class EarlyStoppingParams(Strict):
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    patience: int = Field(0, ge=0, description="Epochs without improvement before stopping; 0 = never stop early.")
    min_delta: float = Field(0.0, ge=0)


class AdversarialParams(Strict):
    method: Literal["none", "fgsm", "pgd"] = "none"
    epsilon: float = Field(0.03, gt=0, le=1, description="L-inf radius in pixel units ([0, 1]).")
    ratio: float = Field(0.5, ge=0, le=1, description="Fraction of each batch replaced by adversarial examples.")
    pgd_steps: int = Field(3, ge=1)


class TrainParams(Strict):
    model: str = Field(description="lenet | compact | resnet | torchvision:<name>")
    tasks: dict[DatasetName, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="Multi-task: dataset -> loss weight, two or more; {}: prepare.dataset alone.")
    task_sampling: Literal["proportional", "equal"] = Field(
        "proportional", description="Multi-task batches: each task's share follows its training-set size, or is equal.")
    dropout: float = Field(ge=0, lt=1)
    weights: Path | None = Field(description="A local state_dict to start from; nothing is downloaded.")
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    optimizer: Literal["sgd", "adamw"]
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    schedule: Literal["constant", "onecycle", "cosine"]
    warmup_epochs: float = Field(ge=0, description="cosine: linear warm-up over this many epochs.")
    label_smoothing: float = Field(ge=0, lt=1)
    early_stopping: EarlyStoppingParams
    adversarial: AdversarialParams
    augmentation: dict[str, AugmentParams] = Field(description="Per dataset; the prepared dataset's entry applies.")
    num_workers: int = Field(ge=1)
    cpus_per_worker: int = Field(ge=1, description="Torch threads of each Ray Train worker.")
    max_failures: int = Field(ge=0, description="Restarts from the latest checkpoint when a worker dies.")
    use_gpu: bool
    amp: Literal["none", "bf16", "fp16"] = Field(description="Mixed precision, CUDA only.")
    channels_last: bool = Field(description="NHWC memory format, CUDA only.")
    storage_path: str = Field(min_length=1, description="Ray Train checkpoints: a local folder or a cloud URI.")
    use_tuned: bool = Field(description="Take the tuned keys from the tune stage's best config.")
    seed: int

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in MODELS and not (value.startswith(TORCHVISION_PREFIX) and value != TORCHVISION_PREFIX):
            raise ValueError(f"unknown model; allowed: {', '.join(MODELS)} or {TORCHVISION_PREFIX}<name>")
        return value

    @field_validator("tasks")
    @classmethod
    def _several_tasks(cls, value: dict[str, float]) -> dict[str, float]:
        if len(value) == 1:
            raise ValueError("list two or more tasks (dataset: loss weight), or none for prepare.dataset alone")
        return value

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value}: no such file (weights are read locally, never downloaded)")
        return value

    @field_validator("augmentation")
    @classmethod
    def _known_datasets(cls, value: dict[str, AugmentParams]) -> dict[str, AugmentParams]:
        _reject_unknown(value, DATASETS, "unknown datasets")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> TrainParams:
        gpu_only = [key for key, on in (("amp", self.amp != "none"), ("channels_last", self.channels_last)) if on]
        if gpu_only and not self.use_gpu:
            raise ValueError(f"{' and '.join(gpu_only)} {'need' if len(gpu_only) > 1 else 'needs'} use_gpu: true "
                             "(CUDA only)")
        if self.schedule == "cosine" and self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be below epochs ({self.epochs})")
        cpus = local_cpu_limit()
        needed = self.num_workers * self.cpus_per_worker
        if cpus is not None and not self.use_gpu and needed > cpus:
            raise ValueError(f"{self.num_workers} Ray workers x {self.cpus_per_worker} CPUs need {needed} CPUs but "
                             f"this machine has {cpus}; allowed: num_workers x cpus_per_worker <= {cpus}")
        return self


class SearchDimension(Strict):
    """One hyperparameter's domain. `grid` is for `tune.search: grid`; the `q` forms round to multiples of `q`."""

    type: Literal["choice", "grid", "uniform", "quniform", "loguniform", "qloguniform", "randint", "qrandint"]
    values: list[float | int] | None = None
    low: float | None = None
    high: float | None = None
    q: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> SearchDimension:
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"'{self.type}' needs a non-empty 'values' list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"'{self.type}' needs 'low' and 'high'")
        if self.low >= self.high:
            raise ValueError(f"'low' ({self.low}) must be below 'high' ({self.high})")
        if "loguniform" in self.type and self.low <= 0:
            raise ValueError(f"'{self.type}' bounds must be > 0 (got low={self.low})")
        if self.type.startswith("q") and self.q is None:
            raise ValueError(f"'{self.type}' needs 'q', the step to round to")
        return self


class TuneParams(Strict):
    search: Literal["grid", "random", "tpe"]
    scheduler: Literal["fifo", "asha", "pbt"]
    num_samples: int = Field(ge=1, description="Trials to sample (grid: repeats of the whole grid).")
    epochs: int = Field(ge=1, description="Most epochs a trial trains (ASHA's max_t).")
    grace_period: int = Field(ge=1, description="ASHA: epochs a trial runs before it can be stopped.")
    reduction_factor: float = Field(gt=1, description="ASHA: keep the top 1/reduction_factor at each rung.")
    perturbation_interval: int = Field(ge=1, description="PBT: epochs between exploit/explore steps.")
    max_train_samples: int = Field(ge=1, description="Trials train on a stratified subset of this many images.")
    cpus_per_trial: int = Field(ge=1, description="CPUs of each trial process, or of each worker of a trial.")
    workers_per_trial: int = Field(ge=1, description="1: a plain process; more: a Ray Train TorchTrainer per trial.")
    metric: str = Field(pattern=r"^val_(accuracy|loss)(_[a-z0-9_]+)?$", description=(
        "val_accuracy | val_loss; multi-task: their mean over tasks, or one task's, e.g. val_accuracy_digits."))
    mode: Literal["max", "min"]
    search_space: dict[str, SearchDimension] = Field(min_length=1)
    seed: int = Field(description="Seeds the search algorithm, the scheduler and the trials' training subset.")

    @field_validator("search_space")
    @classmethod
    def _tunable_keys(cls, space: dict[str, SearchDimension]) -> dict[str, SearchDimension]:
        _reject_unknown(space, TUNABLE_TRAIN_KEYS, "cannot tune", "allowed keys")
        return space

    @field_validator("cpus_per_trial")
    @classmethod
    def _fits_local_cpus(cls, value: int) -> int:
        cpus = local_cpu_limit()
        if cpus is not None and value > cpus:
            raise ValueError(f"a trial asking for {value} CPUs can never run on {cpus}; allowed: 1..{cpus}")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> TuneParams:
        grid = sorted(key for key, dim in self.search_space.items() if dim.type == "grid")
        if self.search == "grid" and len(grid) < len(self.search_space):
            others = sorted(set(self.search_space) - set(grid))
            raise ValueError(f"search: grid needs every search_space dimension of type 'grid'; not: {others}")
        if self.search != "grid" and grid:
            raise ValueError(f"'grid' dimensions {grid} need search: grid; use 'choice' for {self.search} search")
        if self.scheduler == "pbt" and self.search == "tpe":
            raise ValueError("scheduler: pbt explores by itself; use search: random or grid with it")
        if self.scheduler == "pbt" and self.workers_per_trial > 1:
            raise ValueError("scheduler: pbt clones single-process trials; set workers_per_trial: 1")
        log_steps = sorted(key for key, dim in self.search_space.items() if dim.type == "qloguniform")
        if self.search == "tpe" and log_steps:
            raise ValueError(f"tpe (Optuna) cannot quantise a log scale: {log_steps}; use loguniform or quniform")
        expected = "max" if self.metric.startswith("val_accuracy") else "min"
        if self.mode != expected:
            raise ValueError(f"metric {self.metric} is optimised with mode: {expected}, not {self.mode}")
        if self.grace_period > self.epochs:
            raise ValueError(f"grace_period ({self.grace_period}) exceeds epochs ({self.epochs})")
        cpus = local_cpu_limit()
        needed = self.cpus_per_trial * self.workers_per_trial
        if cpus is not None and needed > cpus:
            raise ValueError(f"a trial asking for {needed} CPUs (cpus_per_trial x workers_per_trial) can never run "
                             f"on {cpus}; allowed: cpus_per_trial x workers_per_trial <= {cpus}")
        return self


class CompressParams(Strict):
    variants: list[str] = Field(description="Models to build and measure (kiln.compress.catalog).")
    calibration_samples: int = Field(ge=1)
    target_macs_ratio: float = Field(gt=0, lt=1, description="Pruned variants and students: MACs over fp32's.")
    prune_rounds: int = Field(ge=1, description="Pruned variants: prune-then-recover steps to reach the target.")
    recovery_epochs: int = Field(ge=1, description="Pruned variants: training epochs after each pruning step.")
    recovery_lr: float = Field(gt=0, description="Pruned variants: each round's peak learning rate (cosine decay).")
    student_epochs: int = Field(ge=1, description="distilled, student: epochs from fresh weights.")
    student_lr: float = Field(gt=0, description="distilled, student: the one-cycle peak learning rate.")
    batch_size: int = Field(ge=1, description="Recovery training's global batch, split across the workers.")
    distill_temperature: float = Field(gt=0)
    distill_alpha: float = Field(ge=0, le=1, description="Weight of the soft-target (KL) loss; the rest is CE.")
    num_workers: int = Field(ge=1, description="Ray Train workers of the recovery training (DDP, CPU).")
    cpus_per_worker: int = Field(ge=1)
    max_accuracy_drop_points: float = Field(
        ge=0, description="Deployable: the fastest variant within this many points of fp32's val accuracy."
    )
    min_speedup: float = Field(
        ge=1, description="Deployable: fp32 unless that variant is this many times faster (see kiln.compress.select)."
    )
    seed: int = Field(description="Calibration subset, shuffling, student initialisation.")

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, variants: list[str]) -> list[str]:
        _reject_unknown(variants, VARIANTS, "unknown variants")
        missing = [name for name in ("fp32", "int8") if name not in variants]
        if missing:
            raise ValueError(f"must include {missing}: fp32 is the baseline, int8 is models/model_int8.onnx")
        if len(set(variants)) < len(variants):
            raise ValueError("lists a variant twice")
        return variants


class EvaluateParams(Strict):
    gate_metric: Literal["test_accuracy", "test_macro_f1"]
    gate_margin: float = Field(ge=0, lt=1, description="Required improvement over the champion, in metric units.")
    gate_alpha: float = Field(gt=0, lt=1, description="Significance level of McNemar's test on paired predictions.")
    fgsm_epsilons: list[float] = Field([0.05, 0.1], min_length=1, description="FGSM L-inf radii, in pixel units.")
    pgd_epsilons: list[float] = Field([0.05], min_length=1, description="PGD L-inf radii, in pixel units.")
    pgd_steps: int = Field(5, ge=1)
    noise_sigmas: list[float] = Field([0.1, 0.2], min_length=1, description="Gaussian pixel-noise std deviations.")
    robustness_samples: int = Field(1000, ge=1, description="Robustness runs on a stratified test subset this big.")
    calibration_bins: int = Field(15, ge=2, description="Equal-width confidence bins of ECE and the reliability plot.")
    explain_steps: int = Field(32, ge=1, description="Integrated Gradients: steps of the path integral.")
    seed: int = Field(description="The robustness subset, PGD's random start, the noise.")

    @field_validator("fgsm_epsilons", "pgd_epsilons", "noise_sigmas")
    @classmethod
    def _pixel_scale(cls, values: list[float]) -> list[float]:
        outside = [value for value in values if not 0 < value <= 1]
        if outside:
            raise ValueError(f"{outside} outside (0, 1]: pixels are in [0, 1]")
        if len(set(values)) < len(values):
            raise ValueError("lists a value twice")
        return values


class LatencyParams(Strict):
    """How compress and evaluate time a model (kiln.core.latency): every model's session built and warmed up first,
    then interleaved rounds in rotating order; the p50 of each round, the median over rounds."""

    batch_size: int = Field(ge=1, description="The batched figures' batch (batch 1 is always measured too).")
    rounds: int = Field(ge=1, description="Interleaved rounds: each times every model once, in rotating order.")
    calls: int = Field(ge=1, description="Timed calls per model per round (its p50 is the round's figure).")
    warmup_calls: int = Field(ge=0, description="Untimed calls per model before the first round.")


MethodName = Literal[tuple(METHODS)]
AdapterName = Literal[ADAPTERS]


class AdapterParams(Strict):
    """One peft adapter family's settings (ia3 uses target_modules alone)."""

    target_modules: list[str] = Field(min_length=1, description="Module names (or their endings) to adapt.")
    rank: int = Field(4, gt=0, description="lora, loha: the rank; adalora: the initial rank.")
    alpha: float = Field(8.0, gt=0, description="lora, loha, adalora: the scale is alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_rank: int = Field(2, gt=0, description="adalora: the average rank left after the budget is pruned.")


class FinetuneParams(Strict):
    """Adapt a registered model to a new dataset (tasks/finetune.py): every method trained and compared, one
    registered."""

    base: str = Field(min_length=1, description="An alias (champion) or version number of tracking.registered_model.")
    registered_model: str = Field(min_length=1, description="The registry entry of the fine-tuned model.")
    target: PrepareParams = Field(description="The target dataset, prepared by the finetune_data stage.")
    shots_per_class: int = Field(ge=0, description="Training images per class, stratified and seeded; 0: all.")
    methods: list[MethodName] = Field(min_length=1, description="Trained and compared.")
    select: str = Field(description="The method whose merged model is written and registered.")
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: dict[MethodName, Annotated[float, Field(gt=0)]] = Field(description="Peak rate per method.")
    weight_decay: float = Field(ge=0)
    adapters: dict[AdapterName, AdapterParams] = Field(description="Per peft method.")
    num_workers: int = Field(ge=1)
    cpus_per_worker: int = Field(ge=1)
    seed: int = Field(description="The shot draw, shuffling, new heads and scratch weights.")

    @field_validator("methods")
    @classmethod
    def _once_each(cls, methods: list[str]) -> list[str]:
        if len(set(methods)) < len(methods):
            raise ValueError("lists a method twice")
        return methods

    @field_validator("select", "lr", "adapters")
    @classmethod
    def _cover_the_methods(cls, value: Any, info: ValidationInfo) -> Any:
        methods = info.data.get("methods", [])
        if info.field_name == "select" and value not in methods:
            raise ValueError(f"{value!r} is not one of methods {methods}")
        needed = [m for m in methods if info.field_name == "lr" or (info.field_name == "adapters" and m in ADAPTERS)]
        if missing := [m for m in needed if m not in value]:
            raise ValueError(f"no entry for methods {missing}")
        return value


class TrackingParams(Strict):
    """Where every stage records its runs (MLflow; the store comes from MLFLOW_TRACKING_URI)."""

    experiment: str = Field(min_length=1, description="The MLflow experiment of every stage's runs.")
    registered_model: str = Field(min_length=1, description="The registry entry evaluate registers versions under.")


class Params(Strict):
    tracking: TrackingParams
    latency: LatencyParams
    prepare: PrepareParams
    tune: TuneParams
    train: TrainParams
    compress: CompressParams
    evaluate: EvaluateParams
    finetune: FinetuneParams

    @property
    def task_weights(self) -> dict[str, float]:
        """Each task's loss weight, the primary task (prepare.dataset) first; one task is {prepare.dataset: 1.0}."""
        weights = self.train.tasks or {self.prepare.dataset: 1.0}
        return {self.prepare.dataset: weights[self.prepare.dataset], **weights}

    @model_validator(mode="after")
    def _across_sections(self) -> Params:
        dataset, side, tasks = self.prepare.dataset, self.prepare.side, self.train.tasks
        if tasks:
            _check_tasks(tasks, dataset, self.prepare.image_side)
            single = sorted(set(self.compress.variants) - {"fp32", "int8"})
            if single:
                raise ValueError(f"compress.variants {single} are single-task (their recovery training and "
                                 "distillation take one head); with train.tasks use [fp32, int8]")
            if self.train.adversarial.method != "none":
                raise ValueError("train.adversarial: adversarial examples are single-task; set method: none with "
                                 "train.tasks")
        for task in tasks or [dataset]:
            augment = self.train.augmentation.get(task)
            if augment is None:
                owner = "prepare.dataset" if task == dataset else "the task"
                raise ValueError(f"train.augmentation has no entry for {owner} {task!r} (an empty {{}} is none)")
            if augment.hflip and not DATASETS[task].mirror_safe:
                raise ValueError(f"train.augmentation.{task}.hflip: a mirrored image of {task} can change its label; "
                                 "set it false")
            if 2 * augment.crop_padding >= side:
                raise ValueError(f"train.augmentation.{task}.crop_padding ({augment.crop_padding}) would shift "
                                 f"{side}-pixel images by half their side or more; use at most {(side - 1) // 2}")
        task = self.tune.metric.removeprefix("val_accuracy").removeprefix("val_loss").removeprefix("_")
        if task and task not in self.train.tasks:
            raise ValueError(f"tune.metric: {self.tune.metric!r} names no task of train.tasks "
                             f"({', '.join(self.train.tasks) or 'none: one task'}); use val_accuracy or val_loss, or "
                             "their _<task> forms in a multi-task run")
        if self.tune.scheduler == "pbt" and self.train.schedule != "constant":
            raise ValueError("tune.scheduler: pbt perturbs the learning rate mid-run; set train.schedule: constant")
        if self.finetune.registered_model == self.tracking.registered_model:
            raise ValueError(f"finetune.registered_model: {self.finetune.registered_model!r} is the base's registry "
                             "entry (tracking.registered_model); name the fine-tuned model's own")
        return self


def _check_tasks(tasks: Mapping[str, float], primary: str, image_side: int | None) -> None:
    """Raise ValueError naming the key when the tasks cannot share one network: the primary task missing, channel
    counts that differ, or sides that differ without prepare.image_side to bring them to one."""
    if primary not in tasks:
        raise ValueError(f"train.tasks {sorted(tasks)} must include prepare.dataset ({primary!r}), the primary task")
    channels = {task: DATASETS[task].channels for task in tasks}
    if len(set(channels.values())) > 1:
        raise ValueError(f"train.tasks: channel counts differ ({channels}); a shared trunk takes one channel count")
    sides = {task: DATASETS[task].side for task in tasks}
    if image_side is None and len(set(sides.values())) > 1:
        raise ValueError(f"train.tasks: image sides differ ({sides}); set prepare.image_side to bring them to one")


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the schema accepts at the mapping that holds `loc`'s last element."""
    node: Any = Params
    for part in loc[:-1]:
        if isinstance(node, type) and issubclass(node, BaseModel):
            node = node.model_fields[part].annotation
        elif get_origin(node) is dict:
            node = get_args(node)[1]
    return sorted(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def _describe(error: Mapping[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key; allowed keys: {', '.join(_allowed_keys(error['loc']))}"
    if error["type"] == "missing":
        return f"{key}: missing; this key is required"
    message = error["msg"].removeprefix("Value error, ")
    if not key:  # a check across sections names its keys itself
        return message
    return f"{key}: {message}" if isinstance(error["input"], Mapping) else f"{key}: {message} (got {error['input']!r})"


def validate_params(raw: Mapping[str, Any], source: str = "params.yaml") -> Params:
    """Validate a params mapping, raising ParamsError that lists every bad key."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = "\n".join(f"  - {_describe(error)}" for error in exc.errors())
        raise ParamsError(f"{source} is invalid:\n{lines}") from None


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of `raw` with dotted-key overrides (e.g. {"train.lr": 0.1}) applied."""
    merged = json.loads(json.dumps(raw))
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = merged
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ParamsError(f"override {dotted!r}: {part!r} is not a section of params.yaml")
            node = node[part]
        node[leaf] = value
    return merged


def read_raw_params(path: Path | str = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: file not found (run from the repository root)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of stage sections, got {type(raw).__name__}")
    return raw


def load_params(path: Path | str = "params.yaml", overrides: Mapping[str, Any] | None = None) -> Params:
    """Read, override and validate params.yaml."""
    raw = apply_overrides(read_raw_params(path), overrides or {})
    return validate_params(raw, source=str(path))


def params_hash(params: Params) -> str:
    """A stable sha256 of the validated params, for lineage tags."""
    canonical = json.dumps(params.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()
