#!/usr/bin/env python3
"""Kernel time by kernel name from an `ncu --csv --metrics gpu__time_duration.sum` log: which
kernels dominate one profiled region (bench_gpu --profile unet|vae).

    python3 bench/ncu_summary.py ncu.csv [--top 25]
"""
from __future__ import annotations

import argparse
import csv
import io
import re
from collections import defaultdict


def rows(path: str):
    text = open(path, encoding="utf-8", errors="replace").read()
    # ncu prints its own "==PROF==" lines before the CSV header.
    start = text.find('"ID"')
    return csv.DictReader(io.StringIO(text[start:])) if start >= 0 else []


def family(name: str) -> str:
    """Groups templated/instanced names: cuBLAS/cuDNN GEMMs by their kernel family."""
    name = re.sub(r"\(.*", "", name)
    name = re.sub(r"<.*", "", name)
    return name.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    total = 0.0
    by = defaultdict(lambda: [0.0, 0])
    for r in rows(args.csv):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "ns")
        ns = value * {"ns": 1, "nsecond": 1, "us": 1e3, "usecond": 1e3, "ms": 1e6, "msecond": 1e6}.get(unit, 1)
        key = family(r["Kernel Name"])
        by[key][0] += ns
        by[key][1] += 1
        total += ns
    launches = sum(n for _, n in by.values())
    print(f"{launches} kernels, {total / 1e6:.2f} ms of kernel time")
    print(f"| kernel | launches | ms | share |\n|---|---|---|---|")
    for name, (ns, n) in sorted(by.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"| `{name[:90]}` | {n} | {ns / 1e6:.2f} | {100 * ns / total:.1f}% |")


if __name__ == "__main__":
    main()
