"""NT-Xent forward + backward: time and peak memory of simclr's loss against a straightforward one.

The straightforward version is the textbook one (normalise, one (2N)x(2N) matmul, divide by the
temperature, mask the diagonal with an eye mask, cross-entropy). Each variant and batch size runs
in a fresh process on the CPU; its peak memory is the process's peak resident set (ru_maxrss) minus
what it held just before the loss (torch, the inputs), and its time the median of --repeats runs
after one warm-up.

    .venv/bin/python benchmarks/bench_loss.py
    .venv/bin/python benchmarks/bench_loss.py --batch 4096 8192 --dim 128 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


def straightforward(z_a, z_b, temperature):
    import torch
    import torch.nn.functional as F

    n = z_a.shape[0]
    z = F.normalize(torch.cat([z_a, z_b]), dim=1)  # (2N, D)
    logits = z @ z.T / temperature  # (2N, 2N)
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])  # (2N,)
    return F.cross_entropy(logits, targets)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(variant: str, batch: int, dim: int, repeats: int) -> dict:
    """Run in a fresh process: seconds per forward+backward and peak extra memory in bytes."""
    import torch

    from simclr_cli.loss import nt_xent

    loss_fn = nt_xent if variant == "simclr" else straightforward
    torch.manual_seed(0)
    z_a = torch.randn(batch, dim, requires_grad=True)
    z_b = torch.randn(batch, dim, requires_grad=True)
    before = _rss_bytes()
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        loss = loss_fn(z_a, z_b, 0.1)
        loss.backward()
        times.append(time.perf_counter() - start)
        z_a.grad = z_b.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"seconds": statistics.median(times[1:]), "peak_bytes": peak, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[4096, 8192], help="images N (2N views)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.dim, args.repeats)))
        return

    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"{platform.machine()} {os.cpu_count()} CPU core(s), torch threads {threads}")
    for batch in args.batch:
        results = {}
        for variant in ("straightforward", "simclr"):
            out = subprocess.run([sys.executable, __file__, "--child", variant, str(batch), "--dim", str(args.dim),
                                  "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        base, ours = results["straightforward"], results["simclr"]
        assert abs(base["loss"] - ours["loss"]) < 1e-3 * abs(base["loss"]), (base["loss"], ours["loss"])
        print(f"N={batch} ({2 * batch} views, {args.dim}-d): "
              f"straightforward {base['seconds']:.2f} s, peak +{base['peak_bytes'] / 2**30:.2f} GiB; "
              f"simclr {ours['seconds']:.2f} s, peak +{ours['peak_bytes'] / 2**30:.2f} GiB; "
              f"time ratio {ours['seconds'] / base['seconds']:.2f}x, memory ratio "
              f"{ours['peak_bytes'] / base['peak_bytes']:.2f}x (target: both <= 1)")


if __name__ == "__main__":
    main()
