"""The training loader of an in-memory dataset with no augmentation (the arena's recipe, and
every evaluation): ``SeededDataset`` transforming each batch at once (``__getitems__``) against
the same dataset transforming image by image, in one process, with interleaved runs, reported
as the ratio batched / per-image.

    python benchmarks/data_loading.py                                  # digits at 28x28, batch 64
    python benchmarks/data_loading.py --data fashion-mnist --workers 2

Both loaders draw the same batches (a ``ResumableSampler`` with one seed), and their first
batches are compared before timing (``max_abs_deviation``, 0 when they agree bit for bit).
Timing as in ``timing.py``: each repeat times ``--iters`` batches of both back to back,
alternating which goes first, after a warm-up; the table gives the ratio's minimum, median
and maximum over repeats (above 1: batching is faster).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch.utils.data import DataLoader, Dataset

from timing import environment, interleaved


class PerImage(Dataset):
    """The dataset without ``__getitems__``: DataLoader then asks for one item at a time."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


class LoaderRunner:
    """A loader as a ``timing.interleaved`` contender: ``step()`` takes the next batch (a new
    epoch when one ends), ``time(iters)`` gives images per second."""

    def __init__(self, loader: DataLoader, sampler):
        self.loader, self.sampler, self.epoch = loader, sampler, 0
        self.it = iter(loader)

    def step(self):
        try:
            return next(self.it)
        except StopIteration:
            self.epoch += 1
            self.sampler.set_epoch(self.epoch)
            self.it = iter(self.loader)
            return next(self.it)

    def time(self, iters: int) -> float:
        t, n = time.perf_counter(), 0
        for _ in range(iters):
            n += len(self.step()[1])
        return n / (time.perf_counter() - t)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="digits, fashion-mnist, cifar10, cifar100 (default: digits)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default: 0, the arena's)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=50, help="batches per contender per repeat")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1, as each arena run with --jobs 2)")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from mixlab.data import ResumableSampler, SeededDataset, build_datasets, build_transforms

    train, _, info = build_datasets(args.data, root=args.data_root, img_size=args.img_size)
    ds = SeededDataset(train, build_transforms(info, train=True, img_size=args.img_size), seed=0)
    if not ds.batched:
        sys.exit(f"{args.data}: the dataset does not batch its transform (is it in memory?)")
    runners, firsts = {}, {}
    for name, data in (("per-image", PerImage(ds)), ("batched", ds)):
        sampler = ResumableSampler(len(ds), seed=0)
        loader = DataLoader(data, batch_size=args.batch, sampler=sampler, num_workers=args.workers, drop_last=True)
        runners[name] = LoaderRunner(loader, sampler)
        firsts[name] = runners[name].step()
    deviation = (firsts["batched"][0] - firsts["per-image"][0]).abs().max().item()
    if not torch.equal(firsts["batched"][1], firsts["per-image"][1]):
        sys.exit("the two loaders drew different labels")
    res = interleaved(runners, "per-image", repeats=args.repeats, iters=args.iters, warmup=args.warmup)
    s = res["summary"]["batched"]
    print("| data | img size | batch | workers | per-image img/s | batched img/s | ratio min / median / max "
          "| max abs deviation |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    print(f"| {args.data} | {args.img_size} | {args.batch} | {args.workers} | {res['img_s']['per-image']:,.0f} | "
          f"{res['img_s']['batched']:,.0f} | {s['ratio_min']:.2f} / {s['ratio_median']:.2f} / {s['ratio_max']:.2f} | "
          f"{deviation:.3g} |")
    result = {"config": vars(args), "environment": environment(torch.device("cpu")),
              "img_s": res["img_s"], "ratios": res["ratios"]["batched"], **s, "max_abs_deviation": deviation}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
