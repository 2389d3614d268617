"""CIFAR-10 time to accuracy on this machine: train a config, then print test top-1 and minutes.

    vit-data cifar10 cifar-10-python.tar.gz --out data/cifar10   # once: the JPEG class folders
    python bench/cifar10_time_to_accuracy.py                   # configs/cifar10_30min.yaml, 30 min
    python bench/cifar10_time_to_accuracy.py --config configs/cifar10.yaml --minutes 30   # old recipe
    python bench/cifar10_time_to_accuracy.py --data /tmp/cifar10 --run-dir /tmp/cifar_bench -- --seed_everything 1

The data (`--data`, default: $VIT_CIFAR10_DIR, else data/cifar10) is CIFAR-10's train/ and test/
class folders as `vit-data cifar10` writes them from the python-version archive
(cifar-10-python.tar.gz, https://www.cs.toronto.edu/~kriz/cifar.html).

Both configs validate on the CIFAR-10 test split, so val/acc1 is test top-1.
- A config with a `TimeBudget` callback (cifar10_30min.yaml) spans its LR schedule over the
  budget (`--minutes` sets it) and validates once, when the budget is spent.
- Any other config runs its epoch schedule under a hard `trainer.max_time` of `--minutes`
  (validation time included), one row per validated epoch.
Training-set images per second (img/s) are counted from the steps, batch size and training time.
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

import torch
import yaml

from vit_service.host import host_line

REPO = Path(__file__).resolve().parents[1]
TIME_BUDGET = "training.callbacks.TimeBudget"


def write_config(args: argparse.Namespace, run_dir: Path) -> tuple[Path, bool]:
    """The config with the data folders, the budget and outputs under run_dir; True if time-boxed."""
    cfg = yaml.safe_load(Path(args.config).read_text())
    trainer = cfg.setdefault("trainer", {})
    trainer.update(default_root_dir=str(run_dir), enable_progress_bar=False)
    budgets = [cb for cb in trainer.get("callbacks") or [] if cb.get("class_path") == TIME_BUDGET]
    for cb in budgets:
        cb.setdefault("init_args", {})["minutes"] = args.minutes
    if not budgets:
        budget = int(args.minutes * 60)
        trainer["max_time"] = f"00:{budget // 3600:02d}:{budget % 3600 // 60:02d}:{budget % 60:02d}"
    # Older configs name their output folders; point them into run_dir as well.
    for logger in trainer.get("logger") or []:
        if isinstance(logger, dict) and "save_dir" in logger.get("init_args", {}):
            logger["init_args"]["save_dir"] = str(run_dir)
    if "dirpath" in (cfg.get("checkpoint") or {}):
        cfg["checkpoint"]["dirpath"] = str(run_dir / "checkpoints")
    data = Path(args.data)
    cfg["data"].update(train_dir=str(data / "train"), val_dir=str(data / "test"), test_dir=str(data / "test"))
    path = run_dir / "bench_config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, bool(budgets)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="training budget")
    p.add_argument("--config", default=str(REPO / "configs/cifar10_30min.yaml"))
    p.add_argument("--data", default=os.environ.get("VIT_CIFAR10_DIR", "data/cifar10"),
                   help="folder with train/ and test/ class folders, from `vit-data cifar10` "
                        "(default: $VIT_CIFAR10_DIR, else data/cifar10)")
    p.add_argument("--run-dir", default="runs/cifar10_bench", help="emptied first; holds every output")
    p.add_argument("--out", help="also write the report here")
    p.add_argument("extra", nargs="*", help="extra vit-train arguments (after --)")
    args = p.parse_args()
    if not (Path(args.data) / "train").is_dir():
        p.error(f"{args.data}/train: no such folder; write it with `vit-data cifar10 cifar-10-python.tar.gz "
                f"--out {args.data}` (or pass --data / set VIT_CIFAR10_DIR)")

    run_dir = Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config, time_boxed = write_config(args, run_dir)
    cmd = [str(Path(sys.executable).parent / "vit-train"), "fit", "--config", str(config), *args.extra]
    print("$", " ".join(cmd), flush=True)
    start = time.monotonic()
    subprocess.run(cmd, check=True)
    wall = (time.monotonic() - start) / 60

    cfg = yaml.safe_load(config.read_text())
    batch = int(cfg["data"]["batch_size"])
    lines = [host_line(), f"config {Path(args.config).name}, budget {args.minutes:g} min "
             f"({'LR schedule spans the budget' if time_boxed else 'epoch schedule, hard max_time'}); "
             f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}; process wall time {wall:.1f} min (start-up and validation included)", ""]
    metrics = sorted(run_dir.rglob("metrics.csv"))
    rows = [r for r in csv.DictReader(metrics[-1].open()) if r.get("val/acc1")] if metrics else []
    if rows:
        lines += ["| epoch | minutes | test top-1 | test top-5 |", "|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {int(r['epoch']) + 1} | {float(r['time/elapsed_min']):.1f} | "
                         f"{float(r['val/acc1']) * 100:.2f}% | {float(r['val/acc5']) * 100:.2f}% |")
        lines.append("")
    # The last checkpoint carries the steps and final validation scores, and (time-boxed runs)
    # TimeBudget's training time, which excludes start-up and the final validation.
    last = max(run_dir.rglob("last*.ckpt"), key=lambda f: f.stat().st_mtime)
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    info = ckpt["vit_service"]
    budget_state = [v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("TimeBudget")]
    train_s = (budget_state[0].get("train_s") if budget_state else None) or info["train_time_s"]
    n_train = sum(1 for f in (Path(args.data) / "train").rglob("*") if f.is_file())
    images = info["global_step"] * batch
    lines.append(f"final test top-1 {info['val_acc1'] * 100:.2f}% (top-5 {info['val_acc5'] * 100:.2f}%); "
                 f"training {train_s / 60:.1f} min{'' if budget_state else ' (validation included)'}, "
                 f"{info['global_step']} steps = {images / n_train:.2f} epochs of {n_train} images, "
                 f"{images / train_s:.0f} img/s")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
