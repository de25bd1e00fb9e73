"""The distillation task's teacher-logit cache: training steps of a student (the task's loss, backward,
an AdamW step) with the teacher's logits looked up per image against the teacher run on every batch,
in one process, with interleaved runs, reported as the ratio cached / uncached.

    python benchmarks/distill_cache.py --teacher runs/teacher                # nano_vit student, fashion-mnist
    python benchmarks/distill_cache.py --teacher T.safetensors --data digits --student nano_resnet

``--teacher`` is what ``distill.teacher`` takes (a run directory or a weights file with mixlab metadata).
The training images are not augmented (the cache's condition). The cache is filled once before timing
(its time is reported apart: one teacher forward pass per training image); both contenders start from
the same student weights and take the same batches. Timing as in ``timing.py``.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from timing import environment, interleaved


class StepRunner:
    """A distillation training step as a ``timing.interleaved`` contender (cycles over ``batches``)."""

    def __init__(self, task, model, batches, cached: bool):
        self.task, self.model, self.batches, self.cached, self.i = task, model.train(), batches, cached, 0
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(self):
        batch = self.batches[self.i % len(self.batches)]
        loss, _ = self.task.loss(self.model, batch if self.cached else batch[:2], seed=self.i)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.i += 1
        return loss

    def time(self, iters: int) -> float:
        t = time.perf_counter()
        for _ in range(iters):
            self.step()
        return iters * self.batches[0][0].shape[0] / (time.perf_counter() - t)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="a mixlab run directory or a weights file with mixlab metadata")
    p.add_argument("--student", default="nano_vit")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--limit-train", type=int, default=2048)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=8, help="batches per contender per repeat")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: PyTorch's)")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from mixlab.config import build_config
    from mixlab.engine.distributed import DistInfo
    from mixlab.engine.tasks.distill import DistillationTask
    from mixlab.factory import create_model

    runners, model = {}, None
    for name, cache in (("uncached", False), ("cached", True)):
        cfg = build_config({"task": "distill", "model": {"name": args.student},
                            "data": {"name": args.data, "root": args.data_root, "limit_train": args.limit_train,
                                     "limit_val": args.batch},
                            "aug": {"simple_random_crop": False}, "train": {"batch_size": args.batch, "device": "cpu"},
                            "distill": {"teacher": args.teacher, "cache": cache}, "log": {"print_every": 0}})
        task = DistillationTask(cfg, DistInfo())
        data = task.build_data()
        if model is None:
            torch.manual_seed(0)
            model = create_model(args.student, **task.model_kwargs(data.info))
        student = task.setup(copy.deepcopy(model))
        batches = [b for _, b in zip(range(args.iters), data.train_loader)]
        if cache:
            t = time.perf_counter()
            task.fill_cache()
            fill_s = time.perf_counter() - t
        runners[name] = StepRunner(task, student, batches, cache)
    res = interleaved(runners, "uncached", repeats=args.repeats, iters=args.iters, warmup=args.warmup)
    s = res["summary"]["cached"]
    n = len(runners["cached"].task.train_dataset)
    print("| student | teacher | data | batch | uncached img/s | cached img/s | ratio min / median / max "
          "| cache fill |")
    print("|---|---|---|---:|---:|---:|---|---|")
    print(f"| {args.student} | {args.teacher} | {args.data} | {args.batch} | {res['img_s']['uncached']:,.1f} | "
          f"{res['img_s']['cached']:,.1f} | {s['ratio_min']:.2f} / {s['ratio_median']:.2f} / {s['ratio_max']:.2f} | "
          f"{fill_s:.1f} s for {n} images |")
    result = {"config": vars(args), "environment": environment(torch.device("cpu")), "img_s": res["img_s"],
              "ratios": res["ratios"]["cached"], **s, "cache_fill_s": fill_s, "cache_images": n}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
