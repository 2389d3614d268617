"""Is the train dataloader the bottleneck? Loader images/s vs the train step's consumption rate.

For each config it measures, on this machine:
  loader      images/s of the config's train DataLoader alone (decode + timm augmentation)
  step        images/s of forward + backward + AdamW on an in-memory batch (no loading)
  end-to-end  images/s of real training steps fed by the loader (what training actually gets)

    python bench/data_loading.py --config configs/cifar10.yaml --config configs/demo.yaml \
        [--set data.train_dir=$VIT_CIFAR10_DIR/train ...]

configs/cifar10.yaml reads data/cifar10/train (`vit-data cifar10 cifar-10-python.tar.gz --out
data/cifar10`, from the python-version archive of https://www.cs.toronto.edu/~kriz/cifar.html);
a copy elsewhere is one --set away.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import time
from typing import Any

import torch
import yaml

from training.data import ImageFolderDataModule
from training.module import build_model_config
from vit_service.host import host_line
from vit_service.model import VisionTransformer


def load_config(path: str, overrides: list[str]) -> dict[str, Any]:
    cfg = yaml.safe_load(open(path))
    for item in overrides:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        cfg[section][name] = yaml.safe_load(value)
    return cfg


def loader_rate(loader: torch.utils.data.DataLoader, batches: int) -> float:
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start, n = time.perf_counter(), 0
    for x, _ in itertools.islice(it, batches):
        n += x.shape[0]
    return n / (time.perf_counter() - start)


def train_step_rate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                    precision: str) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    model.train()
    start, n = None, 0
    for i, (x, y) in enumerate(batches):
        if i == 1:  # the first step warms up allocator and kernels
            start, n = time.perf_counter(), 0
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        n += x.shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", required=True)
    p.add_argument("--set", action="append", default=[], help="override, e.g. data.train_dir=/x (applies to all)")
    p.add_argument("--batches", type=int, default=30)
    args = p.parse_args()

    print(host_line())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads")
    print("| config | workers | batch | loader img/s | train-step img/s | end-to-end img/s | loader/step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for path in args.config:
        cfg = load_config(path, args.set)
        dm = ImageFolderDataModule(**cfg["data"])
        dm.setup("fit")
        loader = dm.train_dataloader()
        model_cfg = cfg["model"]
        model = VisionTransformer(build_model_config(
            model_cfg["preset"], dm.num_classes, dm.hparams.image_size, model_cfg.get("model_overrides")))
        precision = str(cfg.get("trainer", {}).get("precision", "32-true"))

        load = loader_rate(loader, args.batches)
        in_memory = list(itertools.islice(iter(loader), 4)) * (args.batches // 4 + 1)
        step = train_step_rate(model, in_memory[: args.batches], precision)
        fed = train_step_rate(model, itertools.islice(iter(loader), args.batches), precision)
        print(f"| {os.path.basename(path)} ({precision}) | {dm.num_workers} | {dm.hparams.batch_size} | "
              f"{load:.0f} | {step:.0f} | {fed:.0f} | {load / step:.2f} |")


if __name__ == "__main__":
    main()
