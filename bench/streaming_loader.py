"""CIFAR-10 train loader throughput from JPEG folders vs LitData shards, and the size on disk.

    vit-data cifar10 cifar-10-python.tar.gz --out data/cifar10   # once: the JPEG class folders
    python bench/streaming_loader.py [--data data/cifar10] [--work /tmp/cifar10-shards]
        [--workers 2] [--batches 60] [--repeats 2]

`--data` (default: $VIT_CIFAR10_DIR, else data/cifar10) holds CIFAR-10's train/ and test/ class
folders as `vit-data cifar10` writes them from the python-version archive of
https://www.cs.toronto.edu/~kriz/cifar.html. Writes shards of the train split with `vit-data
optimize`'s code (once, timed, under --work), then times configs/cifar10.yaml's train DataLoader (decode + the training
transform, batch 256, `--workers` loader processes) over the folder and over the shards, in
alternating repeats, and prints a Markdown table; then the datasets alone in one process.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

from data_loading import load_config, loader_rate  # bench/ is sys.path[0] when run as a script
from litdata import StreamingDataset

from training.data import ImageFolderDataModule
from training.folder_dataset import ImageFolderDataset
from training.shards import ShardDataset, optimize_folder
from vit_service.host import host_line

REPO = Path(__file__).resolve().parents[1]


def du_bytes(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())  # allocated, as du


def _items_per_s(dataset: object, shuffled: bool, n: int = 3000) -> float:
    if shuffled:  # a map-style dataset read in a random order, as a shuffling sampler does
        order = random.Random(0).sample(range(len(dataset)), n)
        start = time.perf_counter()
        for i in order:
            dataset[i]
    else:  # an iterable (streaming) dataset that shuffles itself
        it = iter(dataset)
        next(it)
        start = time.perf_counter()
        for _ in range(n):
            next(it)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("VIT_CIFAR10_DIR", "data/cifar10"),
                   help="CIFAR-10 train/ and test/ class folders (default: $VIT_CIFAR10_DIR, else data/cifar10)")
    p.add_argument("--work", default="/tmp/cifar10-shards", help="where the shards are written (once)")
    p.add_argument("--workers", type=int, default=2, help="loader processes (and optimize workers)")
    p.add_argument("--batches", type=int, default=60, help="batches timed per measurement")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    work = Path(args.work)
    folder, shards = Path(args.data) / "train", work / "shards" / "train"
    if not folder.is_dir():
        sys.exit(f"{folder}: no such folder; write it with `vit-data cifar10 cifar-10-python.tar.gz --out "
                 f"{args.data}` (or pass --data / set VIT_CIFAR10_DIR)")
    optimize_s = None
    if not (shards / "index.json").is_file():
        start = time.perf_counter()
        optimize_folder(str(folder), str(shards), workers=args.workers)
        optimize_s = time.perf_counter() - start

    cfg = load_config(str(REPO / "configs/cifar10.yaml"), [])
    data = {**cfg["data"], "num_workers": args.workers, "val_dir": str(Path(args.data) / "test"), "test_dir": None}
    rates: dict[str, list[float]] = {"folder": [], "shards": []}
    for _ in range(args.repeats):
        for name, train_dir in (("folder", folder), ("shards", shards)):
            dm = ImageFolderDataModule(**{**data, "train_dir": str(train_dir)})
            dm.setup("fit")
            rates[name].append(loader_rate(dm.train_dataloader(), args.batches))

    # The same decode without the loader (one process, no training transform): where the time goes.
    per_item = {"folder": _items_per_s(ImageFolderDataset(str(folder)), shuffled=True),
                "shards": _items_per_s(ShardDataset(str(shards), None, shuffle=True), shuffled=False),
                "shards, not decoded": _items_per_s(StreamingDataset(str(shards), shuffle=True), shuffled=False)}

    n_files = sum(1 for _ in folder.rglob("*.jpg"))
    sizes = {"folder": du_bytes(folder), "shards": du_bytes(shards)}
    n_chunks = len(list(shards.glob("chunk-*.bin")))
    print(host_line())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
          f"({len(os.sched_getaffinity(0))} usable), load average {os.getloadavg()[0]:.1f}; "
          f"{args.workers} loader workers, batch {data['batch_size']}, {args.batches} batches x {args.repeats}")
    if optimize_s is not None:
        print(f"vit-data optimize: {n_files} images in {optimize_s:.1f} s ({n_files / optimize_s:.0f} img/s)")
    print("\n| source | train loader img/s (median) | all runs | on disk | files |\n|---|---:|---|---:|---:|")
    for name in ("folder", "shards"):
        runs = sorted(rates[name])
        files = n_files if name == "folder" else f"{n_chunks} chunks"
        print(f"| {name} | {runs[len(runs) // 2]:.0f} | {', '.join(f'{r:.0f}' for r in rates[name])} "
              f"| {sizes[name] / 2**20:.1f} MiB | {files} |")
    print("\n| dataset alone, 1 process | items/s |\n|---|---:|")
    for name, rate in per_item.items():
        print(f"| {name} | {rate:.0f} |")
    du = subprocess.run(["du", "-sh", str(folder), str(shards)], capture_output=True, text=True).stdout
    print("\n" + du.strip())


if __name__ == "__main__":
    main()
