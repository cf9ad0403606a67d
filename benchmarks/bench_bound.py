"""What this machine can do: the throughput bound that up-sampling figures are measured against.

    python benchmarks/bench_bound.py                                   # 1 and 2 threads, HCP-grid crop
    python benchmarks/bench_bound.py --threads 1 --stages cpu.json     # + a run's stages against the bound
    python benchmarks/bench_bound.py --profile                         # + where one network pass spends its time
    python benchmarks/bench_bound.py --attention coarse                # the network with coarse-only cross-attention
    python benchmarks/bench_bound.py --attention coarse --compile --batches 1,4   # torch.compile'd (qid2 upsample --compile)
    python benchmarks/bench_bound.py --attention coarse --dtype bf16   # network and bound in bf16 (--dtype auto on AVX-512 BF16)

Measured with torch, in ``--dtype`` (fp32 by default; matmul, conv and network alike), at each
thread count (``torch.set_num_threads``):

- **matmul**: a dense 2048 x 2048 product, the GEMM peak torch reaches here;
- **conv**: ``conv2d`` of the network's costliest convolution at the crop size
  and batch of a real run, channels_last: the most a layer of this U-Net can
  attain (its channel counts, 32 to 96, are small for a GEMM);
- **network**: one forward pass of the stand-in model (the ``small`` preset with
  the physics prior and b-value tokens, the model being trained to ship) at
  several batch sizes; FLOPs counted by torch's ``FlopCounterMode``, so
  GFLOP/s = counted FLOPs / seconds, reported as a fraction of the conv bound.
  With ``--compile`` the pass is ``torch.compile``'d as ``qid2 upsample --compile``
  does (:func:`~qid2_diffusers.hub.compile_unet`, static shapes: one graph per
  batch size, compiled in the warm-up call); FLOPs are counted on the eager pass.

The conv figure is the bound: the network's FLOPs are almost all convolutions
and linear layers of these widths, so a pass cannot run faster than its FLOPs
at the conv rate. ``--stages`` reads the JSON of
``benchmarks/bench_gpu_volume.py --device cpu`` and prints each stage's seconds
next to the time the run's network passes would take at the bound.
Each figure is the median of ``--repeats`` timings after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from qid2_diffusers import build_pipeline
from qid2_diffusers.hub import DTYPES, compile_unet
from qid2_diffusers.evaluation.report import write_json
from qid2_diffusers.models.unet import ATTENTION, unet_forward
from qid2_diffusers.threads import cpu_name
from qid2_diffusers.timing import STAGES


def median_seconds(fn, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stand_in_network(attention: str = "every", dtype: str = "fp32"):
    """The U-Net and direction encoder of the model being trained to ship (random weights: speed does not depend on
    them), with direction tokens attended to at ``attention`` levels (:data:`~qid2_diffusers.models.unet.ATTENTION`),
    the U-Net in ``dtype`` (the encoder stays fp32; its tokens are cast, as in the pipeline)."""
    pipe = build_pipeline("small", 3, physics_prior=True, bval_conditioning=True, default_num_inference_steps=1,
                          attention=attention)
    if dtype != "fp32":
        pipe.unet.to(dtype=DTYPES[dtype])
    return pipe


def network_pass(pipe, batch: int, size: tuple[int, int]):
    """A closure running one forward pass as the pipeline does (channels_last input, the network's dtype), and its
    FLOPs."""
    c, dtype = pipe.unet.config.in_channels, pipe.unet.dtype
    x = torch.randn(batch, c, *size, dtype=dtype).contiguous(memory_format=torch.channels_last)
    t = torch.full((batch,), 999)
    r = pipe.num_references
    with torch.inference_mode():  # the encoder in its own dtype, its tokens cast to the U-Net's, as the pipeline does
        tokens = pipe.direction_encoder(torch.randn(batch, 3), torch.randn(batch, r, 3), torch.full((batch,), 1000.0),
                                        torch.full((batch, r), 1000.0)).to(dtype)

    def run():
        return unet_forward(pipe.unet, x, t, tokens)

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        run()
    return run, counter.get_total_flops()


def costliest_conv(pipe, size: tuple[int, int]) -> dict:
    """Shape of the convolution with the most FLOPs in one pass at ``size`` (batch 1)."""
    found = []

    def hook(module, inputs, output):
        k = module.kernel_size[0] * module.kernel_size[1]
        flops = 2 * output.numel() * module.in_channels // module.groups * k
        found.append(dict(flops=flops, in_channels=module.in_channels, out_channels=module.out_channels,
                          kernel=module.kernel_size[0], height=inputs[0].shape[-2], width=inputs[0].shape[-1],
                          stride=module.stride[0], padding=module.padding[0]))

    handles = [m.register_forward_hook(hook) for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        run, _ = network_pass(pipe, 1, size)
        with torch.inference_mode():
            run()
    finally:
        for h in handles:
            h.remove()
    return max(found, key=lambda d: d["flops"])


def matmul_gflops(n: int, repeats: int, dtype=torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats) / 1e9


def conv_gflops(layer: dict, batch: int, repeats: int, dtype=torch.float32) -> float:
    x = torch.randn(batch, layer["in_channels"], layer["height"], layer["width"], dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    w = torch.randn(layer["out_channels"], layer["in_channels"], layer["kernel"], layer["kernel"], dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    with torch.inference_mode():
        seconds = median_seconds(lambda: F.conv2d(x, w, stride=layer["stride"], padding=layer["padding"]), repeats)
    return layer["flops"] * batch / seconds / 1e9


def measure(threads: int, size, batches, repeats: int, attention: str = "every", compile: bool = False,
            dtype: str = "fp32") -> dict:
    """Every figure at one thread count."""
    torch.set_num_threads(threads)
    pipe = stand_in_network(attention, dtype)
    layer = costliest_conv(pipe, size)
    row = dict(threads=threads, attention=attention, compiled=compile, dtype=dtype,
               matmul_gflops=matmul_gflops(2048, repeats, DTYPES[dtype]), conv_layer=layer, conv_gflops={}, network={})
    eager = pipe.unet
    for batch in batches:
        row["conv_gflops"][batch] = conv_gflops(layer, batch, repeats, DTYPES[dtype])
        pipe.unet = eager  # FLOPs are counted on the eager pass
        run, flops = network_pass(pipe, batch, size)
        if compile:
            # A fresh static-shape graph per batch size (a recompiled graph would turn dynamic and slower).
            torch._dynamo.reset()
            compile_unet(pipe, dynamic=False)
        with torch.inference_mode():
            seconds = median_seconds(run, repeats)
        row["network"][batch] = dict(gflop_per_slice=flops / batch / 1e9, ms_per_slice=1e3 * seconds / batch,
                                     gflops=flops / seconds / 1e9)
    row["bound_gflops"] = max(row["conv_gflops"].values())
    return row


def print_row(row: dict) -> None:
    layer, bound = row["conv_layer"], row["bound_gflops"]
    dtype = row.get("dtype", "fp32")
    print(f"\n## {row['threads']} thread(s), {dtype}{', torch.compile' if row.get('compiled') else ', eager'}")
    print(f"matmul 2048^2 {dtype}: {row['matmul_gflops']:.1f} GFLOP/s")
    print(f"costliest conv: {layer['in_channels']}->{layer['out_channels']} {layer['kernel']}x{layer['kernel']} at "
          f"{layer['height']}x{layer['width']}, {layer['flops'] / 1e9:.3f} GFLOP per slice")
    print(f"{'batch':>5} {'conv GFLOP/s':>13} {'net GFLOP/slice':>16} {'net ms/slice':>13} {'net GFLOP/s':>12} "
          f"{'net / bound':>11}")
    for batch, net in row["network"].items():
        print(f"{batch:>5} {row['conv_gflops'][batch]:>13.1f} {net['gflop_per_slice']:>16.2f} {net['ms_per_slice']:>13.1f} "
              f"{net['gflops']:>12.1f} {net['gflops'] / bound:>11.0%}")
    print(f"bound (best conv): {bound:.1f} GFLOP/s = {bound / row['matmul_gflops']:.0%} of matmul")


def stage_table(stages: dict, rows: dict[int, dict]) -> list[dict]:
    """Each stage of a run against the time its network passes would take at the bound of its thread count."""
    threads = int(stages.get("threads", 1))
    if threads not in rows:
        raise SystemExit(f"the run used {threads} thread(s); measure the bound at that count (--threads {threads})")
    bound = rows[threads]["bound_gflops"]
    ideal = stages["network_passes"] * stages["gflop_per_pass"] / bound
    timings, total = stages["timings"], sum(stages["timings"].values())
    table = [dict(stage=s, seconds=timings[s], share=timings[s] / total, per_bound=timings[s] / ideal)
             for s in STAGES if s in timings]
    table.append(dict(stage="total", seconds=total, share=1.0, per_bound=total / ideal))
    print(f"\n## stages of {stages.get('label', 'the run')} ({threads} thread(s)): {stages['network_passes']} network "
          f"passes x {stages['gflop_per_pass']:.2f} GFLOP = {ideal:.1f} s at the bound ({bound:.1f} GFLOP/s)")
    print(f"{'stage':>14} {'seconds':>9} {'share':>6} {'x bound time':>13}")
    for r in table:
        print(f"{r['stage']:>14} {r['seconds']:>9.1f} {r['share']:>6.1%} {r['per_bound']:>13.2f}")
    sampling = timings.get("sampling")
    if sampling:
        print(f"sampling runs at {ideal / sampling:.0%} of the bound; the whole run at {ideal / total:.0%}")
    return table


def profile_pass(size, batch: int, threads: int, attention: str = "every", dtype: str = "fp32") -> None:
    """Self CPU time per operator over a few passes: what a pass spends outside its convolutions."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    run, _ = network_pass(stand_in_network(attention, dtype), batch, size)
    with torch.inference_mode():
        run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                run()
    print(f"\n## operators of 3 passes, batch {batch} at {size[0]}x{size[1]}, {threads} thread(s)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default: 1,2)")
    ap.add_argument("--size", default="136x160",
                    help="padded crop HxW (default: the 1.25 mm phantom's brain box, 134x157, padded)")
    ap.add_argument("--batches", default="1,2,4,8", help="slices per network call (default: 1,2,4,8)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stages", help="JSON of benchmarks/bench_gpu_volume.py: print its stages against the bound")
    ap.add_argument("--profile", action="store_true", help="also print the operators of a pass at batch 1")
    ap.add_argument("--attention", default="every", choices=ATTENTION,
                    help="the stand-in network's cross-attention levels (qid2_diffusers.models.unet.ATTENTION)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the network as qid2 upsample --compile does")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="the network's and the bound's dtype (default: fp32; bf16 is what --dtype auto picks on a "
                         "CPU with native bf16)")
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    batches = [int(b) for b in args.batches.split(",")]
    print(f"# {cpu_name()}, torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, crop {size[0]}x{size[1]}, {args.dtype}")
    rows = {}
    for threads in (int(t) for t in args.threads.split(",")):
        rows[threads] = measure(threads, size, batches, args.repeats, args.attention, args.compile, args.dtype)
        print_row(rows[threads])
    result = dict(cpu=cpu_name(), size=list(size), rows=list(rows.values()))
    if args.stages:
        with open(args.stages) as f:
            result["stages"] = stage_table(json.load(f), rows)
    if args.profile:
        profile_pass(size, 1, min(rows), args.attention, args.dtype)
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
