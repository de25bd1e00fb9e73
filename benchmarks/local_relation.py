"""LR-Net's local relation layer: its window sum on shifted views with a hand-written backward
(``LocalRelation.forward``) against the same layer with the window sum left to autograd on
unfolded values (im2col, weight, sum), in one process, with interleaved runs, reported as
the ratio views / unfold.

    python benchmarks/local_relation.py                               # nano_lrnet, 28x28, batch 64, CPU
    python benchmarks/local_relation.py --models lrnet_50 --img-size 224 --batch 4 --modes infer

Both variants are one network with the same random weights (the unfold one a copy whose
local relation layers have the other forward); their logits are compared before timing.
Timing as in ``timing.py``: each repeat times ``--iters`` batches of both back to back,
alternating which goes first, after a warm-up; the table gives the ratio's minimum, median
and maximum over repeats (above 1: the views are faster).
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F

from timing import Runner, environment, interleaved


def unfold_variant(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose local relation layers sum their windows on unfolded values."""
    from mixlab.mixers.local_relation import LocalRelation

    class UnfoldLocalRelation(LocalRelation):
        def forward(self, x):
            self._check(x)
            B, H, W, C = x.shape
            k, p, s = self.kernel_size, self.kernel_size // 2, self.stride
            Ho, Wo = self.out_size(H, W)
            w = self._tap_logits(x).softmax(dim=2)  # (B, G, k², L)
            groups, per = (self.groups, self.m) if C % self.m == 0 else (C, 1)
            if C % self.m:
                w = w[:, self.channel_group]
            v = F.unfold(x.permute(0, 3, 1, 2), k, padding=p, stride=s).view(B, groups, per, k * k, -1)
            y = (w.unsqueeze(2) * v).sum(3).reshape(B, C, Ho, Wo)
            return self.proj(y.permute(0, 2, 3, 1))

    other = copy.deepcopy(model)
    for m in other.modules():
        if type(m) is LocalRelation:
            m.__class__ = UnfoldLocalRelation
    return other


def compare(name: str, mode: str, args, device: torch.device) -> dict:
    import mixlab
    import mixlab.models.lrnet  # noqa: F401  (registers the LR-Net models)

    torch.manual_seed(0)
    model = mixlab.create_model(name, img_size=args.img_size, num_classes=1000).to(device)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    other = unfold_variant(model)
    with torch.no_grad():
        a, b = model.eval()(x), other.eval()(x)
        deviation = ((a - b).abs().max() / a.abs().max().clamp_min(1)).item()
    runners = {"views": Runner(model, x, mode), "unfold": Runner(other, x, mode)}

    def report(rep: int, got: dict[str, float]) -> None:
        print(f"  {name} {mode} repeat {rep + 1}/{args.repeats}: views {got['views']:.1f} img/s, "
              f"unfold {got['unfold']:.1f} img/s", flush=True)

    timed = interleaved(runners, "unfold", repeats=args.repeats, iters=args.iters, warmup=args.warmup, report=report)
    return {"model": name, "mode": mode, "views": timed["img_s"]["views"], "unfold": timed["img_s"]["unfold"],
            **timed["summary"]["views"], "max_rel_deviation": deviation}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["nano_lrnet"])
    p.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = [compare(n, mode, args, device) for n in args.models for mode in args.modes]
    print(f"\n{environment(device)}; {args.img_size}x{args.img_size}, batch {args.batch}\n")
    print("| model | mode | views img/s | unfold img/s | ratio min | ratio median | ratio max | max Δ logits |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['mode']} | {r['views']:.1f} | {r['unfold']:.1f} | {r['ratio_min']:.2f} | "
              f"**{r['ratio_median']:.2f}** | {r['ratio_max']:.2f} | {r['max_rel_deviation']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
