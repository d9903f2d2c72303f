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
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


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


def worker(
    size: int, variant: str, masks: str, steps: int, device: str, amp: bool, ckpt: bool = False,
    channels_last: bool | None = None, count_flops: bool = True,
) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from dmaf_components.data import idt_masks
    from dmaf_components.handlers import DynamicTrainingMonitor
    from dmaf_components.losses import DMAFLoss
    from dmaf_components.networks import DMAFNet
    from dmaf_components.networks.cpu_kernels import _CPUConv

    torch.manual_seed(0)
    full = variant == "full"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch size, as in the bundle's training
    net = DMAFNet(
        3, 4, 4, fusion="dmaf" if full else "concat", gradient_checkpointing=ckpt, channels_last=channels_last
    ).to(device).train()
    loss_fn = DMAFLoss(4, 4, 128, distillation=full).to(device)
    params = list(net.parameters()) + (list(loss_fn.parameters()) if full else [])
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-4)
    dtm = DynamicTrainingMonitor(loss_fn, net) if full else None
    scaler = torch.amp.GradScaler("cuda") if amp else None
    # flair, t1, t1ce, t2 missing rates .6 .2 .4 .8; the same sequence for every configuration
    seq = idt_masks(steps + 1, [0.6, 0.2, 0.4, 0.8], seed=1) if masks == "idt" else [[1, 1, 1, 1]] * (steps + 1)
    x = torch.randn(1, 4, size, size, size, device=device)
    y = torch.randint(0, 4, (1, 1, size, size, size), device=device)

    def step(mask_row):
        mask = torch.tensor([list(mask_row)], dtype=torch.bool, device=device)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, enabled=amp, dtype=torch.float16 if device == "cuda" else torch.bfloat16):
            loss = loss_fn(net(x, mask), y)
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

    # warm-up: on CUDA every mask of the sequence once (cuDNN autotunes each new shape: the present modalities set the
    # shared decoder's batch), so that the timed steps are steady-state; on CPU one step
    warm = list(dict.fromkeys(tuple(r) for r in seq)) if device.startswith("cuda") else [tuple(seq[0])]
    for row in warm:
        step(row)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        start = time.perf_counter()
        step(seq[i + 1])
        times.append(time.perf_counter() - start)
    peak_gpu = torch.cuda.max_memory_allocated() / 1024**3 if device == "cuda" else None
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # before FLOP counting, which adds its own
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
        "sec_per_step": mean,
        "times": times,
        "gflop_per_step": total_flops / steps / 1e9 if count_flops else float("nan"),
        "peak_rss_gb": peak_rss,
        "peak_gpu_gb": peak_gpu,
        "mean_present": float(sum(sum(r) for r in seq[1:]) / steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after 1 warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="DMAFNet(gradient_checkpointing=True)")
    parser.add_argument("--variants", nargs="+", default=["full", "baseline"])
    parser.add_argument("--skip-flops", action="store_true", help="time only (no FLOP-counting passes)")
    parser.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                        help="DMAFNet(channels_last=None/True/False): auto/on = the CPU kernels (CPU tensors only), off = plain")
    parser.add_argument("--masks", nargs="+", default=["all", "idt"])
    parser.add_argument("--worker", nargs=3, metavar=("SIZE", "VARIANT", "MASKS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        size, variant, masks = args.worker
        cl = {"auto": None, "on": True, "off": False}[args.channels_last]
        print(json.dumps(worker(int(size), variant, masks, args.steps, args.device, args.amp,
                                args.gradient_checkpointing, cl, not args.skip_flops)))
        return

    gpu = args.device.startswith("cuda")
    peak_dtype = torch.float16 if (gpu and args.amp) else torch.float32
    peak = matmul_peak(args.device, peak_dtype, n=8192 if gpu else 2048)
    name = torch.cuda.get_device_name() if gpu else "cpu"
    print(f"machine: torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device} ({name}), "
          f"amp {args.amp}, gradient checkpointing {args.gradient_checkpointing}, channels-last {args.channels_last}; "
          f"measured {str(peak_dtype).replace('torch.', '')} matmul peak {peak:.1f} GFLOP/s")
    results = []
    for size in args.sizes:
        for variant in args.variants:
            for masks in args.masks:
                cmd = [sys.executable, __file__, "--worker", str(size), variant, masks, "--steps", str(args.steps),
                       "--device", args.device] + (["--amp"] if args.amp else [])
                cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
                cmd += ["--channels-last", args.channels_last] + (["--skip-flops"] if args.skip_flops else [])
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    print(out.stderr[-3000:])
                    raise SystemExit(f"worker {size} {variant} {masks} failed")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r["pct_of_peak"] = 100 * r["gflop_per_step"] / r["sec_per_step"] / peak
                results.append(r)
                gpu = f", peak GPU {r['peak_gpu_gb']:.2f} GB" if r["peak_gpu_gb"] is not None else ""
                print(f"{size:>4}^3 {variant:<8} {masks:<3} {r['sec_per_step']:7.2f} s/step  "
                      f"{r['gflop_per_step']:8.1f} GFLOP/step  "
                      f"{r['gflop_per_step'] / r['sec_per_step']:6.1f} GFLOP/s ({r['pct_of_peak']:4.1f} % of peak)  "
                      f"peak RSS {r['peak_rss_gb']:.2f} GB{gpu}  (mean modalities present {r['mean_present']:.2f})",
                      flush=True)
    print("\nratios (targets: full/baseline <= 1.3, idt/all <= 0.6)")
    by = {(r["size"], r["variant"], r["masks"]): r for r in results}
    for size in args.sizes:
        for masks in args.masks:
            if (size, "full", masks) in by and (size, "baseline", masks) in by:
                f, b = by[(size, "full", masks)], by[(size, "baseline", masks)]
                print(f"{size:>4}^3 {masks:<3} full/baseline = {f['sec_per_step'] / b['sec_per_step']:.2f}")
        for variant in args.variants:
            if (size, variant, "idt") in by and (size, variant, "all") in by:
                i, a = by[(size, variant, "idt")], by[(size, variant, "all")]
                print(f"{size:>4}^3 {variant:<8} idt/all = {i['sec_per_step'] / a['sec_per_step']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"matmul_peak_gflops": peak, "peak_dtype": str(peak_dtype), "device_name": name,
                       "channels_last": args.channels_last, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
