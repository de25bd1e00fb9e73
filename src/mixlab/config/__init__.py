"""Run configuration: typed sections, YAML files, recipes and ``--set key=value`` overrides.

A configuration is built in layers, each overriding the last:

1. the defaults of the dataclasses below;
2. a recipe (``recipe: deit``, one of ``mixlab/recipes/*.yaml``, or a path to a YAML file;
   ``basic`` when none is named);
3. the user's YAML file;
4. command-line overrides (``--set optimizer.lr=1e-3``, values parsed as YAML).

Unknown keys and values of the wrong type are errors that name the key, what was wrong and
the closest valid key. The resolved configuration is saved as ``config.yaml`` in every run.

The sections every task shares are the fields of :class:`Config`. A task's own keys (``distill:``) are a
section the task declares (:class:`~mixlab.config.section.TaskSection`, in ``mixlab/config/tasks/<task>.py``)
and this module registers (:func:`register_section`, :data:`SECTIONS`): a ``Config`` carries each registered
section as an attribute, and building, merging, ``to_dict``, validation and resuming treat it as they treat
the fixed sections. See "A task's configuration section" in docs/tasks.md.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..fileio import write_atomic
from .section import ConfigError, TaskSection
from .tasks import BUILT_IN

RECIPES_DIR = Path(__file__).parent.parent / "recipes"
#: the recipe applied when neither the arguments nor a YAML layer name one
DEFAULT_RECIPE = "basic"


@dataclass
class ModelConfig:
    #: a registered name (``mixlab list``)
    name: str = "resnet50"
    #: extra keyword arguments for ``create_model`` (dims, depths, patch_size, ...)
    kwargs: dict = field(default_factory=dict)
    drop_path_rate: float = 0.0
    drop_rate: float = 0.0
    #: LayerScale init for models that have it (ConvNeXt, ViT, PoolFormer); None keeps the model's default
    layer_scale: float | None = None
    #: the weights training starts from (fine-tuning): a mixlab run directory (its best checkpoint), a weights
    #: file (.safetensors, .pth: mixlab's, timm's or the authors' layouts) or 'hf-hub:org/name[/file]'; None:
    #: a fresh initialisation. See docs/finetuning.md
    pretrained: str | None = None
    #: none | backbone (a linear probe: only the classifier head(s) train, the rest stays as it was loaded)
    freeze: str = "none"


@dataclass
class DataConfig:
    #: digits | fashion-mnist | cifar10 | cifar100 | imagefolder
    name: str = "digits"
    root: str | None = None
    #: the size the model sees; None: the dataset's native size (224 for imagefolder)
    img_size: int | None = None
    download: bool = False
    #: stop at the first unreadable image instead of skipping and counting it
    strict: bool = False
    num_workers: int = 0
    #: use only the first N (shuffled) training / validation samples: quick runs and tests
    limit_train: int | None = None
    limit_val: int | None = None


@dataclass
class AugConfig:
    hflip: float = 0.0
    random_resized_crop: bool = False
    rrc_scale: list = field(default_factory=lambda: [0.08, 1.0])
    simple_random_crop: bool = False
    crop_padding: int = 4
    #: e.g. {num_ops: 2, magnitude: 9}; None: off
    rand_augment: dict | None = None
    three_augment: bool = False
    color_jitter: float = 0.0
    random_erasing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    #: probability of applying mixup/cutmix to a batch, and of choosing cutmix when both are on
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    #: repeated augmentation: each image appears this many times per epoch (DeiT's 3), 1: off
    repeated_aug: int = 1


@dataclass
class OptimizerConfig:
    #: adamw | adam | sgd | lamb
    name: str = "adamw"
    #: absolute learning rate; None: base_lr * global batch / lr_base_batch (the linear scaling rule)
    lr: float | None = None
    base_lr: float = 1e-3
    lr_base_batch: int = 512
    weight_decay: float = 0.05
    momentum: float = 0.9
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    #: layer-wise learning-rate decay (fine-tuning), e.g. 0.75; None: off
    layer_decay: float | None = None
    #: clip the global gradient norm to this value; None: off
    clip_grad: float | None = None


@dataclass
class ScheduleConfig:
    #: cosine | constant | step
    name: str = "cosine"
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    #: for "step": epochs at which the lr is multiplied by gamma
    milestones: list = field(default_factory=list)
    gamma: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 10
    #: per-process batch size (the global batch is this x processes x accum_steps)
    batch_size: int = 64
    accum_steps: int = 1
    #: ce (soft-target cross-entropy) | bce (binary cross-entropy, DeiT III)
    loss: str = "ce"
    label_smoothing: float = 0.0
    #: none | bf16 | fp16 (fp16 needs CUDA)
    amp: str = "none"
    compile: bool = False
    seed: int = 0
    #: torch.use_deterministic_algorithms (slower on GPU)
    deterministic: bool = False
    #: auto | cpu | cuda | cuda:N
    device: str = "auto"
    eval_every: int = 1
    #: convert BatchNorm to SyncBatchNorm under DistributedDataParallel
    sync_bn: bool = False


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.9999
    warmup: bool = False


@dataclass
class CheckpointConfig:
    keep_last: int = 2
    keep_best: bool = True
    #: also checkpoint every N optimizer steps inside an epoch (0: only at epoch ends)
    every_steps: int = 0


@dataclass
class LogConfig:
    #: progress bar: auto (when the terminal is interactive) | true | false (YAML booleans too)
    progress: str | bool = "auto"
    tensorboard: bool = False
    print_every: int = 50


@dataclass
class Config:
    #: what the model learns: a task of mixlab.engine.tasks (checked against them when a run starts);
    #: a run's config.yaml without this key (mixlab 0.1.0) is classification
    task: str = "classification"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    #: the recipe this configuration started from (informational once resolved)
    recipe: str | None = None
    #: runs are written to output_dir/name
    output_dir: str = "runs"
    name: str | None = None
    # and one attribute for each registered task section (SECTIONS): cfg.distill, ...

    def __post_init__(self):
        for section in SECTIONS.values():
            setattr(self, section.name, section.type())

    def __getattr__(self, name: str):
        """A section registered after this configuration was made reads as its defaults."""
        section = SECTIONS.get(name)
        if section is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        setattr(self, name, section.type())
        return getattr(self, name)

    def _items(self) -> list[tuple[str, Any]]:
        """``(key, value)`` in the order of config.yaml: the task, the fixed sections, the registered ones,
        then the top-level keys (recipe, output_dir, name)."""
        fixed = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]
        at = max(i for i, (_, v) in enumerate(fixed) if dataclasses.is_dataclass(v)) + 1
        return fixed[:at] + [(name, getattr(self, name)) for name in SECTIONS] + fixed[at:]

    def to_dict(self) -> dict:
        return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else copy.deepcopy(v) for k, v in self._items()}

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._items())})"

    def save(self, path) -> None:
        """Write the configuration as YAML, atomically: a reader (a ``--resume`` of a run that is starting, the
        arena) sees the whole file or none, and a crash mid-write leaves no truncated configuration."""
        write_atomic(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


#: The task-owned sections a :class:`Config` carries besides its fields, by name, in the order they were
#: registered (the built-in tasks' sections, :data:`mixlab.config.tasks.BUILT_IN`, when this module is imported).
SECTIONS: dict[str, TaskSection] = {}


def register_section(name: str | TaskSection, type: type | None = None, **kwargs) -> TaskSection:
    """Make a task's section part of every configuration built from now on.

    ``register_section("mim", MimConfig, task="mim", validate=check, resume_refused="...")`` takes the arguments
    of :class:`~mixlab.config.section.TaskSection` (or one ready-made); a built-in task declares its section in
    ``mixlab/config/tasks/<task>.py`` instead, and this module registers it when it is imported. Registering
    the same section again changes nothing; another section of a name taken, or the name of a fixed section,
    is a ``ValueError``."""
    section = name if isinstance(name, TaskSection) else TaskSection(name, type, **kwargs)
    if section.name in {f.name for f in dataclasses.fields(Config)}:
        raise ValueError(f"{section.name!r} is a key of the configuration itself, not free for a task's section")
    if SECTIONS.get(section.name, section) != section:
        raise ValueError(f"a configuration section named {section.name!r} is already registered "
                         f"({SECTIONS[section.name].type.__name__}, for task {SECTIONS[section.name].task!r})")
    SECTIONS[section.name] = section
    return section


def unregister_section(name: str) -> TaskSection | None:
    """Remove a registered section (tests that register their own); configurations built afterwards lack it."""
    return SECTIONS.pop(name, None)


for _section in BUILT_IN:
    register_section(_section)


# -- building and validating ------------------------------------------------------------------
def _closest(key: str, valid, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    if close:
        return f"; did you mean {prefix + close[0]!r}?"
    return f"; valid keys: {', '.join(prefix + v for v in valid)}"


def _check_type(path: str, value: Any, tp) -> Any:
    """Validate (and gently coerce int -> float) one value against a field's annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(path, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    expected = origin or tp
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if expected in (int, float) and isinstance(value, bool) or not isinstance(value, expected):
        names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
                 dict: "a mapping"}
        raise ConfigError(f"{path}: expected {names.get(expected, expected.__name__)}, got {value!r}")
    return value


def _keys(obj) -> dict[str, Any]:
    """The keys of a section, or of the configuration with its registered sections, and their annotations."""
    hints = typing.get_type_hints(type(obj))
    keys = {f.name: hints[f.name] for f in dataclasses.fields(obj)}
    if isinstance(obj, Config):
        keys.update({name: section.type for name, section in SECTIONS.items()})
    return keys


def _merge_into(obj, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'configuration'}: expected a mapping of keys, got {data!r}")
    hints = _keys(obj)
    fields = set(hints)
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown configuration key {path!r}{_closest(key, sorted(fields), prefix)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge_into(current, value, prefix=f"{path}.")
        else:
            setattr(obj, key, _check_type(path, value, hints[key]))


def load_yaml(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"configuration file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        from ..models.spec import yaml_problem
        raise ConfigError(f"{p}: not valid YAML ({yaml_problem(e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (model:, data:, ...)")
    return data


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    p = RECIPES_DIR / f"{name}.yaml"
    if not p.is_file():
        raise ConfigError(f"unknown recipe {name!r}; recipes: {', '.join(list_recipes())} (or a path to a YAML file)")
    return p


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optimizer.lr=1e-3)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return [k for k in key.strip().split(".") if k], value


def nest(keys: list[str], value) -> dict:
    out: Any = value
    for k in reversed(keys):
        out = {k: out}
    return out


def _apply_layers(cfg: Config, layers, overrides) -> None:
    for layer in layers:
        _merge_into(cfg, layer)
    for item in overrides:
        keys, value = parse_override(item)
        _merge_into(cfg, nest(keys, value))


def build_config(*layers: dict | None, recipe: str | None = None, overrides=()) -> Config:
    """Defaults, then the recipe (from the argument, else the last layer naming one, else
    ``basic``), then each layer in order, then ``section.key=value`` overrides."""
    cfg = Config()
    layers = [layer for layer in layers if layer]
    recipe = recipe or next((layer.get("recipe") for layer in reversed(layers) if layer.get("recipe")), None) \
        or DEFAULT_RECIPE
    _merge_into(cfg, load_yaml(recipe_path(recipe)))
    _apply_layers(cfg, layers, overrides)
    cfg.recipe = recipe
    validate(cfg)
    check_sources(cfg)
    return cfg


def override_config(base: Config, *layers: dict | None, overrides=()) -> Config:
    """A copy of ``base`` (a resolved configuration: no recipe is applied again) with the layers
    and ``section.key=value`` overrides on top, validated."""
    cfg = Config()
    _merge_into(cfg, base.to_dict())
    _apply_layers(cfg, [layer for layer in layers if layer], overrides)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks across keys that types alone cannot express."""
    choices = {
        "optimizer.name": (cfg.optimizer.name, ("adamw", "adam", "sgd", "lamb")),
        "schedule.name": (cfg.schedule.name, ("cosine", "constant", "step")),
        "train.loss": (cfg.train.loss, ("ce", "bce")),
        "train.amp": (cfg.train.amp, ("none", "bf16", "fp16")),
        "log.progress": (str(cfg.log.progress).lower(), ("auto", "true", "false")),
        "model.freeze": (cfg.model.freeze, ("none", "backbone")),
        **_section_choices(cfg),
    }
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(valid)}")
    if not cfg.task.strip():
        raise ConfigError("task: give the name of a task, e.g. classification")
    from ..factory import check_model_name
    try:
        check_model_name(cfg.model.name)
    except ValueError as e:  # an unknown name, or a specification that cannot be built
        raise ConfigError(f"model.name: {e}") from None
    positive = {"train.epochs": cfg.train.epochs, "train.batch_size": cfg.train.batch_size,
                "train.accum_steps": cfg.train.accum_steps, "aug.repeated_aug": cfg.aug.repeated_aug,
                "train.eval_every": cfg.train.eval_every}
    for key, v in positive.items():
        if v < 1:
            raise ConfigError(f"{key} must be at least 1, got {v}")
    for key, v in {"aug.hflip": cfg.aug.hflip, "aug.random_erasing": cfg.aug.random_erasing,
                   "aug.mix_prob": cfg.aug.mix_prob, "aug.switch_prob": cfg.aug.switch_prob,
                   "train.label_smoothing": cfg.train.label_smoothing}.items():
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{key} must be a probability in [0, 1], got {v}")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last must be at least 1 (the resume point), got {cfg.checkpoint.keep_last}")
    if cfg.optimizer.lr is not None and cfg.optimizer.lr <= 0:
        raise ConfigError(f"optimizer.lr must be positive, got {cfg.optimizer.lr}")
    # values that used to be accepted and then ignored or overridden (issue 20, item 7)
    if not isinstance(cfg.model.kwargs, dict):
        raise ConfigError(f"model.kwargs must be a mapping of create_model arguments, got {cfg.model.kwargs!r}")
    from_trainer = {"num_classes": "from the dataset's classes", "in_chans": "from the dataset's channels",
                    "img_size": "from data.img_size: set that instead", "drop_path_rate": "from model.drop_path_rate: "
                    "set that instead", "drop_rate": "from model.drop_rate: set that instead",
                    "layer_scale": "from model.layer_scale: set that instead"}
    for key in sorted(from_trainer.keys() & cfg.model.kwargs.keys()):
        raise ConfigError(f"model.kwargs.{key}: the trainer sets {key} {from_trainer[key]}; remove it from "
                          f"model.kwargs")
    if cfg.checkpoint.every_steps < 0:
        raise ConfigError(f"checkpoint.every_steps must be 0 (checkpoint at epoch ends only) or a number of steps, "
                          f"got {cfg.checkpoint.every_steps}")
    for key, v in {"data.img_size": cfg.data.img_size, "data.limit_train": cfg.data.limit_train,
                   "data.limit_val": cfg.data.limit_val}.items():
        if v is not None and v < 1:
            raise ConfigError(f"{key} must be at least 1 or unset (null), got {v}")
    _validate_sections(cfg)
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be 0 (load in the main process) or more, got {cfg.data.num_workers}")
    if cfg.model.pretrained is not None and not cfg.model.pretrained.strip():
        raise ConfigError("model.pretrained: give a run directory, a weights file or 'hf-hub:org/name', or null "
                          "(start from a fresh initialisation)")


def check_sources(cfg: Config) -> None:
    """Checks of a new configuration against the file system: a local ``model.pretrained`` exists.
    Not part of :func:`validate`, which also reads the configurations of finished runs: a fine-tuned
    run stays readable (and resumable: it does not reload its source) after its source is moved."""
    from ..weights.io import HUB_PREFIX
    source = cfg.model.pretrained
    if source is not None and not source.startswith(HUB_PREFIX) and not Path(source).exists():
        raise ConfigError(f"model.pretrained: {source!r} does not exist; give a mixlab run directory, a weights file "
                          f"(.safetensors, .pth) or a Hugging Face Hub id 'hf-hub:org/name'")


def _section_choices(cfg: Config) -> dict[str, tuple[Any, tuple]]:
    """``{"section.key": (value, valid values)}`` of the registered sections' choices; a key that also takes
    YAML booleans (``str | bool``) compares in lower case."""
    out = {}
    for name, section in SECTIONS.items():
        hints = typing.get_type_hints(section.type)
        for key, valid in section.choices.items():
            value = getattr(getattr(cfg, name), key)
            if bool in typing.get_args(hints[key]) or hints[key] is bool:
                value = str(value).lower()
            out[f"{name}.{key}"] = (value, tuple(valid))
    return out


def _validate_sections(cfg: Config) -> None:
    """A registered section of another task than ``cfg.task`` must be at its defaults (its keys would be
    ignored); the section of this task (or of none) checks itself."""
    for name, section in SECTIONS.items():
        if section.task is not None and cfg.task != section.task:
            changed = section.changed_keys(getattr(cfg, name))
            if changed:
                key = f"{name}.{changed[0]}"
                raise ConfigError(f"{key} is set but task is {cfg.task!r}; set task: {section.task}"
                                  f"{' ' + section.purpose if section.purpose else ''}, or leave {key} out")
        elif section.validate is not None:
            section.validate(cfg)


def config_from_dict(d: dict) -> Config:
    """Rebuild a resolved configuration (a run's config.yaml) exactly, without re-applying the recipe."""
    cfg = Config()
    _merge_into(cfg, d)
    validate(cfg)
    return cfg


RUN_CONFIG = "config.yaml"
#: a run's configuration changes on resume, one JSON line each (see ``Trainer._record_changes``)
CONFIG_HISTORY = "config_history.jsonl"


def load_run_config(run_dir) -> Config:
    """The resolved configuration a run directory was started with (its ``config.yaml``)."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise ConfigError(f"no {RUN_CONFIG} in {str(run_dir)!r}: give the directory of a mixlab run")
    return config_from_dict(yaml.safe_load(path.read_text()))


# -- resuming a run with changes ------------------------------------------------------------------
#: The keys a resumed run may change (``mixlab train --resume RUN --lr 5e-4 --epochs 20``; a name
#: ending in ``.`` covers its whole section). They change how the run goes on — its length, its
#: learning rate and schedule, gradient clipping, numerics and device, logging and checkpoint
#: cadence — but not what its checkpoints mean, so the weights, optimizer state, sampler
#: position and random streams restored from the newest checkpoint stay valid. Every other key
#: is refused (:data:`RESUME_REFUSED` says why). The EMA has no evaluation-only key: turning it
#: on or off, its decay and warm-up shape the averaged weights the checkpoints hold (refused).
RESUME_SAFE = (
    "train.epochs",
    "optimizer.lr", "optimizer.base_lr", "optimizer.lr_base_batch", "optimizer.clip_grad",
    "schedule.",
    "data.num_workers", "data.root",
    "train.amp", "train.device", "train.compile", "train.deterministic", "train.eval_every",
    "checkpoint.every_steps", "checkpoint.keep_last", "checkpoint.keep_best",
    "log.",
)
#: Where a run is and where its configuration came from: a difference is not a change (a resumed
#: run keeps its own), so ``train(cfg, run_dir=other, resume=True)`` may name another run.
RESUME_LOCATION = ("name", "output_dir", "recipe")
#: Why a key outside :data:`RESUME_SAFE` cannot change on resume, by key or section (``.``).
RESUME_REFUSED = {
    "task": "the checkpoints hold a model trained for this task",
    "model.pretrained": "the checkpoints hold weights trained from this source (a resumed run does not read it "
                        "again)",
    "model.freeze": "the optimizer state in the checkpoints is of the parameters this setting trains",
    "model.": "the checkpoints hold this model's weights",
    "data.": "the checkpoints hold a model trained on this data, and their sampler position counts its batches",
    "aug.": "the checkpoints hold a model trained on data augmented this way",
    "optimizer.": "the optimizer state in the checkpoints was built with it",
    "train.seed": "the random streams the checkpoints restore come from this seed",
    "train.batch_size": "the sampler position and step count in the checkpoints are counted in batches of this size",
    "train.accum_steps": "the step count in the checkpoints is counted in accumulated batches",
    "train.": "it changes what the run's checkpoints mean",
    "ema.": "the EMA weights in the checkpoints were averaged with it",
}
# and each registered section's own reason (TaskSection.resume_refused, "section."): resume_rules()


def resume_rules() -> tuple[tuple[str, ...], dict[str, str]]:
    """The keys a resumed run may change and why the others may not (:data:`RESUME_SAFE`,
    :data:`RESUME_REFUSED`), with those of the registered sections."""
    safe = RESUME_SAFE + tuple(f"{name}.{key}" for name, s in SECTIONS.items() for key in s.resume_safe)
    return safe, {**RESUME_REFUSED, **{f"{name}.": s.resume_refused for name, s in SECTIONS.items()}}


def _flatten(cfg: Config) -> dict:
    """``{"section.key": value}`` for every key of the sections, ``{key: value}`` for the top-level ones."""
    out = {}
    for k, v in cfg.to_dict().items():
        if dataclasses.is_dataclass(getattr(cfg, k)):
            out.update({f"{k}.{sk}": sv for sk, sv in v.items()})
        else:
            out[k] = v
    return out


def _covered(key: str, names) -> str | None:
    """The entry of ``names`` (keys, or sections ending in '.') that covers ``key``."""
    return next((n for n in names if key == n or (n.endswith(".") and key.startswith(n))), None)


def resume_config(saved: Config, requested: Config) -> tuple[Config, list[tuple[str, Any, Any]]]:
    """The configuration a resumed run continues with, and its changes ``[(key, old, new)]``
    in the order of the configuration's keys.

    ``saved`` is the run's ``config.yaml``, ``requested`` the configuration asked for. The keys of
    :data:`RESUME_SAFE` (and a registered section's ``resume_safe`` keys) take the requested values, the
    :data:`RESUME_LOCATION` keys keep the saved ones, and any other difference is a :class:`ConfigError`
    naming every such key and why.
    """
    old, new = _flatten(saved), _flatten(requested)
    safe, reasons = resume_rules()
    changes, refused = [], []
    for key, value in new.items():
        if value == old[key] or key in RESUME_LOCATION:
            continue
        if _covered(key, safe):
            changes.append((key, old[key], value))
        else:
            refused.append(f"{key} ({old[key]!r} -> {value!r}: {reasons[_covered(key, reasons)]})")
    if refused:
        raise ConfigError(f"a resumed run cannot change {'; '.join(refused)}. Only these keys may change on resume: "
                          f"{', '.join(k + '*' if k.endswith('.') else k for k in safe)}; to train with the "
                          f"others, start a new run (another --name)")
    cfg = Config()
    _merge_into(cfg, {**requested.to_dict(), **{k: getattr(saved, k) for k in RESUME_LOCATION}})
    validate(cfg)
    return cfg, changes
