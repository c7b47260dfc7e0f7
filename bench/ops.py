"""The CPU kernels alone against PyTorch's on the same shapes, alternating.

Runs `crates/hyperlora-cpu/examples/ops.rs` (cargo's dev profile, which builds that crate at
opt-level 3 without debug assertions, in .ci/run's target dir unless CARGO_TARGET_DIR is set) and PyTorch's Conv2d, Linear and
scaled_dot_product_attention on the shapes listed there, `--rounds` times each in turn, and
prints the best GFLOP/s of each side per shape: on a host whose speed drifts, the best of
several alternating runs is what each side can do, and the ratio of bests is stable where
medians are not.

    python3 bench/ops.py [--threads 2] [--rounds 3] [--op conv|linear|attention]
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "conv": [(128, 64, 2), (256, 32, 2), (512, 16, 2), (128, 256, 1), (256, 128, 1), (512, 64, 1)],
    "linear": [(2048, 256, 2048), (2048, 1024, 256), (2048, 256, 256), (512, 512, 4096), (512, 2048, 512),
               (512, 512, 512), (154, 2048, 256), (154, 1280, 5120), (154, 5120, 1280),
               (154, 1280, 1280), (154, 768, 768), (154, 768, 3072), (154, 3072, 768)],
    "attention": [(1024, 1024, 4), (256, 256, 8), (1024, 77, 4)],
}


def best(f, iters):
    f()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def torch_ops(op, iters):
    """PyTorch's figures: {shape name: GFLOP/s}, named as ops.rs names them."""
    import torch

    out = {}
    with torch.no_grad():
        if op == "conv":
            for c, side, b in SHAPES[op]:
                conv = torch.nn.Conv2d(c, c, 3, padding=1)
                x = torch.randn(b, c, side, side)
                out[f"{c}x{side}x{b}"] = 2 * b * c * c * 9 * side * side / best(lambda: conv(x), iters) / 1e9
        elif op == "linear":
            for m, k, n in SHAPES[op]:
                lin = torch.nn.Linear(k, n)
                x = torch.randn(m, k)
                out[f"{m}x{k}->{n}"] = 2 * m * n * k / best(lambda: lin(x), iters) / 1e9
        else:
            for sq, sk, h in SHAPES[op]:
                q, k, v = torch.randn(2, h, sq, 64), torch.randn(2, h, sk, 64), torch.randn(2, h, sk, 64)
                sdpa = torch.nn.functional.scaled_dot_product_attention
                out[f"{sq}x{sk}x{h}"] = 4 * 2 * h * sq * sk * 64 / best(lambda: sdpa(q, k, v), iters) / 1e9
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--op", action="append", choices=list(SHAPES), help="repeatable; default: all")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    env.setdefault("CARGO_TARGET_DIR", str(Path.home() / ".cache" / "hyperlora" / "cargo-target"))
    cmd = ["cargo", "build", "-q", "-p", "hyperlora-cpu", "--example", "ops"]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    exe = Path(env["CARGO_TARGET_DIR"]) / "debug" / "examples" / "ops"
    for op in args.op or list(SHAPES):
        ours, theirs = {}, {}
        for _ in range(args.rounds):
            run = subprocess.run([str(exe), op, "--iters", str(args.iters)], env=env, check=True,
                                 stdout=subprocess.PIPE, text=True)
            for line in run.stdout.splitlines():
                name, rest = line.split(" ", 1)[1].split(": ")
                ours[name] = max(ours.get(name, 0.0), float(rest.split()[2]))
            for name, gflops in torch_ops(op, args.iters).items():
                theirs[name] = max(theirs.get(name, 0.0), gflops)
        print(f"\n{op}, {args.threads} threads, best GFLOP/s of {args.rounds} alternating rounds")
        print("| shape | PyTorch | hyperlora | ours / PyTorch (time) |")
        print("| --- | ---: | ---: | ---: |")
        for name, g in ours.items():
            print(f"| {name} | {theirs[name]:.0f} | {g:.0f} | {theirs[name] / g:.2f}x |")


if __name__ == "__main__":
    main()
