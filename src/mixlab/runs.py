"""Reading a run directory (what ``mixlab train`` writes): its task, its trained model, and its
evaluation. Used by ``mixlab eval``, the arena and the analysis commands."""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path

from .config import RUN_CONFIG, Config, ConfigError, load_run_config
from .data import Preprocessing
from .engine.checkpoint import load_state, run_weights
from .engine.distributed import DistInfo, init_distributed
from .engine.ema import ModelEma
from .engine.tasks import TASKS, get_task
from .factory import create_model
from .fileio import write_json
from .weights import check_compatible, load_metadata, load_weights, metadata_config

#: how many differing classes a class-name message lists
_MAX_CLASSES_SHOWN = 10


def check_class_scores(run_dir, purpose: str) -> None:
    """Refuse, with a ConfigError that says why, a run whose task's model gives no class scores
    (or whose task this mixlab does not know): ``purpose`` (e.g. "the arena") needs them."""
    name = load_run_config(run_dir).task
    task = TASKS.get(name)
    if task is None or not task.class_scores:
        why = (f"which this mixlab does not know (known tasks: {', '.join(sorted(TASKS))})" if task is None
               else "whose model outputs no class scores")
        scoring = ", ".join(sorted(n for n, t in TASKS.items() if t.class_scores))
        raise ConfigError(f"{run_dir} is a run of the task {name!r}, {why}; {purpose} reads the class scores of "
                          f"an image classifier (runs of the tasks: {scoring})")


def load_run_model(path, use_ema: bool = False, info=None):
    """The trained model of a run directory or checkpoint file, built as the run built it.

    Returns ``(model, cfg, info, weights_path)``; ``info`` (the dataset's DatasetInfo) is read
    from the run's dataset unless given. The model is on the CPU, in eval mode; its ``pretrained_cfg``
    holds the data configuration the checkpoint records (``mean``, ``std``, ``crop_pct``,
    ``interpolation``, ``input_size``; :meth:`Preprocessing.from_model <mixlab.data.Preprocessing.from_model>`).
    """
    run_dir, weights_path = run_weights(path, use_ema)
    cfg = load_run_config(run_dir)  # a checkpoint is loaded as the run that wrote it built its model
    task = get_task(cfg.task)(cfg, DistInfo())
    if info is None:
        info = task.data_info()
    model = task.setup(create_model(cfg.model.name, **task.model_kwargs(info)))
    weights, meta = load_weights(weights_path)
    if use_ema:
        state_file = weights_path.with_name(weights_path.name.replace(".safetensors", ".state.pt"))
        state = load_state(state_file)["train_state"]
        if "ema" not in state:
            raise ConfigError(f"{state_file} holds no EMA weights (the run had ema.enabled false)")
        ema = ModelEma(model)
        ema.load_state_dict(state["ema"])
        model = ema.module
    else:
        check_compatible(model, weights, meta)
        model.load_state_dict(weights)
    # the data configuration the checkpoint records (what older ones lack: the data's own), as create_model
    # gives a model loaded with weights (Preprocessing.from_model reads it)
    prep = Preprocessing.from_metadata(meta, fallback=Preprocessing.from_data(info), where=str(weights_path))
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **dataclasses.asdict(prep)}
    return model.eval(), cfg, info, weights_path


def check_classes(trained: Sequence[str] | None, data: Sequence[str], where: str,
                  allow_mismatch: bool = False) -> None:
    """Compare the class names a model was ``trained`` on (``None``: not recorded) with those of the
    evaluation ``data``, label by label; ``where`` names the checkpoint in the messages.

    Different names (or another number of them) raise a ConfigError listing each label that
    differs, or with ``allow_mismatch`` give that list as a warning. The same names in another
    order are refused too: the model's outputs would be scored against other labels (mixlab does
    not remap them). Names not recorded (runs written before mixlab recorded them, such as those of
    mixlab 0.1.0) give a warning that they cannot be checked.
    """
    if trained is None:
        warnings.warn(f"{where} records no class names (it was written before mixlab recorded them): whether the "
                      f"evaluation data's {len(data)} classes are the ones it was trained on cannot be checked",
                      UserWarning, stacklevel=2)
        return
    trained, data = list(trained), list(data)
    if trained == data:
        return
    lines = []
    for i in range(max(len(trained), len(data))):
        was = f"trained as {trained[i]!r}" if i < len(trained) else "the run has none"
        now = f"the data says {data[i]!r}" if i < len(data) else "the data has none"
        if i >= len(trained) or i >= len(data) or trained[i] != data[i]:
            lines.append(f"class {i}: {was}, {now}")
    shown = "; ".join(lines[:_MAX_CLASSES_SHOWN]) + (f"; and {len(lines) - _MAX_CLASSES_SHOWN} more"
                                                      if len(lines) > _MAX_CLASSES_SHOWN else "")
    if len(trained) != len(data):
        what = f"was trained on {len(trained)} classes, the evaluation data has {len(data)}"
    elif sorted(trained) == sorted(data):
        what = "was trained on the same names in another order than the evaluation data's (mixlab does not remap them)"
    else:
        what = "was trained on other class names than the evaluation data's"
    if allow_mismatch:
        warnings.warn(f"{where} {what} ({shown}); evaluating anyway, as asked: the scores compare the model's "
                      f"classes with other labels", UserWarning, stacklevel=2)
        return
    raise ConfigError(f"{where} {what}: {shown}. The scores would compare the model's classes with other labels; "
                      f"pass --allow-class-mismatch (allow_class_mismatch=True) to evaluate anyway")


def check_preprocessing(model: Preprocessing, data: Preprocessing, where: str) -> list[str]:
    """What the evaluation data's own preprocessing (``data``) does otherwise than the checkpoint's
    (``model``: what ``where`` records), one phrase per difference (another input size,
    normalisation, crop or interpolation); a ConfigError when the channels differ, which no
    preprocessing mends."""
    if model.input_size[0] != data.input_size[0]:
        raise ConfigError(f"{where} takes {model.input_size[0]}-channel images, the evaluation data has "
                          f"{data.input_size[0]}; evaluate it on data with its channels")
    return model.differences(data, ("the checkpoint", "the data"))


def _checkpoint_size(cfg: Config, metadata: dict, where: str) -> None:
    """Set the data's image size to the input size the checkpoint records (mixlab's datasets give
    square images), so that the model is built, and the images prepared, as the weights were made."""
    size = metadata_config(metadata).get("input_size")
    if size is None:
        return
    _, h, w = size
    if h != w:
        raise ConfigError(f"{where} records a {h}x{w} input and mixlab's evaluation data is square; evaluate it "
                          f"with --data-preprocessing (the data's own size) or convert it to a square size")
    cfg.data.img_size = h


def evaluate_run(path, data: str | None = None, data_root: str | None = None, use_ema: bool = False,
                 device: str = "auto", batch_size: int | None = None, allow_class_mismatch: bool = False,
                 data_preprocessing: bool = False, out=None) -> dict:
    """Evaluate a run directory or one of its checkpoints with its task's evaluation, on the
    validation split of its dataset or of ``data`` (same classes and channels). For a run
    directory: its ``best.safetensors``, or with ``use_ema`` the EMA weights of its newest checkpoint.

    The class names the checkpoint records must be the data's (:func:`check_classes`; with
    ``allow_class_mismatch`` a difference is a warning instead of a ConfigError).

    The images are prepared as the checkpoint records (its data configuration,
    :meth:`Preprocessing.from_metadata <mixlab.data.Preprocessing.from_metadata>`: input size, mean/std,
    crop, interpolation; what a checkpoint written before they were recorded lacks is what the
    evaluation data's own transform does, as it was then), or with ``data_preprocessing`` as the
    evaluation data's own transform prepares them. The result's ``preprocessing`` says which was used
    (``used``: ``"checkpoint"`` or ``"data"``), the configuration, and ``differences``: how the data's
    own differs from the checkpoint's.

    ``out``: a folder for what the evaluation writes: ``eval.json`` (the result) and the task's pictures of the
    model (:meth:`Task.pictures <mixlab.engine.tasks.Task.pictures>`; masked image modeling's reconstructions);
    the result's ``files`` lists them."""
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    run_dir, weights_path = run_weights(path, use_ema)
    if not (run_dir / RUN_CONFIG).is_file() and not Path(path).is_dir():
        return _evaluate_weights_file(weights_path, data, data_root, use_ema, device, batch_size,
                                      allow_class_mismatch, data_preprocessing, out)
    cfg = load_run_config(run_dir)
    metadata = load_metadata(weights_path)
    if data:
        cfg.data.name = data
    if data_root:
        cfg.data.root = data_root
    if not data_preprocessing:
        _checkpoint_size(cfg, metadata, str(weights_path))
    cfg.train.device = device
    if batch_size:
        cfg.train.batch_size = batch_size
    task = get_task(cfg.task)(cfg, init_distributed(device))
    return _evaluate(task, weights_path, metadata, cfg.model.name,
                     lambda info: load_run_model(weights_path, use_ema, info=info)[0], allow_class_mismatch,
                     data_preprocessing, out)


def _evaluate(task, weights_path: Path, metadata: dict, model_name: str, build, allow_class_mismatch: bool,
              data_preprocessing: bool, out=None) -> dict:
    """``task``'s evaluation of the model ``build(info)`` makes from ``weights_path`` (on the CPU, in eval
    mode; ``metadata``: the file's), on the task's validation data, after checking the data against what
    the checkpoint records (:func:`check_classes`, :func:`check_preprocessing`); the images prepared with
    the checkpoint's data configuration unless ``data_preprocessing``."""
    val = task.build_data(with_train=False)
    recorded = metadata_config(metadata)
    check_classes(recorded.get("classes"), val.info.classes, str(weights_path), allow_class_mismatch)
    own = Preprocessing.from_data(val.info)
    recorded_prep = Preprocessing.from_metadata(metadata, fallback=own, where=str(weights_path))
    differences = check_preprocessing(recorded_prep, own, str(weights_path))
    dataset = val.val_loader.dataset
    used = "data"
    if not data_preprocessing and hasattr(dataset, "transform"):
        if differences:  # the checkpoint's own transform in place of the data's
            dataset.transform = recorded_prep.eval_transform(val.info.native_size)
        used = "checkpoint"
    model = build(val.info).to(task.device)
    result = task.evaluate(model, val.val_loader)
    result.update(checkpoint=str(weights_path), data=val.info.name, model=model_name,
                  preprocessing={"used": used, **(recorded_prep if used == "checkpoint" else own).to_dict(),
                                 "differences": differences})
    if out is not None:
        out = Path(out)
        pictures = [str(p) for p in task.pictures(model, out)]
        result["files"] = [str(out / "eval.json"), *pictures]
        write_json(out / "eval.json", result)
    return result


def _evaluate_weights_file(weights_path: Path, data: str | None, data_root: str | None, use_ema: bool, device: str,
                           batch_size: int | None, allow_class_mismatch: bool = False,
                           data_preprocessing: bool = False, out=None) -> dict:
    """Evaluate a classifier's weights file outside a run (``mixlab convert``'s output, or a checkpoint
    copied out of its run): the model its mixlab metadata names, on the validation split of ``data``."""
    metadata = load_metadata(weights_path)
    arch = metadata.get("architecture")
    where = f"{weights_path} is not inside a mixlab run (no {RUN_CONFIG} in {str(weights_path.parent.parent)!r})"
    if not arch:
        raise ConfigError(f"{where} and has no mixlab metadata naming its model; give a run directory, or convert "
                          f"the file first: mixlab convert {weights_path} OUT.safetensors --model NAME")
    if not data:
        raise ConfigError(f"{where}: name the dataset to evaluate its {arch} model on with --data (its validation "
                          f"split; the same classes)")
    if use_ema:
        raise ConfigError(f"{where}: --ema reads the EMA weights of a run's checkpoint; evaluate the file without it")
    cfg = Config()
    cfg.model.name, cfg.data.name, cfg.data.root, cfg.train.device = arch, data, data_root, device
    _, h, w = metadata_config(metadata).get("input_size", (None, None, None))
    if h is not None and h == w:
        cfg.data.img_size = h  # the size the weights were made for (the dataset's images are resized to it)
    elif not data_preprocessing:
        _checkpoint_size(cfg, metadata, str(weights_path))  # says why a non-square input cannot be evaluated
    if batch_size:
        cfg.train.batch_size = batch_size
    task = get_task("classification")(cfg, init_distributed(device))

    def build(info):
        model = create_model(arch, pretrained=str(weights_path), in_chans=info.in_chans, img_size=info.img_size)
        if model.num_classes != info.num_classes:
            raise ConfigError(f"{weights_path} classifies {model.num_classes} classes, {data} has {info.num_classes}; "
                              f"evaluate it on a dataset with its classes")
        return model.eval()

    return _evaluate(task, weights_path, metadata, arch, build, allow_class_mismatch, data_preprocessing, out)
