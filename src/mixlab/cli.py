"""The ``mixlab`` command."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .version import __version__


def _fmt_int(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def _fmt_macs(n: int) -> str:
    return f"{n / 1e9:.3f}G" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def add_list_parser(sub) -> None:
    s = sub.add_parser("list", help="list registered models (optionally matching a pattern)")
    s.add_argument("pattern", nargs="?", help="shell-style pattern or substring, e.g. 'swin*' or 'deit'")
    s.add_argument("--mixers", action="store_true",
                   help="list the mixers a specification's stages can name, with their options, instead")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_list)


def cmd_list(args) -> int:
    from .registry import list_models, model_family

    if args.mixers:
        return _list_spec_mixers(args)
    names = list_models(args.pattern or "*")
    if not names:
        print(f"no registered model matches {args.pattern!r}; `mixlab list` shows them all", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([{"name": n, "family": model_family(n)} for n in names], indent=2))
    else:
        for n in names:
            print(n)
    return 0


def _list_spec_mixers(args) -> int:
    """The mixers a specification's stages can name, with their options and defaults."""
    import fnmatch

    from .registry import MIXERS

    names = [n for n in MIXERS if fnmatch.fnmatchcase(n, args.pattern or "*")]
    if not names:
        print(f"no spec mixer matches {args.pattern!r}; `mixlab list --mixers` shows them all", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([{"mixer": n, "options": MIXERS[n].options, "block": MIXERS[n].description} for n in names],
                         indent=2))
        return 0
    width = max(map(len, names))
    for n in names:
        opts = ",".join(f"{k}={v}" for k, v in MIXERS[n].options.items()) or "-"
        print(f"{n:<{width}}  {MIXERS[n].description}  [{opts}]")
    return 0


def _model_options(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items (values parsed as YAML) -> keyword arguments of ``create_model``."""
    import yaml

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or "." in key:
            raise ValueError(f"--set {item!r} must look like KEY=VALUE with KEY a create_model argument "
                             "(e.g. context=nonlocal, context_stages=[2,3])")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key] = raw
    return out


def add_info_parser(sub) -> None:
    s = sub.add_parser("info", help="parameters, GMACs and per-stage breakdown of a model")
    s.add_argument("model", help="a registered model name (see `mixlab list`)")
    s.add_argument("--img-size", type=int, default=None, help="input size (default: the model's own)")
    s.add_argument("--in-chans", type=int, default=None, help="input channels (default 3)")
    s.add_argument("--num-classes", type=int, default=None, help="classes of the head (default 1000)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a keyword argument of create_model, the value parsed as YAML (repeatable), "
                        "e.g. --set context=gc --set context_stages=[1,2,3]")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from .analysis import profile_model

    kwargs = _model_options(args.set or [])
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    prof = profile_model(args.model, img_size=args.img_size, in_chans=args.in_chans, **kwargs)
    if args.json:
        print(json.dumps(prof.to_dict(), indent=2, default=list))
        return 0
    c, h, w = prof.input_size
    options = "".join(f"  {item}" for item in args.set or [])
    print(f"{args.model}{options}   input {c}x{h}x{w}")
    print(f"parameters: {prof.mparams:.2f}M ({prof.params:,})")
    print(f"GMACs:      {prof.gmacs:.2f} (multiply-adds, fvcore convention, attention matmuls included)")
    rows = []
    for p in prof.parts:
        res = f"{p.resolution[0]}x{p.resolution[1]}" if p.resolution else ""
        rows.append([p.name, res, p.channels or "", p.depth or "", p.mixer or "", _fmt_int(p.params),
                     _fmt_macs(p.macs)])
    print()
    print(_table(rows, ["part", "resolution", "channels", "depth", "mixer", "params", "MACs"]))
    print()
    print(f"features (forward_features): {tuple(prof.feature_shape)}")
    if prof.stage_shapes and len(prof.stage_shapes) <= 8:
        print("feature maps (features_only): " + ", ".join(str(tuple(s)) for s in prof.stage_shapes))
    print(f"logits: {tuple(prof.output_shape)}")
    return 0


# command-line flags of `mixlab train` -> configuration keys
_TRAIN_FLAGS = {"model": "model.name", "data": "data.name", "data_root": "data.root", "img_size": "data.img_size",
                "strict": "data.strict", "epochs": "train.epochs", "batch_size": "train.batch_size",
                "device": "train.device", "amp": "train.amp", "compile": "train.compile", "seed": "train.seed",
                "lr": "optimizer.lr", "output": "output_dir", "name": "name",
                "pretrained": "model.pretrained"}


def _train_config(args, base=None):
    """The configuration the arguments ask for: the recipe, the YAML file, the flags and --set; or,
    given ``base`` (a resumed run's configuration), the flags and --set on top of it."""
    from .config import build_config, load_yaml, nest, override_config

    user = load_yaml(args.config) if args.config else None
    flags: dict = {}
    for flag, key in _TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is None or value is False:
            continue
        section = nest(key.split("."), value)
        for k, v in section.items():
            flags[k] = {**flags.get(k, {}), **v} if isinstance(v, dict) else v
    if base is not None:
        return override_config(base, flags, overrides=args.set or [])
    return build_config(user, flags, recipe=args.recipe, overrides=args.set or [])


def add_train_parser(sub) -> None:
    s = sub.add_parser("train", help="train a model (a YAML config, a recipe, flags and --set overrides)",
                       description="Train and evaluate a model. Configuration layers: the recipe (default 'basic'), "
                                   "the YAML file, the flags, then --set section.key=value overrides. Under torchrun "
                                   "the same command trains with DistributedDataParallel.")
    _train_arguments(s)
    s.set_defaults(func=cmd_train)


def add_pretrain_parser(sub) -> None:
    s = sub.add_parser("pretrain", help="self-supervised pretraining by masked image modeling (SimMIM, MAE)",
                       description="mixlab train --task mim with the method's recipe: the model learns to reconstruct "
                                   "hidden patches of the images, without their labels (an image folder needs no "
                                   "class folders). Fine-tune the run afterwards with mixlab train --pretrained RUN. "
                                   "See docs/mim.md.")
    s.add_argument("--method", choices=["simmim", "mae"], default="simmim",
                   help="simmim (any model with a patch stem) or mae (plain ViTs); its recipe unless --recipe")
    _train_arguments(s)
    s.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args) -> int:
    if not (args.resume and args.resume is not True and not args.config):  # a resumed run keeps its configuration
        args.recipe = args.recipe or args.method
        args.set = ["task=mim", f"mim.method={args.method}", *(args.set or [])]
    return cmd_train(args)


def _train_arguments(s) -> None:
    """The arguments of ``mixlab train`` (and ``mixlab pretrain``)."""
    s.add_argument("config", nargs="?", help="a YAML configuration file (sections model:, data:, train:, ...)")
    s.add_argument("--recipe", help="deit | convnext | deit3 | basic | simmim | mae, or a YAML path (see `mixlab "
                                    "recipes`)")
    s.add_argument("--model", help="a registered model name")
    s.add_argument("--pretrained", metavar="SOURCE",
                   help="fine-tune: start from a mixlab run directory (its best checkpoint), a weights file "
                        "(.safetensors, .pth) or 'hf-hub:org/name'; a new classifier where the classes differ "
                        "(model.pretrained; --set model.freeze=backbone for a linear probe)")
    s.add_argument("--data", help="digits | fashion-mnist | cifar10 | cifar100 | imagefolder")
    s.add_argument("--data-root", help="where the dataset's files are")
    s.add_argument("--img-size", type=int, help="input size the model sees (default: the dataset's)")
    s.add_argument("--epochs", type=int)
    s.add_argument("--batch-size", type=int, help="per process")
    s.add_argument("--lr", type=float, help="absolute learning rate")
    s.add_argument("--seed", type=int)
    s.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    s.add_argument("--amp", choices=["none", "bf16", "fp16"])
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    s.add_argument("--output", help="parent directory of runs (default runs/)")
    s.add_argument("--name", help="run name (default MODEL-DATA)")
    s.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                   help="continue an interrupted or finished run (its directory, or the one this configuration "
                        "names); flags and --set change the keys safe to change (epochs, lr, schedule, amp, "
                        "device, ...: mixlab.config.RESUME_SAFE), each recorded in config_history.jsonl")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key, e.g. optimizer.lr=1e-3")
    s.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")


def cmd_train(args) -> int:
    import yaml

    from .engine.trainer import train

    if args.resume and args.resume is not True and not args.config:
        from .config import ConfigError, load_run_config, resume_config
        if args.recipe:
            raise ConfigError("--recipe starts a new configuration; a resumed run keeps its own (change its keys "
                              "with flags or --set, or give a complete YAML file)")
        run_dir = Path(args.resume)
        saved = load_run_config(run_dir)
        cfg = _train_config(args, base=saved)  # the run's configuration with the requested changes
        if args.print_config:
            print(yaml.safe_dump(resume_config(saved, cfg)[0].to_dict(), sort_keys=False))
            return 0
        train(cfg, run_dir=run_dir, resume=True)
        return 0
    cfg = _train_config(args)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    train(cfg, run_dir=args.resume if isinstance(args.resume, str) else None, resume=bool(args.resume))
    return 0


def add_eval_parser(sub) -> None:
    s = sub.add_parser("eval", help="evaluate a run directory or checkpoint on its validation data")
    s.add_argument("run", help="a run directory (uses checkpoints/best.safetensors) or a checkpoint file")
    s.add_argument("--data", help="another dataset with the same classes")
    s.add_argument("--data-root")
    s.add_argument("--ema", action="store_true", help="evaluate the EMA weights of that checkpoint")
    s.add_argument("--device", default="auto")
    s.add_argument("--batch-size", type=int)
    s.add_argument("--json", action="store_true")
    s.add_argument("--out", metavar="DIR", help="also write eval.json and what the run's task draws of the model "
                                                 "(masked image modeling: reconstructions.png) into DIR")
    s.add_argument("--allow-class-mismatch", action="store_true",
                   help="evaluate even when the data's class names differ from the ones the run was trained on "
                        "(a warning instead of an error)")
    s.add_argument("--data-preprocessing", action="store_true",
                   help="prepare the images with the evaluation data's own transform (its size, mean/std, crop) "
                        "instead of the data configuration the checkpoint records (the default)")
    s.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    import warnings

    from .runs import evaluate_run

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # each warning once, as Python shows them
        r = evaluate_run(args.run, data=args.data, data_root=args.data_root, use_ema=args.ema, device=args.device,
                         batch_size=args.batch_size, allow_class_mismatch=args.allow_class_mismatch,
                         data_preprocessing=args.data_preprocessing, out=args.out)
    for w in caught:
        print(f"mixlab eval: warning: {w.message}", file=sys.stderr)
    prep = r.get("preprocessing", {})
    if prep.get("used") == "data" and prep.get("differences"):
        print(f"mixlab eval: note: the images were prepared with the data's own transform, as asked, not as "
              f"{r['checkpoint']} records: {'; '.join(prep['differences'])}", file=sys.stderr)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        where = f"{r['model']} on {r['data']} (" + (f"{r['images']} images, " if "images" in r else "") \
            + f"{r['checkpoint']})"
        if "top1" in r:  # classification
            heads = (f", class head {r['top1_cls']:.2f}%, distillation head {r['top1_dist']:.2f}%"
                     if "top1_cls" in r else "")  # a distillation run's student
            print(f"{where}: top-1 {r['top1']:.2f}%, top-5 {r['top5']:.2f}%, loss {r['loss']:.4f}{heads}")
        else:  # another task: its metrics as it names them
            shown = {k: v for k, v in r.items() if isinstance(v, float) and k not in ("images",)}
            print(f"{where}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
        if r.get("files"):
            print("wrote " + ", ".join(r["files"]))
    return 0


def add_predict_parser(sub) -> None:
    s = sub.add_parser("predict", help="the top-k classes of image files, with probabilities, by a trained model",
                       description="Predict the classes of image files (PNG, JPEG, BMP, WebP, GIF; directories are "
                                   "searched at any depth) with a run's best checkpoint, a weights file with mixlab "
                                   "metadata, or a registered model with --weights. Images are prepared with the "
                                   "model's own data configuration (input size, mean/std, crop, interpolation). "
                                   "Unreadable files are reported on stderr and skipped (exit status 1 when any "
                                   "was), or stop everything with --strict (exit status 2).")
    s.add_argument("model", metavar="MODEL_OR_RUN", help="a run directory, a checkpoint file, or a registered model "
                   "name / 'spec:...' with --weights")
    s.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files and directories of them")
    s.add_argument("--weights", help="the weights of a named model: a file or hf-hub:org/name")
    s.add_argument("--classes", metavar="FILE", help="class names, one a line in output order (default: the ones "
                   "the checkpoint records, else the output indices)")
    s.add_argument("--top-k", type=int, default=5, help="classes shown per image (default 5, at most the number of "
                   "classes)")
    s.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    form = s.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="write JSON instead of a table")
    form.add_argument("--csv", action="store_true", help="write CSV (image,rank,label,index,probability) instead "
                      "of a table")
    s.add_argument("--output", metavar="FILE", help="write the table, JSON or CSV to FILE (atomically) instead of "
                   "stdout")
    s.add_argument("--strict", action="store_true", help="stop at the first unreadable image (exit status 2) instead "
                   "of skipping it")
    s.set_defaults(func=cmd_predict)


def _predictions_text(results, top_k: int, form: str) -> str:
    """The predictions as a table, JSON or CSV; ``results``: (predictor, predictions, skipped)."""
    import csv
    import io

    predictor, done, skipped = results
    if form == "json":
        return json.dumps({"model": predictor.source, "preprocessing": predictor.preprocessing.to_dict(),
                           "predictions": [p.to_dict() for p in done],
                           "skipped": [{"image": s.image, "error": s.error} for s in skipped]}, indent=2) + "\n"
    if form == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["image", "rank", "label", "index", "probability"])
        for p in done:
            for rank, (i, lab, q) in enumerate(zip(p.indices, p.labels, p.probabilities), 1):
                writer.writerow([p.image, rank, lab, i, f"{q:.6g}"])
        return buf.getvalue()
    k = max((len(p.indices) for p in done), default=min(top_k, 1))
    rows = [[p.image] + [f"{lab} {100 * q:.1f}%" for lab, q in zip(p.labels, p.probabilities)] for p in done]
    return _table(rows, ["image"] + [f"top-{r}" for r in range(1, k + 1)]) + "\n"


def cmd_predict(args) -> int:
    from .engine.distributed import pick_device
    from .fileio import write_atomic
    from .predict import Skipped, find_images, load_predictor, predict

    out = Path(args.output) if args.output else None
    if out is not None and out.is_dir():
        raise ValueError(f"--output {args.output!r} is a directory; name the file to write")
    device = pick_device(args.device)
    images = find_images(args.images)  # before the model: a typing error in a path is said at once
    predictor = load_predictor(args.model, weights=args.weights, classes_file=args.classes)
    done, skipped = [], []
    show_bar = sys.stderr.isatty() and len(images) > args.batch_size
    for r in predict(predictor, images, batch_size=args.batch_size, top_k=args.top_k, device=device,
                     strict=args.strict, progress=show_bar):
        if isinstance(r, Skipped):
            skipped.append(r)
            print(f"mixlab predict: skipped {r.image}: {r.error}", file=sys.stderr)
        else:
            done.append(r)
    text = _predictions_text((predictor, done, skipped), args.top_k, "json" if args.json else
                             "csv" if args.csv else "table")
    if out is not None:
        write_atomic(out, text)
    else:
        sys.stdout.write(text)
    if skipped:
        print(f"mixlab predict: {len(done)} image(s) predicted, {len(skipped)} unreadable file(s) skipped "
              f"(exit status 1)", file=sys.stderr)
        return 1
    return 0


def add_arena_parser(sub) -> None:
    s = sub.add_parser("arena", help="train several models under one recipe and seeds; write a comparison report",
                       description="Train a line-up of models (default: the nano family) under the identical "
                                   "recipe, data, epochs and seeds, then write a report directory: leaderboard "
                                   "(Markdown, CSV), plots (PNG) and one self-contained HTML page. Rerunning the "
                                   "same command skips finished runs and continues an interrupted one.")
    s.add_argument("models", nargs="*", metavar="MODEL",
                   help="registered names, 'spec:...' strings or spec .yaml files; 'nano' stands for the nano "
                        "line-up (the default: eight families), 'nano-zoo' for the nano models of the further "
                        "families, 'nano-all' for both; MODEL@simmim or MODEL@mae: the model fine-tuned from its "
                        "own pretraining by that method (pretrained once, in the arena directory, on all the "
                        "data's training images), MODEL@METHOD-probe: a linear probe on it")
    s.add_argument("--data", default="digits", help="digits (default, bundled) | fashion-mnist | cifar10 | "
                   "cifar100 | imagefolder")
    s.add_argument("--data-root", help="where the dataset's files are")
    s.add_argument("--epochs", type=int, help="epochs per run (default: 5 on digits, else the recipe's)")
    s.add_argument("--seeds", type=int, default=1, help="runs per model, with seeds 0..N-1 (default 1)")
    s.add_argument("--recipe", default="arena", help="the recipe every model trains with (default 'arena')")
    s.add_argument("--img-size", type=int, help="input size (default: the dataset's, at least 28)")
    s.add_argument("--batch-size", type=int)
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key for every run")
    s.add_argument("--out", help="report directory (default arena/DATA-EPOCHSep-SEEDSseed)")
    s.add_argument("--pretrain-epochs", type=int, help="epochs of the pretraining of MODEL@METHOD entries "
                   "(default: --epochs)")
    s.add_argument("--pretrain-set", action="append", metavar="KEY=VALUE", help="set a key of the pretraining "
                   "of MODEL@METHOD entries alone (it takes the method's recipe and the arena's data, image size, "
                   "batch size and validation images, not the arena's other --set)")
    s.add_argument("--jobs", type=int, default=1, help="runs trained at the same time, each with its share of "
                   "the CPU cores (default 1); small models use several cores poorly, so on a CPU two or more "
                   "side by side finish sooner; with several GPUs each run gets its own (the recipe and the "
                   "report are unchanged)")
    s.add_argument("--no-speed", action="store_true", help="skip the speed measurements")
    s.add_argument("--report-only", action="store_true", help="train nothing: write the report of the runs that "
                   "have finished (with the same settings as the arena that ran them)")
    s.add_argument("--quiet", action="store_true", help="print only the final leaderboard")
    s.set_defaults(func=cmd_arena)


def cmd_arena(args) -> int:
    from .arena import ArenaSettings, run_arena

    settings = ArenaSettings(models=args.models or ["nano"], data=args.data, data_root=args.data_root,
                             epochs=args.epochs, seeds=args.seeds, recipe=args.recipe, img_size=args.img_size,
                             batch_size=args.batch_size, device=args.device, overrides=args.set or [],
                             out=args.out, measure_speed=not args.no_speed, train=not args.report_only,
                             jobs=args.jobs, pretrain_epochs=args.pretrain_epochs,
                             pretrain_overrides=args.pretrain_set or [])
    try:
        result = run_arena(settings, quiet=args.quiet)
    except KeyboardInterrupt:
        print("mixlab arena: interrupted; finished runs are kept, rerun the same command to continue",
              file=sys.stderr)
        return 130
    if result["failed"]:
        print(f"mixlab arena: {len(result['failed'])} model(s) failed: {', '.join(result['failed'])} "
              f"(see the report's status column and each run's train.log)", file=sys.stderr)
        return 1
    print(open(result["report"]["markdown"]).read())
    return 0


def add_recipes_parser(sub) -> None:
    s = sub.add_parser("recipes", help="list the training recipes, or print one to copy")
    s.add_argument("name", nargs="?")
    s.set_defaults(func=cmd_recipes)


def cmd_recipes(args) -> int:
    from .config import list_recipes, recipe_path

    if args.name:
        print(recipe_path(args.name).read_text(), end="")
    else:
        for r in list_recipes():
            first = recipe_path(r).read_text().splitlines()[0].lstrip("# ")
            print(f"{r:10s} {first}")
    return 0


def add_convert_parser(sub) -> None:
    s = sub.add_parser("convert", help="convert a checkpoint (mixlab, timm, the authors') to a mixlab .safetensors",
                       description="Read a checkpoint (a .safetensors / .pth / .pt / .bin / .ckpt file or a Hub id "
                                   "'hf-hub:org/name'; PyTorch files are read with weights_only=True only), convert "
                                   "it to the mixlab model's names, load it strictly and write it as safetensors "
                                   "with its architecture, input size and normalisation as metadata. The result "
                                   "loads with create_model(MODEL, pretrained=DST).")
    s.add_argument("src", metavar="SRC", help="the checkpoint: a file or 'hf-hub:org/name[@revision]'")
    s.add_argument("dst", metavar="DST", help="the output file (*.safetensors)")
    s.add_argument("--model", required=True, help="the mixlab model the weights are for (see `mixlab list`)")
    s.add_argument("--img-size", type=int, help="input size to build the model for (position embeddings are "
                   "resampled; default: the one a mixlab checkpoint records, else the model's own)")
    s.add_argument("--num-classes", type=int, help="classes of the head (default: the checkpoint's; another number "
                   "gives a freshly initialised classifier)")
    s.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    s.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    import warnings

    from .analysis import count_params
    from .data import Preprocessing
    from .factory import create_model
    from .weights import checkpoint_metadata, save_weights

    dst = Path(args.dst)
    if dst.suffix.lower() != ".safetensors":
        raise ValueError(f"{args.dst!r}: the converted weights are written as safetensors; name the output "
                         f"*.safetensors")
    if dst.is_dir():
        raise ValueError(f"{args.dst!r} is a directory; name the output file")
    if dst.exists() and not args.force:
        raise ValueError(f"{args.dst!r} exists; pass --force to overwrite it")
    kwargs = {}
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = create_model(args.model, pretrained=args.src, **kwargs)
    for w in caught:
        print(f"mixlab convert: warning: {w.message}", file=sys.stderr)

    cfg = model.pretrained_cfg
    prep = Preprocessing.from_model(model)  # the weights' data configuration (create_pretrained found it)
    metadata = checkpoint_metadata(args.model, num_classes=model.num_classes, in_chans=model.in_chans,
                                   img_size=model.img_size, mean=prep.mean, std=prep.std, crop_pct=prep.crop_pct,
                                   interpolation=prep.interpolation, source=str(args.src),
                                   source_format=cfg.get("source_format", "mixlab"), classes=cfg.get("classes"),
                                   model_kwargs=cfg.get("model_kwargs"), preprocessing_source=cfg["data_config_source"])
    state_dict = model.state_dict()
    save_weights(state_dict, dst, metadata)  # atomic; creates dst's directory
    params = count_params(model)
    print(f"wrote {dst}: {len(state_dict)} tensors, {_fmt_int(params)} parameters ({params:,}), {args.model} from "
          f"{metadata['source_format']} weights; data configuration {prep.describe()} ({cfg['data_config_source']})")
    return 0


def _analysis_models(args, **kwargs) -> list[tuple]:
    """The (model, label, data) triples an analysis command names: MODEL arguments paired in order
    with --checkpoint ones (a run directory alone stands for its model)."""
    from .analysis.common import load_model

    names, ckpts = list(args.models), list(args.checkpoint or [])
    if not names and not ckpts:
        raise ValueError("name at least one model (see `mixlab list`) or give --checkpoint RUN_DIR")
    if names and ckpts and len(names) != len(ckpts):
        raise ValueError(f"{len(names)} model(s) but {len(ckpts)} --checkpoint(s): give one checkpoint per model, "
                         f"in the same order, or none (random initialisation)")
    pairs = list(zip(names, ckpts)) if names and ckpts else [(n, None) for n in names] or [(None, c) for c in ckpts]
    import torch

    out = []
    for n, c in pairs:
        torch.manual_seed(args.seed)  # the same random weights for the same command
        out.append(load_model(n, c, **(kwargs if c is None or n is not None else {})))
    return out


def _random_model_kwargs(args) -> dict:
    """create_model arguments of an analysis command for models without a run: --set, --img-size, and
    the channels of --data."""
    kwargs = _model_options(args.set or [])
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    if getattr(args, "data", None):
        from .data import build_datasets
        kwargs.setdefault("in_chans", build_datasets(args.data, root=args.data_root)[2].in_chans)
    return kwargs


def _report_written(command: str, written: dict) -> None:
    out = Path(next(iter(written.values()))).parent
    print(f"mixlab {command}: wrote {', '.join(sorted(p.name for p in written.values()))} to {out}/")


def _analysis_arguments(s, default_out: str, data: bool = True) -> None:
    s.add_argument("models", nargs="*", metavar="MODEL", help="registered names or 'spec:...' strings")
    s.add_argument("--checkpoint", action="append", metavar="C",
                   help="weights for the model in the same position: a run directory, a checkpoint file, a "
                        ".safetensors/.pth file or hf-hub:org/name (repeatable; default: random initialisation)")
    if data:
        s.add_argument("--data", help="images from this dataset's validation split (default: the run's "
                       "dataset for a run, else Gaussian noise)")
        s.add_argument("--data-root", help="where the dataset's files are")
    s.add_argument("--img-size", type=int, help="input size to build the models for (default: their own)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a keyword argument of create_model (YAML value; repeatable)")
    s.add_argument("--seed", type=int, default=0, help="seed of the noise images and of random weights")
    s.add_argument("--out", default=default_out, help=f"output directory (default {default_out})")
    s.add_argument("--json", action="store_true", help="also print the JSON")


def add_erf_parser(sub) -> None:
    s = sub.add_parser("erf", help="effective receptive field of one or more models: heatmaps (PNG) and area "
                       "ratios (JSON)", description="The gradient of the last stage's central output with "
                       "respect to the input, aggregated over images (RepLKNet's measurement), drawn side by side "
                       "for each model, with the high-contribution area ratios at thresholds 0.2, 0.3, 0.5, 0.99.")
    _analysis_arguments(s, "analysis/erf")
    s.add_argument("--images", type=int, default=8, help="images to aggregate over (default 8)")
    s.add_argument("--batch-size", type=int, default=4)
    s.set_defaults(func=cmd_erf)


def cmd_erf(args) -> int:
    from .analysis.common import analysis_images, write_outputs
    from .analysis.erf import effective_receptive_field, plot_erf

    results = []
    for model, label, data in _analysis_models(args, **_random_model_kwargs(args)):
        dname, droot = (args.data, args.data_root) if args.data else (data.get("name"), data.get("root"))
        images, _ = analysis_images(model, dname, droot, num_images=args.images, seed=args.seed)
        r = effective_receptive_field(model, images, batch_size=args.batch_size, name=label)
        results.append(r)
        ratios = "  ".join(f"t={t}: {100 * v:.1f}%" for t, v in r.area_ratio.items())
        print(f"{label}: {r.images} {'images of ' + dname if dname else 'noise images'}, input "
              f"{tuple(r.contribution.shape)}, area ratio {ratios}")
    payload = {"command": "erf", "data": args.data or "run's data or Gaussian noise",
               "results": [r.to_dict() for r in results]}
    written = write_outputs(args.out, "erf.json", payload, {"erf.png": plot_erf(results)})
    if args.json:
        print(json.dumps(payload, indent=2))
    _report_written("erf", written)
    return 0


def add_affinity_parser(sub) -> None:
    s = sub.add_parser("affinity", help="the affinity matrices of a model's mixers for one image: drawn for a query "
                       "position, with per-layer statistics across depth", description="Capture A of every spatial "
                       "mixer (attention, windows, convolutions, pooling, MLPs, Container's mixed A) on one image, "
                       "draw the rows of a query position over the image, and measure mean distance, entropy, "
                       "sparsity and the static share per layer.")
    _analysis_arguments(s, "analysis/affinity")
    s.add_argument("--image", help="an image file (default: an image of --data or of the run's data, else noise)")
    s.add_argument("--index", type=int, default=0, help="which validation image of the dataset (default 0)")
    s.add_argument("--layer", action="append", metavar="L",
                   help="a mixer's module name or index (repeatable; default: all; `--layer 0 --layer -1`)")
    s.add_argument("--query", metavar="X,Y", help="the query position in input pixels (default: the centre)")
    s.add_argument("--groups", type=int, default=4, help="heads/groups drawn per layer (default 4)")
    s.add_argument("--max-layers", type=int, default=8, help="layers drawn in affinity.png (default 8; the "
                   "statistics cover all)")
    s.add_argument("--max-elements", type=int, default=150_000_000,
                   help="skip layers whose affinity has more elements (default 1.5e8, 0.6 GB)")
    s.set_defaults(func=cmd_affinity)


def cmd_affinity(args) -> int:
    from .analysis.affinity import capture_affinities, plot_depth, plot_query
    from .analysis.common import analysis_images, load_image, write_outputs

    if len(args.models) > 1 or len(args.checkpoint or []) > 1:
        raise ValueError("mixlab affinity explores one model at a time")
    (model, label, data), = _analysis_models(args, **_random_model_kwargs(args))
    if args.image:
        image = load_image(args.image, model)
        source = args.image
    else:
        dname, droot = (args.data, args.data_root) if args.data else (data.get("name"), data.get("root"))
        images, _ = analysis_images(model, dname, droot, num_images=args.index + 1, seed=args.seed)
        image = images[args.index:args.index + 1]
        source = f"{dname} validation image {args.index}" if dname else "Gaussian noise"
    H, W = image.shape[-2:]
    if args.query:
        try:
            qx, qy = (int(v) for v in args.query.split(","))
        except ValueError:
            raise ValueError(f"--query must be x,y in input pixels, e.g. {W // 2},{H // 2}; "
                             f"got {args.query!r}") from None
    else:
        qx, qy = W // 2, H // 2
    layers = capture_affinities(model, image, layers=args.layer, max_elements=args.max_elements)
    for la in layers:
        if la.affinity is None:
            print(f"{la.name}: skipped ({la.skipped})")
            continue
        st = la.stats
        share = "" if st["static_share"] is None else f", static share {st['static_share']:.2f}"
        print(f"{la.name}  {la.mixer} ({la.kind}), {st['groups']} group(s), grid {la.grid[0]}x{la.grid[1]}: mean "
              f"distance {st['mean_distance']:.1f}px, entropy {st['entropy']:.2f}/{st['max_entropy']:.2f}, sparsity "
              f"{st['sparsity']:.2f}{share}")
    drawn = [la for la in layers if la.affinity is not None]
    payload = {"command": "affinity", "model": label, "image": source, "input_size": [H, W], "query": [qx, qy],
               "layers": [{"name": la.name, "mixer": la.mixer, "kind": la.kind, "grid": list(la.grid),
                           "value_grid": list(la.value_grid), "skipped": la.skipped, "stats": la.stats}
                          for la in layers]}
    figures = {"depth.png": plot_depth(layers)}
    if drawn:
        figures["affinity.png"] = plot_query(image, drawn[:args.max_layers], (qx, qy), max_groups=args.groups)
    written = write_outputs(args.out, "affinity.json", payload, figures)
    if args.json:
        print(json.dumps(payload, indent=2))
    _report_written("affinity", written)
    return 0


def add_robustness_parser(sub) -> None:
    s = sub.add_parser("robustness", help="top-1 of trained models under occlusion, patch shuffle, noise and other "
                       "input sizes: table, plot (PNG) and JSON", description="Evaluate each checkpoint on its "
                       "validation images under random and centre occlusion (0-90%% of a 14x14 patch grid), patch "
                       "shuffle (grids 2, 4, 8), Gaussian noise and resized inputs, side by side.")
    _analysis_arguments(s, "analysis/robustness")
    s.add_argument("--limit", type=int, default=2000, help="validation images to use (the first N; default 2000)")
    s.add_argument("--grid", type=int, default=14, help="occlusion patch grid (default 14 x 14)")
    s.add_argument("--batch-size", type=int, default=256)
    s.set_defaults(func=cmd_robustness)


def cmd_robustness(args) -> int:
    from .analysis.common import analysis_images, write_outputs
    from .analysis.robustness import evaluate_robustness, plot_robustness

    if not args.checkpoint:
        raise ValueError("give the trained model(s) with --checkpoint RUN_DIR (repeatable); robustness of random "
                         "weights means nothing")
    results = []
    for model, label, data in _analysis_models(args, **_random_model_kwargs(args)):
        dname, droot = (args.data, args.data_root) if args.data else (data.get("name"), data.get("root"))
        if not dname:
            raise ValueError(f"{label}: not a mixlab run, so its dataset is unknown; name it with --data")
        images, labels = analysis_images(model, dname, droot, num_images=args.limit, seed=args.seed)
        r = evaluate_robustness(model, images, labels, name=label, grid=args.grid, batch_size=args.batch_size,
                                seed=args.seed)
        results.append(r)
        print(f"{label} on {r.images} {dname} validation images: clean top-1 {r.clean_top1:.2f}%")
        for key, curve in r.curves.items():
            cells = "  ".join(f"{lvl:g}: {'—' if acc is None else f'{acc:.1f}'}" for lvl, acc in curve)
            print(f"  {key:17s} {cells}")
        for key, why in r.errors.items():
            print(f"  {key}: not measured ({why})")
    payload = {"command": "robustness", "grid": args.grid, "seed": args.seed,
               "results": [r.to_dict() for r in results]}
    written = write_outputs(args.out, "robustness.json", payload, {"robustness.png": plot_robustness(results)})
    if args.json:
        print(json.dumps(payload, indent=2))
    _report_written("robustness", written)
    return 0


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers such as 64,128,256, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{what} must be positive integers, got {text!r}")
    return values


def add_scale_parser(sub) -> None:
    s = sub.add_parser("scale", help="latency, throughput, peak memory and MACs against input resolution and "
                       "batch size, with the fitted growth exponent in tokens", description="Build each model at "
                       "each resolution, time its forward pass (the fastest of --repeats, inference mode), track its "
                       "peak memory, count its MACs, and fit cost ~ N^p in the number of tokens N.")
    s.add_argument("models", nargs="*", metavar="MODEL", help="registered names or 'spec:...' strings")
    s.add_argument("--resolutions", default="64,128,256,512", help="input sizes, comma-separated (default "
                   "64,128,256,512)")
    s.add_argument("--batch-sizes", default="1", help="batch sizes, comma-separated (default 1)")
    s.add_argument("--repeats", type=int, default=5, help="timed forward passes per point (default 5)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a keyword argument of create_model (YAML value; repeatable)")
    s.add_argument("--out", default="analysis/scale", help="output directory (default analysis/scale)")
    s.add_argument("--json", action="store_true", help="also print the JSON")
    s.set_defaults(func=cmd_scale)


def cmd_scale(args) -> int:
    from .analysis.common import write_outputs
    from .analysis.scale import measure_scaling, plot_scaling
    from .factory import create_model

    if not args.models:
        raise ValueError("name at least one model (see `mixlab list`)")
    resolutions = _int_list(args.resolutions, "--resolutions")
    batches = _int_list(args.batch_sizes, "--batch-sizes")
    kwargs = _model_options(args.set or [])
    from .engine.distributed import pick_device
    picked = pick_device(args.device)  # a ValueError naming the choices for another string
    device = picked.type if args.device == "auto" else args.device
    results = []
    for name in args.models:
        build = lambda size, name=name: create_model(name, img_size=size, **kwargs)  # noqa: E731
        r = measure_scaling(build, resolutions, batches, name=name, device=device, repeats=args.repeats,
                            in_chans=kwargs.get("in_chans", 3))
        results.append(r)
        for p in r.points:
            cost = (f"{p.latency_ms:9.2f} ms  {p.images_per_s:9.1f} img/s  {p.peak_memory_mb:8.1f} MiB  "
                    f"{p.macs / 1e9:8.3f} GMACs" if p.error is None else f"not measured: {p.error}")
            print(f"{name}  {p.resolution:5d}px  batch {p.batch_size:3d}  {cost}")
        for b, e in r.exponents.items():
            print(f"{name}  batch {b}: cost ~ N^p in tokens N: MACs p={e['macs']:.2f}, latency p={e['latency']:.2f} "
                  f"(largest two sizes: {e['latency_tail']:.2f})")
    payload = {"command": "scale", "device": device, "resolutions": resolutions, "batch_sizes": batches,
               "repeats": args.repeats, "results": [r.to_dict() for r in results]}
    written = write_outputs(args.out, "scale.json", payload, {"scale.png": plot_scaling(results)})
    if args.json:
        print(json.dumps(payload, indent=2))
    _report_written("scale", written)
    return 0


#: the commands, in the order `mixlab --help` lists them: each function adds its sub-parser
COMMANDS = (add_list_parser, add_info_parser, add_train_parser, add_pretrain_parser, add_eval_parser,
            add_predict_parser, add_arena_parser, add_convert_parser, add_erf_parser, add_affinity_parser,
            add_robustness_parser, add_scale_parser, add_recipes_parser)


#: the exit statuses of every command (``mixlab --help`` shows them; docs/reliability.md too)
EXIT_STATUSES = """exit status:
  0    success
  1    nothing matched (list), some arena models failed (see the report), or some images were unreadable
       (predict: each is named on stderr and skipped; the others are predicted)
  2    bad usage or input: an option, a configuration, a model parameter, a file that is not what it should be
  3    training diverged (loss NaN/inf)
  4    an operating-system error: a path that cannot be written (a file where a directory should be, no
       permission, disk full); a training run's last checkpoint stays intact: --resume continues it
  130  interrupted (Ctrl-C); `mixlab train --resume RUN_DIR` continues from the last checkpoint
  an error shown with a traceback is a bug in mixlab: please report it with the traceback"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixlab", description="Vision backbones as context aggregation: build, "
                                "measure and compare CNNs, ViTs, MLP-Mixers and their hybrids.",
                                epilog=EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"mixlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add_parser in COMMANDS:
        add_parser(sub)
    return p


def _out_of_memory(e: BaseException) -> bool:
    """An allocator's refusal (CPU or GPU), as PyTorch reports it."""
    import torch
    text = str(e)
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text
                                         or "out of memory" in text))


def _failed_write(e: BaseException) -> OSError | None:
    """The operating-system error behind a file writer's own exception (safetensors names it; torch.save's
    zip writer reports only a short write, which a full disk causes), as an OSError; None for other errors."""
    import errno
    text = str(e)
    if "os error 28" in text or "No space left on device" in text:
        return OSError(errno.ENOSPC, "No space left on device")
    if "inline_container.cc" in text and ("unexpected pos" in text or "failed writing" in text
                                          or "file write failed" in text):
        return OSError(errno.EIO, "writing a file failed (is the disk full?)")
    return None


def _os_error(command: str, e: OSError) -> str:
    """One line for an operating-system error: what failed on which path, and what to do."""
    import errno
    where = f"{e.filename}: " if e.filename else ""
    what = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        hint = "free some space, or write elsewhere with --output / --out"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "choose a directory you can write to (--output / --out)"
    elif e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        hint = "a file stands where a directory is needed, or the other way round; choose another path"
    else:
        hint = "check the path and try again"
    if command == "train" and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):  # while writing a checkpoint
        hint += "; the last checkpoint is intact: `mixlab train --resume RUN_DIR` continues from it"
    return f"{where}{what} ({hint})"


def main(argv=None) -> int:
    """Run one command. Every expected failure ends in one line ``mixlab CMD: error: ...`` and the
    exit status of :data:`EXIT_STATUSES`; an unexpected one shows its traceback and says it is a bug."""
    args = build_parser().parse_args(argv)
    say = lambda msg: print(f"mixlab {args.command}: error: {msg}", file=sys.stderr)  # noqa: E731
    try:
        return args.func(args)
    except BrokenPipeError:  # e.g. `mixlab info ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        resume = "; `mixlab train --resume RUN_DIR` continues exactly from the last checkpoint" \
            if args.command == "train" else ""
        print(f"mixlab {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
    except (KeyError, ValueError, TypeError, NotImplementedError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        say(msg)
        return 2
    except OSError as e:
        say(_os_error(args.command, e))
        return 4
    except Exception as e:
        from .engine.trainer import TrainingDiverged  # imported late: most commands never load the engine
        if isinstance(e, TrainingDiverged):
            say(str(e))
            return 3
        failed_write = _failed_write(e)
        if failed_write is not None:
            say(_os_error(args.command, failed_write))
            return 4
        if _out_of_memory(e):
            say(f"out of memory ({' '.join(str(e).split())[:160]}); use a smaller --img-size or --batch-size")
            return 2
        import traceback
        traceback.print_exc()
        say(f"unexpected {type(e).__name__}: this is a bug in mixlab; please report it with the traceback above")
        return 1


if __name__ == "__main__":
    sys.exit(main())
