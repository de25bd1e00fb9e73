"""RepLKNet's structural re-parameterization: inference throughput of one network as trained
(a large and a small depthwise kernel per block, each with its BatchNorm) and after
``reparameterize()`` (one large kernel with bias), optionally also after ``fuse()`` (every
BatchNorm folded as well), in one process, with interleaved runs, reported as the ratio
variant / trained.

    python benchmarks/reparam.py                          # replknet_31b, 224x224, batch 8, CPU (~2-3 min)
    python benchmarks/reparam.py --small --repeats 7      # a smaller RepLKNet, for a quick look
    python benchmarks/reparam.py --fuse --device cuda --batch 64 --repeats 10 --iters 5 --json out.json

Every variant is a copy of one network with random weights whose BatchNorms have random
statistics and affine parameters (so that merging is not an identity-like no-op), in eval
mode; before timing, each variant's logits are compared with the trained structure's. Each
repeat times ``--iters`` batches of every variant back to back, rotating which goes first,
after a warm-up; the ratio of throughputs (variant / trained) is taken per repeat, and the
table gives its minimum, median and maximum over repeats (above 1: the variant is faster).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys

import torch
import torch.nn as nn
from timing import Runner, environment, interleaved

#: ``--small``: RepLKNet-31B's kernels and layout at half the width and a third of the depth
SMALL = dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512))


def build(args, device: torch.device) -> nn.Module:
    import mixlab
    import mixlab.models.replknet  # noqa: F401  (registers replknet_31b)
    torch.manual_seed(0)
    kwargs = dict(SMALL) if args.small else {}
    model = mixlab.create_model(args.model, img_size=args.img_size, **kwargs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.normal_(1, 0.2, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
    return model.to(device).eval()


def variants(model: nn.Module, with_fuse: bool) -> dict[str, nn.Module]:
    out = {"trained": model, "reparameterized": copy.deepcopy(model).reparameterize()}
    if with_fuse:
        out["fused"] = copy.deepcopy(model).fuse()
    return out


def run(args) -> dict:
    device = torch.device(args.device)
    model = build(args, device)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device,
                    generator=torch.Generator(device=device).manual_seed(1))
    runners = {name: Runner(m, x, "infer", args.amp) for name, m in variants(model, args.fuse).items()}
    ref = runners["trained"].step().float()
    scale = max(1.0, ref.abs().max().item())
    deviation = {name: 0.0 if name == "trained" else (r.step().float() - ref).abs().max().item() / scale
                 for name, r in runners.items()}
    params = {name: sum(p.numel() for p in r.model.parameters()) for name, r in runners.items()}

    def report(rep: int, got: dict[str, float]) -> None:
        print(f"  repeat {rep + 1}/{args.repeats}: " + "  ".join(f"{n} {v:.2f} img/s" for n, v in got.items()),
              flush=True)

    timed = interleaved(runners, "trained", repeats=args.repeats, iters=args.iters, warmup=args.warmup,
                        report=report)
    rows = [{"variant": n, "params_m": params[n] / 1e6, "img_s": timed["img_s"][n], "max_rel_deviation": deviation[n],
             **({**timed["summary"][n], "ratios": timed["ratios"][n]} if n in timed["ratios"] else {})}
            for n in runners]
    return {"model": args.model + (" (small)" if args.small else ""), "rows": rows}


def fmt_table(result: dict) -> str:
    head = ["variant", "params M", "img/s (median)", "max Δ logits (relative)", "ratio min", "ratio median",
            "ratio max"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "|".join(["---:"] * (len(head) - 1)) + "|"]
    for r in result["rows"]:
        ratio = ([f"{r['ratio_min']:.2f}", f"**{r['ratio_median']:.2f}**", f"{r['ratio_max']:.2f}"]
                 if "ratio_median" in r else ["", "1 (reference)", ""])
        lines.append("| " + " | ".join([r["variant"], f"{r['params_m']:.2f}", f"{r['img_s']:.2f}",
                                        f"{r['max_rel_deviation']:.1e}", *ratio]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="replknet_31b", help="a registered RepLKNet (default: replknet_31b)")
    p.add_argument("--small", action="store_true", help=f"build it smaller: {SMALL}")
    p.add_argument("--fuse", action="store_true", help="also time fuse() (re-parameterized, every BatchNorm folded)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per variant (the ratio's sample)")
    p.add_argument("--iters", type=int, default=1, help="batches per timed round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's choice)")
    p.add_argument("--json", help="also write the result as JSON to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but CUDA is not available here")
    what = args.model + (" (small)" if args.small else "")
    print(f"# {what}: trained structure vs reparameterize(){' vs fuse()' if args.fuse else ''}, batch {args.batch}, "
          f"{args.img_size}x{args.img_size}, {args.device}, amp {args.amp}, {args.repeats} repeats x {args.iters} "
          f"batches\n# {environment(device)}", flush=True)
    result = run(args)
    print()
    print(fmt_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(device), "args": vars(args), **result}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
