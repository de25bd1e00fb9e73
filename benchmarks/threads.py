"""Why ``mixlab arena --jobs``: training-step throughput of small models with all the CPU
cores in one process against one-thread processes side by side, on this machine, at the
arena's batch and the nano models' input size.

    python benchmarks/threads.py                              # nano_swin and nano_resnet, 28x28x1, batch 64
    python benchmarks/threads.py --models nano_vit --seconds 10

For each model: one process with ``--threads`` threads (default: every core), then the same
number of one-thread processes started together; each process times training steps (forward,
cross-entropy, backward, AdamW) on random data for ``--seconds`` after a warm-up and prints
its images per second. Run it on an otherwise idle machine: the processes are timed in turn,
not interleaved.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def child(model: str, threads: int, seconds: float, batch: int) -> None:
    import torch

    import mixlab

    torch.set_num_threads(threads)
    m = mixlab.create_model(model, img_size=28, in_chans=1, num_classes=10).train()
    opt = torch.optim.AdamW(m.parameters())
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def step():
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        step()
        n += 1
    print(f"{batch * n / (time.perf_counter() - t):.1f}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["nano_swin", "nano_resnet"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--child", nargs=2, metavar=("MODEL", "THREADS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), args.seconds, args.batch)
        return 0

    def spawn(model, threads):
        return subprocess.Popen([sys.executable, __file__, "--child", model, str(threads), "--seconds",
                                 str(args.seconds), "--batch", str(args.batch)], stdout=subprocess.PIPE, text=True)

    print(f"| model | one process, {args.threads} threads (img/s) | {args.threads} one-thread processes (img/s) "
          f"| together / one process |")
    print("|---|---:|---:|---:|")
    for model in args.models:
        one = float(spawn(model, args.threads).communicate()[0])
        procs = [spawn(model, 1) for _ in range(args.threads)]
        each = [float(pr.communicate()[0]) for pr in procs]
        print(f"| {model} | {one:.0f} | {' + '.join(f'{v:.0f}' for v in each)} | {sum(each) / one:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
