"""Reading a run directory (what ``mixlab train`` writes): its task, its trained model, and its
evaluation. Used by ``mixlab eval``, the arena and the analysis commands."""
from __future__ import annotations

from pathlib import Path

from .config import ConfigError, load_run_config
from .engine.checkpoint import CheckpointManager, load_state
from .engine.distributed import DistInfo, init_distributed
from .engine.ema import ModelEma
from .engine.tasks import TASKS, get_task
from .factory import create_model
from .weights import check_compatible, load_weights


def _run_weights(path, use_ema: bool) -> tuple[Path, Path]:
    """(run directory, weights file) of a run directory or of one of its checkpoint files."""
    path = Path(path)
    if path.is_dir():
        # the best weights by default; the EMA weights live in the training state of the newest checkpoint
        run_dir, weights_path = path, path / "checkpoints" / "best.safetensors"
        if use_ema or not weights_path.exists():
            latest = CheckpointManager(path / "checkpoints").latest()
            if latest is None:
                raise ConfigError(f"{path} has no checkpoint to evaluate")
            weights_path = latest.with_suffix(".safetensors")
    else:
        weights_path, run_dir = path, path.parent.parent
    if not weights_path.exists():
        raise ConfigError(f"checkpoint {str(weights_path)!r} does not exist")
    return run_dir, weights_path


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
    from the run's dataset unless given. The model is on the CPU, in eval mode.
    """
    run_dir, weights_path = _run_weights(path, use_ema)
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
    return model.eval(), cfg, info, weights_path


def evaluate_run(path, data: str | None = None, data_root: str | None = None, use_ema: bool = False,
                 device: str = "auto", batch_size: int | None = None) -> dict:
    """Evaluate a run directory or one of its checkpoints with its task's evaluation, on the
    validation split of its dataset or of ``data`` (same classes and channels). For a run
    directory: its ``best.safetensors``, or with ``use_ema`` the EMA weights of its newest checkpoint."""
    run_dir, weights_path = _run_weights(path, use_ema)
    cfg = load_run_config(run_dir)
    if data:
        cfg.data.name = data
    if data_root:
        cfg.data.root = data_root
    cfg.train.device = device
    if batch_size:
        cfg.train.batch_size = batch_size
    dinfo = init_distributed(device)
    task = get_task(cfg.task)(cfg, dinfo)
    val = task.build_data(with_train=False)
    model = load_run_model(weights_path, use_ema, info=val.info)[0].to(dinfo.device)
    result = task.evaluate(model, val.val_loader)
    result.update(checkpoint=str(weights_path), data=val.info.name, model=cfg.model.name)
    return result
