"""Network cost: parameters, FLOPs and time per slice per network pass.

    python benchmarks/bench_network.py                       # CPU, fp32, small + paper
    python benchmarks/bench_network.py --device cuda --dtype bf16 --batch 256
    python benchmarks/bench_network.py --presets small --stand-in --sizes 136x160 --batch 1 --compile

Prints one row per (preset, slice size): parameters, GFLOP per slice-pass
(counted by torch's FlopCounterMode), ms per slice per pass, and on CUDA the
achieved fraction of the GPU's dense bf16 peak (``--peak-tflops``).
``--stand-in`` adds the physics prior and b-value tokens (the model being
trained to ship). With ``--compile`` or a dtype other than fp32, each row also
gives the largest difference of the output from the eager fp32 network's on
the same input, relative to its largest value: the price of the speed-up.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from qid2_diffusers import build_pipeline
from qid2_diffusers.evaluation.report import write_json
from qid2_diffusers.models.unet import unet_forward
from qid2_diffusers.threads import cpu_name

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def one_pass(pipe, batch, size, device, dtype, channels_last=False, unet=None):
    """A closure running one pass of ``unet`` (default: the pipeline's) on a fixed random input."""
    r = pipe.num_references
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, pipe.unet.config.in_channels, *size, generator=generator).to(device, dtype)
    x, _ = pipe.image_processor.pad(x)
    if channels_last:  # as the pipeline feeds the network
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.full((batch,), 500, device=device)
    bvals = dict(target_bvals=torch.full((batch,), 1000.0, device=device),
                 reference_bvals=torch.full((batch, r), 1000.0, device=device))
    tokens = pipe.direction_encoder(torch.randn(batch, 3, generator=generator).to(device),
                                    torch.randn(batch, r, 3, generator=generator).to(device), **bvals).to(dtype)
    unet = unet if unet is not None else pipe.unet
    return lambda: unet_forward(unet, x, t, tokens)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="small,paper")
    ap.add_argument("--sizes", default="145x174,72x87")
    ap.add_argument("--R", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=DTYPES)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--channels-last", action="store_true", help="channels_last weights and input")
    ap.add_argument("--stand-in", action="store_true", help="with the physics prior and b-value tokens")
    ap.add_argument("--compile", action="store_true", help="torch.compile the U-Net (compiled before the timing)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200 SXM: 989)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    rows = []
    print(f"# {cpu_name()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {args.device}{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, {args.dtype}, batch {args.batch}")
    print(f"{'preset':8} {'size':>8} {'params':>10} {'GFLOP/slice':>12} {'ms/slice/pass':>14} {'TFLOP/s':>8} {'%peak':>6}")
    exact = dtype == torch.float32 and not args.compile
    for preset in args.presets.split(","):
        pipe = build_pipeline(preset, args.R, physics_prior=args.stand_in, bval_conditioning=args.stand_in)
        reference = None if exact else copy.deepcopy(pipe).to(device)
        pipe = pipe.to(device, dtype)
        if args.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
        unet = torch.compile(pipe.unet) if args.compile else pipe.unet
        params = sum(p.numel() for p in pipe.unet.parameters()) + sum(p.numel() for p in pipe.direction_encoder.parameters())
        for s in args.sizes.split(","):
            size = tuple(int(v) for v in s.split("x"))
            with torch.inference_mode():
                fn = one_pass(pipe, args.batch, size, device, dtype, args.channels_last, unet)
                with FlopCounterMode(display=False) as counter:
                    one_pass(pipe, args.batch, size, device, dtype, args.channels_last)()
                flops = counter.get_total_flops() / args.batch
                t0 = time.perf_counter()
                out = fn().float()  # warm-up (and compilation)
                first_s = time.perf_counter() - t0
                error = None
                if reference is not None:
                    expected = one_pass(reference, args.batch, size, device, torch.float32, args.channels_last)()
                    error = float((out - expected).abs().max() / expected.abs().max())
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(args.repeats):
                    fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = (time.perf_counter() - t0) / (args.repeats * args.batch)
            tflops = flops / dt / 1e12
            pct = 100 * tflops / args.peak_tflops if device.type == "cuda" else float("nan")
            row = dict(preset=preset, size=s, params=params, gflop_per_slice=flops / 1e9, ms_per_slice_pass=dt * 1e3,
                       tflops=tflops, percent_of_peak=pct, device=args.device, dtype=args.dtype, batch=args.batch,
                       compiled=args.compile, first_call_s=first_s, max_relative_difference=error)
            rows.append(row)
            extra = "" if error is None else f"   first call {first_s:.1f} s, max diff {error:.1e} of max"
            print(f"{preset:8} {s:>8} {params:>10,} {flops / 1e9:>12.2f} {dt * 1e3:>14.2f} {tflops:>8.2f} {pct:>6.1f}{extra}")
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
