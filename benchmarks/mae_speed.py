"""MAE's encoder sees only the visible tokens, so its pretraining step costs less the more is hidden: a training
step of MAE (mask ratio 0.75, the paper's 512-wide decoder of 8 blocks and its lightest, of 1 block; a decoder of
the model's own width for the nano models) against a full-token
training step of the same model (its classifier on all patches, cross-entropy), per image, side by side in
interleaved rounds (``timing.py``). Every step is forward, loss, backward and an AdamW update.

    python benchmarks/mae_speed.py                                   # vit_base_patch16_224 at batch 8, then nano_vit
    python benchmarks/mae_speed.py --models nano_vit --batch 64 --img-size 32

A model's per-step overhead (the Python of its layers, the optimizer over every tensor) does not shrink with the
tokens, so a small model gains less than its MACs say: the script prints the MACs of each step beside the times.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn as nn

from timing import environment, interleaved

from mixlab.analysis import count_macs
from mixlab.factory import create_model
from mixlab.models.mim import MAE, random_mask


class Step:
    """One training step of ``module`` on the batch ``x`` as a ``timing.interleaved`` contender: MAE (``ratio``
    given: its loss on the hidden patches) or the full-token classifier (cross-entropy)."""

    def __init__(self, module: nn.Module, x: torch.Tensor, ratio: float | None = None):
        self.module, self.x, self.ratio = module.train(), x, ratio
        self.opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
        self.y = torch.randint(0, 10, (x.shape[0],))
        self.i = 0

    def loss(self) -> torch.Tensor:
        if self.ratio is None:
            return nn.functional.cross_entropy(self.module(self.x), self.y)
        g = torch.Generator().manual_seed(self.i)
        mask = random_mask(self.x.shape[0], self.module.grid[0] * self.module.grid[1], self.ratio, generator=g)
        return self.module.loss(self.x, self.module(self.x, mask), mask)

    def step(self):
        loss = self.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.i += 1

    def time(self, iters: int) -> float:
        import time
        t = time.perf_counter()
        for _ in range(iters):
            self.step()
        return iters * self.x.shape[0] / (time.perf_counter() - t)


def forward_macs(module: nn.Module, x: torch.Tensor, ratio: float | None) -> float:
    """GMACs of one forward pass of the step (per image)."""
    module = module.eval()
    with torch.no_grad():
        if ratio is None:
            macs, _ = count_macs(module, x[:1])
        else:
            mask = random_mask(1, module.grid[0] * module.grid[1], ratio)

            class Call(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.m = module

                def forward(self, z):
                    return self.m(z, mask)
            macs, _ = count_macs(Call(), x[:1])
    return macs / 1e9


def measure(name: str, img_size: int, batch: int, ratio: float, decoders: list[tuple[int, int]], repeats: int,
            iters: int, warmup: int, report) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size)
    runners = {"full tokens": Step(create_model(name, num_classes=10, img_size=img_size), x)}
    for width, depth in decoders:
        mae = MAE(create_model(name, num_classes=0, img_size=img_size), decoder_dim=width, decoder_depth=depth,
                  decoder_heads=max(width // 32, 1), norm_pix_loss=True)
        runners[f"MAE {ratio:g}, decoder {width}x{depth}"] = Step(mae, x, ratio)
    macs = {k: forward_macs(r.module, x, r.ratio) for k, r in runners.items()}
    result = interleaved(runners, "full tokens", repeats=repeats, iters=iters, warmup=warmup,
                         report=lambda rep, got: report(f"  {name} round {rep + 1}: "
                                                        + ", ".join(f"{k} {v:.1f} img/s" for k, v in got.items())))
    for r in runners.values():
        r.module.train()
    return {"model": name, "img_size": img_size, "batch": batch, "mask_ratio": ratio, "gmacs_forward": macs, **result}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["vit_base_patch16_224", "nano_vit"])
    ap.add_argument("--img-size", type=int, nargs="+", default=None,
                    help="one per model (default: 224 for vit_base_patch16_224, 32 for the nano models)")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="one per model (default 8 and 64)")
    ap.add_argument("--ratio", type=float, default=0.75)
    ap.add_argument("--decoders", nargs="+", default=None, metavar="WIDTHxDEPTH",
                    help="the MAE decoders to time (default: the paper's 512x8 and its lightest, 512x1; for the nano "
                         "models 128x1, their own width)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.img_size or [224 if not m.startswith("nano") else 32 for m in args.models]
    batches = args.batch or [8 if not m.startswith("nano") else 64 for m in args.models]
    if len(sizes) != len(args.models) or len(batches) != len(args.models):
        ap.error("give one --img-size and one --batch per model (or none)")
    print(environment(torch.device("cpu")), flush=True)
    def decoders(model: str) -> list[tuple[int, int]]:
        given = args.decoders or (["128x1"] if model.startswith("nano") else ["512x8", "512x1"])
        try:
            return [tuple(int(v) for v in d.lower().split("x")) for d in given]
        except ValueError:
            ap.error(f"--decoders takes WIDTHxDEPTH values such as 512x8, got {' '.join(given)}")

    results = [measure(m, s, b, args.ratio, decoders(m), args.repeats, args.iters, args.warmup,
                       lambda line: print(line, flush=True)) for m, s, b in zip(args.models, sizes, batches)]
    print("\n| model | px | batch | step | GMACs fwd/img | img/s (median) | speed-up per image: min / median / max |")
    print("|---|---:|---:|---|---:|---:|---|")
    for r in results:
        for k, v in r["img_s"].items():
            s = r["summary"].get(k)
            up = f"{s['ratio_min']:.2f} / **{s['ratio_median']:.2f}** / {s['ratio_max']:.2f}" if s else "1 (reference)"
            print(f"| {r['model']} | {r['img_size']} | {r['batch']} | {k} | {r['gmacs_forward'][k]:.3f} | {v:.1f} | "
                  f"{up} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(torch.device("cpu")), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
