"""mixlab against timm: inference and training-step throughput of the same architecture, in
one process, on one machine, with interleaved runs, reported as the ratio mixlab / timm.

    python benchmarks/vs_timm.py                          # the six reference architectures, CPU
    python benchmarks/vs_timm.py --models resnet50 convnext_tiny --batch 16 --repeats 7
    python benchmarks/vs_timm.py --device cuda --batch 64 --amp bf16
    python benchmarks/vs_timm.py --all --json results.json
    python benchmarks/vs_timm.py --models convnext_tiny --modes train --profile   # time per operator

For each architecture both libraries build the model at the same size with random weights.
Each repeat times ``--iters`` batches of mixlab and of timm back to back, alternating which
goes first, after a warm-up; the ratio of the two throughputs is taken per repeat, and the
table gives its minimum, median and maximum over repeats (a ratio above 1 means mixlab is
faster). Peak memory is measured per (library, architecture, mode) in a fresh child process:
on the CPU the growth of the peak resident set size during one step, on CUDA
``torch.cuda.max_memory_allocated``. The resident set also holds what the allocator keeps
and one-off buffers of a first call, so on the CPU ``--tensor-memory`` adds a second probe:
the peak bytes of the tensors allocated during the step and alive at once, from the
allocator's reports in a ``torch.profiler`` trace (what ``max_memory_allocated`` measures on
CUDA). Requires timm (``pip install timm``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn
from timing import Runner, environment, interleaved

#: the architectures the performance goal names (docs/performance.md)
REFERENCE = ["resnet50", "convnext_tiny", "swin_tiny_patch4_window7_224", "deit_small_patch16_224", "mixer_b16_224",
             "poolformer_s12"]


def timm_version() -> str:
    import timm
    return timm.__version__


def shared_architectures() -> list[str]:
    import timm

    import mixlab
    return [n for n in mixlab.list_models() if n in set(timm.list_models())]


def build(lib: str, name: str, img_size: int, device: torch.device) -> nn.Module:
    if lib == "mixlab":
        import mixlab
        model = mixlab.create_model(name, img_size=img_size)
    else:
        import timm
        kw = {"img_size": img_size} if img_size != 224 and _timm_takes_img_size(name) else {}
        # timm's Swin trains with stochastic depth 0.1 by default; mixlab's models with none:
        # compare the same network (no stochastic depth in either)
        model = timm.create_model(name, pretrained=False, drop_path_rate=0.0, **kw)
    return model.to(device)


def _timm_takes_img_size(name: str) -> bool:
    return not name.startswith(("resnet", "convnext", "poolformer"))


def make_runner(lib: str, name: str, mode: str, args, device: torch.device) -> Runner:
    model = build(lib, name, args.img_size, device)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    return Runner(model, x, mode, args.amp)


def compare(name: str, mode: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    runners = {lib: make_runner(lib, name, mode, args, device) for lib in ("mixlab", "timm")}
    timed = interleaved(runners, "timm", repeats=args.repeats, iters=args.iters, warmup=args.warmup)
    row = {"model": name, "mode": mode, "batch": args.batch, "img_size": args.img_size,
           "mixlab_img_s": timed["img_s"]["mixlab"], "timm_img_s": timed["img_s"]["timm"],
           **timed["summary"]["mixlab"], "ratios": timed["ratios"]["mixlab"]}
    del runners
    if args.memory:
        for lib in ("mixlab", "timm"):
            row[f"{lib}_peak_mb"] = memory_probe(lib, name, mode, args)
            if args.tensor_memory:
                row[f"{lib}_tensor_peak_mb"] = memory_probe(lib, name, mode, args, kind="tensors")
    return row


def profile(name: str, mode: str, args, device: torch.device, top: int = 15) -> str:
    """Where the time goes: each library's steps under torch.profiler, self time per operator
    (ms per step, summed over calls), side by side, the operators whose totals differ most first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.manual_seed(0)
    totals, per_step = {}, {}
    for lib in ("mixlab", "timm"):
        runner = make_runner(lib, name, mode, args, device)
        for _ in range(args.warmup):
            runner.step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            t = time.perf_counter()
            for _ in range(args.iters):
                runner.step()
            runner.sync()
            per_step[lib] = (time.perf_counter() - t) / args.iters * 1e3
        attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        totals[lib] = {e.key: (getattr(e, attr) / 1e3 / args.iters, e.count // args.iters)
                       for e in prof.key_averages()}
        del runner
    ops = set(totals["mixlab"]) | set(totals["timm"])
    diff = {op: totals["mixlab"].get(op, (0.0, 0))[0] - totals["timm"].get(op, (0.0, 0))[0] for op in ops}
    lines = [f"## {name} {mode}: {per_step['mixlab']:.0f} ms per step (mixlab), {per_step['timm']:.0f} ms (timm)",
             "", "| operator | mixlab ms/step | calls | timm ms/step | calls | difference ms |",
             "|---|---:|---:|---:|---:|---:|"]
    for op in sorted(ops, key=lambda o: -abs(diff[o]))[:top]:
        (mt, mc), (tt, tc) = totals["mixlab"].get(op, (0.0, 0)), totals["timm"].get(op, (0.0, 0))
        lines.append(f"| `{op}` | {mt:.1f} | {mc} | {tt:.1f} | {tc} | {diff[op]:+.1f} |")
    return "\n".join(lines)


def memory_probe(lib: str, name: str, mode: str, args, kind: str = "rss") -> float | None:
    """Peak memory of one step in a fresh process (MiB), or None if the probe failed; ``kind``
    "rss" (the resident set on the CPU) or "tensors" (the live tensors)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--probe", lib, name, mode, "--batch", str(args.batch),
           "--img-size", str(args.img_size), "--device", args.device, "--amp", args.amp, "--probe-kind", kind]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(f"  memory probe failed for {lib} {name} {mode}: {out.stderr.strip()[-300:]}", file=sys.stderr)
        return None


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_probe(lib: str, name: str, mode: str, args) -> float:
    device = torch.device(args.device)
    torch.manual_seed(0)
    runner = make_runner(lib, name, mode, args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        runner.step()
        runner.sync()
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    if args.probe_kind == "tensors":
        return tensor_peak_growth(runner)
    with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak RSS (VmHWM) to the current RSS
        f.write("5")
    base = _status_kib("VmRSS")
    runner.step()
    return (_status_kib("VmHWM") - base) / 1024


def tensor_peak_growth(runner: Runner) -> float:
    """Peak bytes of the CPU tensors allocated during one step and alive at once (MiB).

    Read from the "[memory]" events of ``torch.profiler``'s trace: with ``profile_memory`` the
    CPU allocator reports each allocation and free made while profiling, with its running
    total ("Total Allocated"), which counts only what was allocated since profiling began."""
    import tempfile

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    if not totals:
        raise RuntimeError("the profiler recorded no CPU allocation during the step")
    return max(totals) / 2 ** 20


def fmt_table(rows: list[dict], memory: bool) -> str:
    head = ["model", "mode", "mixlab img/s", "timm img/s", "ratio min", "ratio median", "ratio max"]
    tensors = memory and any("mixlab_tensor_peak_mb" in r for r in rows)
    if memory:
        head += ["mixlab peak MiB", "timm peak MiB"]
    if tensors:
        head += ["mixlab tensor peak MiB", "timm tensor peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in rows:
        cells = [r["model"], r["mode"], f"{r['mixlab_img_s']:.1f}", f"{r['timm_img_s']:.1f}", f"{r['ratio_min']:.2f}",
                 f"**{r['ratio_median']:.2f}**", f"{r['ratio_max']:.2f}"]
        if memory:
            cells += [f"{r.get('mixlab_peak_mb') or float('nan'):.0f}", f"{r.get('timm_peak_mb') or float('nan'):.0f}"]
        if tensors:
            cells += [f"{r.get('mixlab_tensor_peak_mb') or float('nan'):.0f}",
                      f"{r.get('timm_tensor_peak_mb') or float('nan'):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", help=f"architectures (default: {' '.join(REFERENCE)})")
    p.add_argument("--all", action="store_true", help="every architecture both libraries have")
    p.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per library (the ratio's sample)")
    p.add_argument("--iters", type=int, default=3, help="batches per timed round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's choice)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory probes")
    p.add_argument("--tensor-memory", action="store_true",
                   help="CPU: also probe the peak of the tensors allocated during one step (from a torch.profiler "
                        "trace), which leaves out what the allocator keeps (the resident set includes it)")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing rounds, profile --iters steps of each library and print the self time "
                        "per operator side by side (where a ratio below 1 comes from)")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    p.add_argument("--probe", nargs=3, metavar=("LIB", "MODEL", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--probe-kind", default="rss", choices=["rss", "tensors"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tensor_memory and not args.memory:
        p.error("--tensor-memory is a memory probe: it cannot go with --no-memory")
    if args.tensor_memory and torch.device(args.device).type == "cuda":
        p.error("--tensor-memory is for the CPU: on CUDA the peak-memory column already counts tensors only "
                "(torch.cuda.max_memory_allocated)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        print(run_probe(*args.probe, args))
        return 0
    if importlib.util.find_spec("timm") is None:
        p.error("timm is not installed: pip install timm (it is in mixlab's dev extra)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but CUDA is not available here")
    env = environment(device, extra=f"timm {timm_version()}")
    shared = shared_architectures()
    names = shared if args.all else (args.models or REFERENCE)
    unknown = [n for n in names if n not in shared]
    if unknown:
        p.error(f"not an architecture both libraries have: {', '.join(unknown)}; shared: {', '.join(shared)}")
    print(f"# mixlab / timm, batch {args.batch}, {args.img_size}x{args.img_size}, {args.device}, amp {args.amp}, "
          f"{args.repeats} repeats x {args.iters} batches\n# {env}", flush=True)
    if args.profile:
        for name in names:
            for mode in args.modes:
                print("\n" + profile(name, mode, args, device), flush=True)
        return 0
    rows = []
    for name in names:
        for mode in args.modes:
            row = compare(name, mode, args, device)
            rows.append(row)
            print(f"{name:32s} {mode:5s} mixlab {row['mixlab_img_s']:8.1f} img/s  timm {row['timm_img_s']:8.1f} "
                  f"img/s  ratio {row['ratio_median']:.2f} [{row['ratio_min']:.2f}, {row['ratio_max']:.2f}]",
                  flush=True)
    print()
    print(fmt_table(rows, args.memory))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
