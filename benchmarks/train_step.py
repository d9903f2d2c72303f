# Copyright (c) DMAF-Net bundle contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Training-step benchmark: DMAF-Net vs the attention-free baseline, all modalities vs IDT masks, side by side.

Times forward + backward + AdamW step at batch 1 for each patch size, for
- full: DMAF fusion + relation/prototype distillation + DTM (gap EMA, reweighting, gradient scaling);
- baseline: concatenation fusion, no distillation, no DTM;
each with all four modalities and with IDT masks drawn at the paper's missing rates (t1 .2, t1ce .4, flair .6,
t2 .8). Every configuration runs in its own subprocess (so peak RSS is its own); the machine's fp32 matmul peak is
measured in the same run. Prints seconds per step, ratios, peak RSS and achieved GFLOP/s (torch.utils.flop_counter)
against that peak.

    python benchmarks/train_step.py --sizes 64 128 --steps 3
    python benchmarks/train_step.py --device cuda --amp --sizes 128      # on a GPU
    python benchmarks/train_step.py --sizes 128 --variants full --masks all --channels-last off   # plain layout

The reference peak is a dense matmul in the dtype the convolutions run in: fp32 on CPU, fp16 under --amp on CUDA
(so the percentage compares like with like).

GPU options (each a variant of the same step, for side-by-side runs): ``--bf16`` (bfloat16 autocast, no
GradScaler), ``--fused-adamw``, ``--norm group`` (instance norm through the group-norm kernel), ``--compile``
(``torch.compile`` of the network; its compile time is printed separately), ``--profile DIR`` (one profiled
step: the share of its wall time the GPU spends in kernels, kernel launches, copies and stream synchronisations, and
the top operators, written to DIR), ``--concurrent N`` (N copies of each configuration at once, e.g. N ablation runs
sharing one GPU, starting their timed steps together: mean s/step of the copies).

The bundle's opt-in path (``--compile True --fused_optimizer True``) against the default eager one, interleaved:
``--paths eager compiled --rounds R`` runs every configuration on each path in its own process, the paths taking
turns, R rounds; it prints every round, the mean per configuration and path, and compiled/eager per configuration.
*compiled* is exactly the bundle's path: ``networks.compile_network`` (the fixed-structure parts compiled in place,
the mask-dependent routing eager) and AdamW(fused=True). Its compile time is the warm-up, printed apart; the warm-up
runs every mask pattern of the sequence once, so that no compilation falls in the timed steps.

    python benchmarks/train_step.py --device cuda --amp --sizes 128 --variants full baseline --masks all \
        --paths eager compiled --rounds 2 --skip-flops --json step.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

#: the bundle's encoder widths (train.json "channels")
CHANNELS = (8, 16, 32, 64, 128)


def matmul_peak(device: str, dtype=torch.float32, n: int = 2048, reps: int = 10) -> float:
    """Measured dense matmul throughput (GFLOP/s) of this machine."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def _gpu_profile(step, row, out_dir: str, tag: str) -> dict:
    """Profile one step: GPU kernel time / wall time, host-device syncs, and the top operators (to ``out_dir``)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step(row)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    kernel_us = sum(getattr(e, "self_device_time_total", 0) for e in events if e.device_type == DeviceType.CUDA)
    # (aten::item on the CPU step counters of AdamW is no sync: count the CUDA runtime's synchronising calls)
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    copies = sum(e.count for e in events if e.key in ("cudaMemcpyAsync", "cudaMemcpy"))
    launches = sum(
        e.count
        for e in events
        if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
    )
    host_us = sum(e.self_cpu_time_total for e in events if e.device_type == DeviceType.CPU)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"profile_{tag}.txt"), "w") as f:
        f.write(events.table(sort_by="self_device_time_total", row_limit=30) + "\n")
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=30) + "\n")
    return {
        "profiled_wall_s": wall,
        "gpu_busy_pct": 100 * kernel_us / 1e6 / wall,
        "gpu_kernel_s": kernel_us / 1e6,
        "host_s": host_us / 1e6,
        "syncs": syncs,
        "copies": copies,
        "kernel_launches": launches,
    }


class _GroupInstanceNorm(torch.nn.Module):
    """Instance norm computed by the group-norm kernel (one group per channel): the same function as an
    ``InstanceNorm{2,3}d(affine=True, track_running_stats=False)`` with the same parameters, for ``--norm group``."""

    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.group_norm(x, x.shape[1], self.weight, self.bias, self.eps)


def use_group_norm_kernel(net: torch.nn.Module) -> int:
    """Swap every instance norm of ``net`` for :class:`_GroupInstanceNorm`; returns how many."""
    swapped = 0
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.modules.instancenorm._InstanceNorm) and not child.track_running_stats:
                setattr(module, name, _GroupInstanceNorm(child))
                swapped += 1
    return swapped


def worker(
    size: int,
    variant: str,
    masks: str,
    steps: int,
    device: str,
    amp: bool,
    ckpt: bool = False,
    channels_last: bool | None = None,
    count_flops: bool = True,
    bf16: bool = False,
    fused_adamw: bool = False,
    compile_net: bool = False,
    profile_dir: str | None = None,
    barrier: str | None = None,
    norm: str = "instance",
    path: str = "eager",
    channels: tuple[int, ...] = CHANNELS,
) -> dict:
    from torch._dynamo.utils import counters
    from torch.utils.flop_counter import FlopCounterMode

    from dmaf_components.data import idt_masks
    from dmaf_components.handlers import DynamicTrainingMonitor
    from dmaf_components.losses import DMAFLoss
    from dmaf_components.networks import DMAFNet, compile_network
    from dmaf_components.networks.cpu_kernels import _CPUConv

    torch.manual_seed(0)
    full = variant == "full"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch size, as in the bundle's training
    net = (
        DMAFNet(
            3,
            4,
            4,
            channels=channels,
            fusion="dmaf" if full else "concat",
            gradient_checkpointing=ckpt,
            channels_last=channels_last,
        )
        .to(device)
        .train()
    )
    if norm == "group":
        use_group_norm_kernel(net)
    if path == "compiled":  # the bundle's --compile True --fused_optimizer True
        compile_network(net)
        fused_adamw = True
        count_flops = False  # the FLOP counter would see the compiled graph's kernels, not the model's operations
    loss_fn = DMAFLoss(4, 4, channels[-1], distillation=full).to(device)
    params = list(net.parameters()) + (list(loss_fn.parameters()) if full else [])
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-4, **({"fused": True} if fused_adamw else {}))
    dtm = DynamicTrainingMonitor(loss_fn, net) if full else None
    scaler = torch.amp.GradScaler("cuda") if amp and not bf16 else None
    model = torch.compile(net) if compile_net else net  # DTM reads net.encoders: the same parameters
    # flair, t1, t1ce, t2 missing rates .6 .2 .4 .8; the same sequence for every configuration
    seq = idt_masks(steps + 1, [0.6, 0.2, 0.4, 0.8], seed=1) if masks == "idt" else [[1, 1, 1, 1]] * (steps + 1)
    x = torch.randn(1, 4, size, size, size, device=device)
    y = torch.randint(0, 4, (1, 1, size, size, size), device=device)

    def step(mask_row):
        mask = torch.tensor([list(mask_row)], dtype=torch.bool, device=device)
        opt.zero_grad(set_to_none=True)
        half = torch.float16 if device == "cuda" and not bf16 else torch.bfloat16
        with torch.autocast(device, enabled=amp, dtype=half):
            loss = loss_fn(model(x, mask), y)
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if dtm is not None:  # between backward and the optimizer step, as the bundle's handler
            dtm.step(net.encoders)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    # warm-up: on CUDA, and wherever something compiles, every mask of the sequence once (cuDNN autotunes each new
    # shape, and the present modalities set the shared decoder's batch; a compiled region compiles each new one), so
    # that the timed steps are steady-state; otherwise (CPU, eager) one step
    every = device.startswith("cuda") or compile_net or path == "compiled"
    warm = list(dict.fromkeys(tuple(r) for r in seq)) if every else [tuple(seq[0])]
    t = time.perf_counter()
    for row in warm:
        step(row)
    warm_s = time.perf_counter() - t  # includes torch.compile's compilation
    graphs = counters["stats"]["unique_graphs"]  # graphs compiled so far (0 when nothing compiles)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if barrier:  # --concurrent: every copy starts its timed steps together, after all have warmed up
        folder, n = barrier.rsplit(":", 1)
        open(os.path.join(folder, str(os.getpid())), "w").close()
        deadline = time.time() + 600
        while len(os.listdir(folder)) < int(n) and time.time() < deadline:
            time.sleep(0.05)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        step(seq[i + 1])
        times.append(time.perf_counter() - start)
    peak_gpu = torch.cuda.max_memory_allocated() / 1024**3 if device == "cuda" else None
    timed_graphs = counters["stats"]["unique_graphs"] - graphs  # should be 0: steady state
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # before FLOP counting, which adds its own
    prof = {}
    if profile_dir and device == "cuda":
        try:
            prof = _gpu_profile(step, seq[1], profile_dir, f"{size}_{variant}_{masks}")
        except Exception as e:  # noqa: BLE001  (a profiler problem must not lose the timings)
            prof = {"profile_error": f"{type(e).__name__}: {e}"}
    # FLOPs are counted in separate passes over the same masks, so counting does not slow the timed steps, and with
    # the CPU convolutions' padded backward off: the model's arithmetic, not the zero sample that it pads batch-1
    # coarse-level convolutions with to get oneDNN
    total_flops = 0
    for module in net.modules():
        if isinstance(module, _CPUConv):
            module.pad_backward = False
    for i in range(steps if count_flops else 0):
        counter = FlopCounterMode(display=False)
        with counter:
            step(seq[i + 1])
        total_flops += counter.get_total_flops()
    mean = sum(times) / len(times)
    return {
        "size": size,
        "variant": variant,
        "masks": masks,
        "path": path,
        "sec_per_step": mean,
        "times": times,
        "gflop_per_step": total_flops / steps / 1e9 if count_flops else float("nan"),
        "peak_rss_gb": peak_rss,
        "peak_gpu_gb": peak_gpu,
        "mean_present": float(sum(sum(r) for r in seq[1:]) / steps),
        "warmup_s": warm_s,
        "graphs_compiled_warmup": graphs,
        "graphs_compiled_timed": timed_graphs,
        **prof,
    }


def _run_configuration(args, size: int, variant: str, masks: str, path: str) -> dict | None:
    """One configuration on one path: ``--concurrent`` worker processes (one, by default); their result, or None when
    a worker failed (its error printed: the other configurations still run)."""
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        str(size),
        variant,
        masks,
        "--steps",
        str(args.steps),
        "--device",
        args.device,
        "--path",
        path,
        "--channels",
        *map(str, args.channels),
    ]
    cmd += ["--amp"] if args.amp else []
    cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    cmd += ["--channels-last", args.channels_last] + (["--skip-flops"] if args.skip_flops else [])
    cmd += [
        flag
        for flag, on in (("--bf16", args.bf16), ("--fused-adamw", args.fused_adamw), ("--compile", args.compile))
        if on
    ] + ["--norm", args.norm]
    with tempfile.TemporaryDirectory() as tmp:
        barrier = os.path.join(tmp, "barrier")
        os.makedirs(barrier)
        procs, files = [], []
        for k in range(args.concurrent):  # output to files: no copy blocks on a full pipe
            copy = cmd + (["--profile", args.profile] if args.profile and k == 0 else [])
            copy += ["--barrier", f"{barrier}:{args.concurrent}"] if args.concurrent > 1 else []
            out_f, err_f = (open(os.path.join(tmp, f"{k}.{x}"), "w+") for x in ("out", "err"))
            files.append((out_f, err_f))
            procs.append(subprocess.Popen(copy, stdout=out_f, stderr=err_f, text=True))
        outs = []
        for p, (out_f, err_f) in zip(procs, files):
            p.wait()
            out_f.seek(0), err_f.seek(0)
            outs.append((out_f.read(), err_f.read()))
            out_f.close(), err_f.close()
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            print(err[-3000:])
            print(f"worker {size} {variant} {masks} {path} failed (exit status {p.returncode})", flush=True)
            return None
    copies = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    r = copies[0]
    if len(copies) > 1:  # the mean over the copies that ran at once
        r["sec_per_step"] = sum(c["sec_per_step"] for c in copies) / len(copies)
        r["copies_sec_per_step"] = [c["sec_per_step"] for c in copies]
    return r


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after the warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="DMAFNet(gradient_checkpointing=True)")
    parser.add_argument("--variants", nargs="+", default=["full", "baseline"])
    parser.add_argument("--skip-flops", action="store_true", help="time only (no FLOP-counting passes)")
    parser.add_argument(
        "--channels-last",
        choices=["auto", "on", "off"],
        default="auto",
        help="DMAFNet(channels_last=None/True/False): auto/on = the CPU kernels (CPU tensors only), off = plain",
    )
    parser.add_argument("--masks", nargs="+", default=["all", "idt"])
    parser.add_argument(
        "--channels",
        type=int,
        nargs="+",
        default=list(CHANNELS),
        help="encoder widths, one per level (default: the bundle's); a patch needs at least 2 voxels "
        "per axis at the deepest level (5 levels: 32^3 and up; 16^3 takes at most 4)",
    )
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=["eager", "compiled"],
        default=["eager"],
        help="eager: the default step; compiled: the bundle's --compile True --fused_optimizer True "
        "(compile_network + AdamW(fused=True)); several take turns per configuration",
    )
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole set of configurations this often")
    parser.add_argument("--bf16", action="store_true", help="with --amp: bfloat16 autocast, no GradScaler")
    parser.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the whole network")
    parser.add_argument("--profile", default=None, metavar="DIR", help="CUDA: profile one step, tables to DIR")
    parser.add_argument("--concurrent", type=int, default=1, help="copies of each configuration run at once")
    parser.add_argument("--worker", nargs=3, metavar=("SIZE", "VARIANT", "MASKS"), help=argparse.SUPPRESS)
    parser.add_argument("--path", default="eager", help=argparse.SUPPRESS)
    parser.add_argument(
        "--norm",
        choices=["instance", "group"],
        default="instance",
        help="group: instance norm computed by the group-norm kernel (same function)",
    )
    parser.add_argument("--barrier", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bf16 and not args.amp:
        parser.error("--bf16 needs --amp (it selects the autocast type)")
    if args.compile and "compiled" in args.paths:
        parser.error(
            "--compile (torch.compile of the whole network) and --paths compiled (the bundle's compiled "
            "parts) are two different compilations: choose one"
        )
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    too_small = [size for size in args.sizes if -(-size // 2 ** (len(args.channels) - 1)) < 2]
    if too_small:  # instance norm in training needs more than one voxel per channel
        parser.error(
            f"--sizes {too_small}: {len(args.channels)} levels leave one voxel at the deepest level; give "
            f"fewer --channels (e.g. --channels {' '.join(map(str, args.channels[:-1]))})"
        )
    if args.compile:
        args.skip_flops = True  # the FLOP counter would count the compiled graph's kernels, not the model's ops
    if args.worker:
        size, variant, masks = args.worker
        cl = {"auto": None, "on": True, "off": False}[args.channels_last]
        print(
            json.dumps(
                worker(
                    int(size),
                    variant,
                    masks,
                    args.steps,
                    args.device,
                    args.amp,
                    args.gradient_checkpointing,
                    cl,
                    not args.skip_flops,
                    args.bf16,
                    args.fused_adamw,
                    args.compile,
                    args.profile,
                    args.barrier,
                    args.norm,
                    args.path,
                    tuple(args.channels),
                )
            )
        )
        return

    gpu = args.device.startswith("cuda")
    peak_dtype = torch.float16 if (gpu and args.amp) else torch.float32
    peak = matmul_peak(args.device, peak_dtype, n=8192 if gpu else 2048)
    name = torch.cuda.get_device_name() if gpu else "cpu"
    print(
        f"machine: torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device} ({name}), "
        f"amp {args.amp}{' bf16' if args.bf16 else ''}, gradient checkpointing {args.gradient_checkpointing}, "
        f"channels-last {args.channels_last}, fused AdamW {args.fused_adamw}, compile {args.compile}, "
        f"norm kernel {args.norm}, channels {args.channels}, paths {' '.join(args.paths)}, {args.rounds} round(s), "
        f"{args.concurrent} at once; measured {str(peak_dtype).replace('torch.', '')} matmul peak {peak:.1f} GFLOP/s"
    )
    results, failed = [], []

    def dump(complete: bool, **more) -> None:
        """--json: everything so far (rewritten after every configuration, so that a run cut short keeps its rows)."""
        if not args.json:
            return
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "matmul_peak_gflops": peak,
                    "peak_dtype": str(peak_dtype),
                    "device_name": name,
                    "torch": torch.__version__,
                    "channels_last": args.channels_last,
                    "options": {
                        k: getattr(args, k)
                        for k in (
                            "amp",
                            "bf16",
                            "fused_adamw",
                            "compile",
                            "concurrent",
                            "norm",
                            "paths",
                            "rounds",
                            "steps",
                            "channels",
                        )
                    },
                    "complete": complete,
                    "results": results,
                    "failed": failed,
                    **more,
                },
                fh,
                indent=2,
            )

    configurations = [
        (size, variant, masks) for size in args.sizes for variant in args.variants for masks in args.masks
    ]
    for rnd in range(1, args.rounds + 1):
        if args.rounds > 1:
            print(f"round {rnd}/{args.rounds}", flush=True)
        for size, variant, masks in configurations:
            for path in args.paths:  # the paths take turns on each configuration
                r = _run_configuration(args, size, variant, masks, path)
                if r is None:
                    failed.append({"size": size, "variant": variant, "masks": masks, "path": path, "round": rnd})
                    dump(complete=False)
                    continue
                r["round"] = rnd
                r["pct_of_peak"] = 100 * r["gflop_per_step"] / r["sec_per_step"] / peak
                results.append(r)
                dump(complete=False)
                gpu_mem = f", peak GPU {r['peak_gpu_gb']:.2f} GB" if r["peak_gpu_gb"] is not None else ""
                print(
                    f"{size:>4}^3 {variant:<8} {masks:<3} {path:<8} {r['sec_per_step']:7.3f} s/step  "
                    f"{r['gflop_per_step']:8.1f} GFLOP/step  "
                    f"{r['gflop_per_step'] / r['sec_per_step']:6.1f} GFLOP/s ({r['pct_of_peak']:4.1f} % of peak)  "
                    f"peak RSS {r['peak_rss_gb']:.2f} GB{gpu_mem}  (mean modalities present {r['mean_present']:.2f}; "
                    f"warm-up {r['warmup_s']:.1f} s)",
                    flush=True,
                )
                if r["graphs_compiled_warmup"] or r["graphs_compiled_timed"]:
                    print(
                        f"      graphs compiled: {r['graphs_compiled_warmup']} in the warm-up, "
                        f"{r['graphs_compiled_timed']} in the timed steps",
                        flush=True,
                    )
                if "profile_error" in r:
                    print(f"      profiling failed: {r['profile_error']}")
                if "gpu_busy_pct" in r:
                    print(
                        f"      profiled step: GPU busy {r['gpu_busy_pct']:.0f} % of {r['profiled_wall_s']:.3f} s "
                        f"(kernels {r['gpu_kernel_s']:.3f} s, host {r['host_s']:.3f} s), {r['kernel_launches']} "
                        f"kernel launches, {r['copies']} copies, {r['syncs']} stream syncs",
                        flush=True,
                    )
    summary = []
    for size, variant, masks in configurations:
        for path in args.paths:
            runs = [
                r for r in results if (r["size"], r["variant"], r["masks"], r["path"]) == (size, variant, masks, path)
            ]
            if not runs:
                continue
            gpu_peaks = [r["peak_gpu_gb"] for r in runs if r["peak_gpu_gb"] is not None]
            summary.append(
                {
                    "size": size,
                    "variant": variant,
                    "masks": masks,
                    "path": path,
                    "sec_per_step": _mean([r["sec_per_step"] for r in runs]),
                    "rounds_sec_per_step": [r["sec_per_step"] for r in runs],
                    "warmup_s": _mean([r["warmup_s"] for r in runs]),
                    "peak_gpu_gb": max(gpu_peaks) if gpu_peaks else None,
                    "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
                }
            )
    print(f"\nmean over {args.rounds} round(s) (warm-up, which includes any compilation, apart)")
    for m in summary:
        gpu_mem = f", peak GPU {m['peak_gpu_gb']:.2f} GB" if m["peak_gpu_gb"] is not None else ""
        rounds = " ".join(f"{t:.3f}" for t in m["rounds_sec_per_step"])
        print(
            f"{m['size']:>4}^3 {m['variant']:<8} {m['masks']:<3} {m['path']:<8} {m['sec_per_step']:7.3f} s/step "
            f"(rounds: {rounds}), warm-up {m['warmup_s']:.1f} s, peak RSS {m['peak_rss_gb']:.2f} GB{gpu_mem}"
        )
    by = {(m["size"], m["variant"], m["masks"], m["path"]): m for m in summary}
    ratios = []
    if "eager" in args.paths and "compiled" in args.paths:
        print("\ncompiled/eager (mean s/step)")
        for size, variant, masks in configurations:
            e, c = by.get((size, variant, masks, "eager")), by.get((size, variant, masks, "compiled"))
            if e is None or c is None:
                continue
            ratio = c["sec_per_step"] / e["sec_per_step"]
            ratios.append({"size": size, "variant": variant, "masks": masks, "compiled_over_eager": ratio})
            print(f"{size:>4}^3 {variant:<8} {masks:<3} {ratio:.2f}")
    print("\nratios (targets: full/baseline <= 1.3, idt/all <= 0.6)")
    for path in args.paths:
        tag = f" {path}" if len(args.paths) > 1 else ""
        for size in args.sizes:
            for masks in args.masks:
                if (size, "full", masks, path) in by and (size, "baseline", masks, path) in by:
                    f, b = by[(size, "full", masks, path)], by[(size, "baseline", masks, path)]
                    print(f"{size:>4}^3 {masks:<3}{tag} full/baseline = {f['sec_per_step'] / b['sec_per_step']:.2f}")
            for variant in args.variants:
                if (size, variant, "idt", path) in by and (size, variant, "all", path) in by:
                    i, a = by[(size, variant, "idt", path)], by[(size, variant, "all", path)]
                    print(f"{size:>4}^3 {variant:<8}{tag} idt/all = {i['sec_per_step'] / a['sec_per_step']:.2f}")
    dump(complete=True, summary=summary, compiled_over_eager=ratios)
    if failed:
        raise SystemExit(f"{len(failed)} configuration run(s) failed: {failed}")


if __name__ == "__main__":
    main()
