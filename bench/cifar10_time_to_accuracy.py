"""CIFAR-10 time to accuracy: train with configs/cifar10.yaml for a wall-clock budget, then
print test top-1 against minutes (one row per epoch) and write the table to stdout / --out.

    tar -xzf ../shared/datasets/cifar10-jpg.tar.gz -C /tmp
    python bench/cifar10_time_to_accuracy.py --minutes 30 [--run-dir runs/cifar10_bench] [-- extra vit-train args]

The config validates on the CIFAR-10 test split every epoch, so val/acc1 is test top-1.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="hard wall-clock budget (Trainer max_time)")
    p.add_argument("--config", default=str(REPO / "configs/cifar10.yaml"))
    p.add_argument("--run-dir", default="runs/cifar10_bench")
    p.add_argument("--out", help="also write the Markdown table here")
    p.add_argument("extra", nargs="*", help="extra vit-train arguments (after --)")
    args = p.parse_args()

    run_dir = Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    budget = int(args.minutes * 60)
    max_time = f"00:{budget // 3600:02d}:{budget % 3600 // 60:02d}:{budget % 60:02d}"
    cfg = yaml.safe_load(Path(args.config).read_text())
    cfg["trainer"].update(max_time=max_time, default_root_dir=str(run_dir), enable_progress_bar=False)
    run_dir.mkdir(parents=True)
    config = run_dir / "bench_config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cmd = [str(Path(sys.executable).parent / "vit-train"), "fit", "--config", str(config), *args.extra]
    print("$", " ".join(cmd), flush=True)
    start = time.monotonic()
    subprocess.run(cmd, check=True)
    wall = (time.monotonic() - start) / 60

    metrics = run_dir / "version_0" / "metrics.csv"  # the run folder under default_root_dir
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("val/acc1")]
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"process wall time {wall:.1f} min (start-up included)",
        "", "| epoch | minutes | test top-1 | test top-5 |", "|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {int(r['epoch']) + 1} | {float(r['time/elapsed_min']):.1f} | "
                     f"{float(r['val/acc1']) * 100:.2f}% | {float(r['val/acc5']) * 100:.2f}% |")
    best = max(rows, key=lambda r: float(r["val/acc1"]))
    lines += ["", f"best test top-1 {float(best['val/acc1']) * 100:.2f}% at epoch {int(best['epoch']) + 1} "
                  f"({float(best['time/elapsed_min']):.1f} min)"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
