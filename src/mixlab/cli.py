"""The ``mixlab`` command."""
from __future__ import annotations

import argparse
import json
import sys

from . import __version__


def _fmt_int(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def _fmt_macs(n: int) -> str:
    return f"{n / 1e9:.3f}G" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def cmd_list(args) -> int:
    from .registry import list_models, model_family

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


def cmd_info(args) -> int:
    from .analysis import profile_model

    kwargs = {}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    prof = profile_model(args.model, img_size=args.img_size, in_chans=args.in_chans, **kwargs)
    if args.json:
        print(json.dumps(prof.to_dict(), indent=2, default=list))
        return 0
    c, h, w = prof.input_size
    print(f"{args.model}   input {c}x{h}x{w}")
    print(f"parameters: {prof.mparams:.2f}M ({prof.params:,})")
    print(f"GMACs:      {prof.gmacs:.2f} (multiply-adds, fvcore convention, attention matmuls included)")
    rows = []
    for p in prof.parts:
        res = f"{p.resolution[0]}x{p.resolution[1]}" if p.resolution else ""
        rows.append([p.name, res, p.channels or "", p.depth or "", p.mixer or "", _fmt_int(p.params), _fmt_macs(p.macs)])
    print()
    print(_table(rows, ["part", "resolution", "channels", "depth", "mixer", "params", "MACs"]))
    print()
    print(f"features (forward_features): {tuple(prof.feature_shape)}")
    if prof.stage_shapes and len(prof.stage_shapes) <= 8:
        print("feature maps (features_only): " + ", ".join(str(tuple(s)) for s in prof.stage_shapes))
    print(f"logits: {tuple(prof.output_shape)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixlab", description="Vision backbones as context aggregation: build, "
                                "measure and compare CNNs, ViTs, MLP-Mixers and their hybrids.")
    p.add_argument("--version", action="version", version=f"mixlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("list", help="list registered models (optionally matching a pattern)")
    s.add_argument("pattern", nargs="?", help="shell-style pattern or substring, e.g. 'swin*' or 'deit'")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("info", help="parameters, GMACs and per-stage breakdown of a model")
    s.add_argument("model", help="a registered model name (see `mixlab list`)")
    s.add_argument("--img-size", type=int, default=None, help="input size (default: the model's own)")
    s.add_argument("--in-chans", type=int, default=None, help="input channels (default 3)")
    s.add_argument("--num-classes", type=int, default=None, help="classes of the head (default 1000)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_info)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # e.g. `mixlab info ... | head`
        sys.stderr.close()
        return 0
    except (KeyError, ValueError, TypeError, NotImplementedError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"mixlab {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
