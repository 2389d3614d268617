"""`vit-data`: write the offline demo dataset, convert the CIFAR-10 download, check a dataset
before training on it, or turn it into LitData streaming shards.

    vit-data demo --out data/demo [--seed 0] [--train-per-class 200] [--val-per-class 50]
    vit-data cifar10 cifar-10-python.tar.gz --out data/cifar10
    vit-data verify data/demo
    vit-data optimize data/demo/train shards/demo/train [--workers 2] [--max-side 256]

`verify` exits 0 when every image decodes, 1 when some do not (or the splits disagree on their
classes, or a class folder is empty), and 2 when the folder is missing or holds no dataset.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from training.cifar10 import CIFAR10_URL, convert_cifar10
from training.demo_data import DEFAULT_TRAIN_PER_CLASS, DEFAULT_VAL_PER_CLASS, generate_demo_dataset
from training.folder_dataset import DatasetError, VerifyReport, verify_dataset


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (DatasetError, OSError) as e:
        # User mistakes (wrong folder, no permission) get one line, not a traceback.
        print(f"vit-data: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vit-data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="write the procedural demo dataset (ImageNet folder layout)")
    demo.add_argument("--out", required=True, help="output folder; gets train/ and val/")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--train-per-class", type=_positive_int, default=DEFAULT_TRAIN_PER_CLASS)
    demo.add_argument("--val-per-class", type=_positive_int, default=DEFAULT_VAL_PER_CLASS)
    demo.set_defaults(func=_demo)

    cifar = sub.add_parser(
        "cifar10", help="CIFAR-10's python-version download -> JPEG class folders train/ and test/",
        description=f"Converts the official CIFAR-10 python-version archive (cifar-10-python.tar.gz from "
                    f"{CIFAR10_URL}) or torchvision's download folder (cifar-10-batches-py/, or the folder "
                    "holding it) into JPEG class folders: the 50,000 training images (data_batch_1..5) go to "
                    "OUT/train/<class>/, the 10,000 test images (test_batch) to OUT/test/<class>/, where "
                    "configs/cifar10*.yaml and the CIFAR-10 benchmarks read them. Nothing is downloaded.")
    cifar.add_argument("archive", metavar="ARCHIVE", help="cifar-10-python.tar.gz or a cifar-10-batches-py/ folder")
    cifar.add_argument("--out", required=True, help="output folder (e.g. data/cifar10); gets train/ and test/")
    cifar.add_argument("--quality", type=_positive_int, default=95, help="JPEG quality (default 95)")
    cifar.set_defaults(func=_cifar10)

    verify = sub.add_parser("verify", help="decode every image and report counts and unreadable files")
    verify.add_argument("dir", help="dataset folder: with train/ val/ test/ splits, or one split")
    verify.add_argument("--workers", type=_positive_int, default=min(4, os.cpu_count() or 1),
                        help="decoding threads")
    verify.set_defaults(func=_verify)

    opt = sub.add_parser("optimize", help="write LitData streaming shards of an ImageNet-style split folder")
    opt.add_argument("src", help="one split: <src>/<class>/<images>")
    opt.add_argument("out", help="output folder or s3:// / gs:// URI (index.json, chunks, classes.json, skipped.tsv)")
    opt.add_argument("--workers", type=_positive_int, default=min(4, os.cpu_count() or 1),
                     help="encoding processes")
    opt.add_argument("--max-side", type=_positive_int, help="downscale so the long side is at most PX pixels")
    opt.add_argument("--chunk-bytes", default="64MB", help="shard (chunk) size, e.g. 64MB")
    opt.set_defaults(func=_optimize)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    print(f"writing the demo dataset to {args.out} (seed {args.seed}):", flush=True)
    summary = generate_demo_dataset(args.out, seed=args.seed, train_per_class=args.train_per_class,
                                    val_per_class=args.val_per_class, progress=lambda line: print(line, flush=True))
    seconds = time.perf_counter() - start
    classes = list(summary["train"])
    print(f"wrote the demo dataset to {args.out} in {seconds:.1f} s (seed {args.seed})")
    print(f"classes ({len(classes)}): {', '.join(classes)}")
    for split, counts in summary.items():
        per_class = next(iter(counts.values()))
        print(f"  {split}: {sum(counts.values())} images ({per_class} per class) in {os.path.join(args.out, split)}")
    return 0


def _cifar10(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    counts = convert_cifar10(args.archive, args.out, quality=args.quality)
    print(f"wrote CIFAR-10 from {args.archive} to {args.out} in {time.perf_counter() - start:.1f} s")
    for split, n in counts.items():
        print(f"  {split}: {n} images in {os.path.join(args.out, split)}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    report = verify_dataset(args.dir, workers=args.workers)
    print(format_report(report))
    return 0 if report.ok else 1


def _optimize(args: argparse.Namespace) -> int:
    from training.shards import SKIPPED_FILE, optimize_folder

    start = time.perf_counter()
    written, skipped = optimize_folder(args.src, args.out, workers=args.workers, max_side=args.max_side,
                                       chunk_bytes=args.chunk_bytes)
    print(f"wrote {written} images from {args.src} to {args.out} in {time.perf_counter() - start:.1f} s")
    if skipped:
        print(f"dropped {len(skipped)} unreadable file(s) (listed in {args.out}/{SKIPPED_FILE}):")
        for path, reason in skipped:
            print(f"  {path}: {reason}")
    return 0


def format_report(report: VerifyReport) -> str:
    """The per-class table (one column per split), then unreadable files and problems."""
    names = [s.name or "images" for s in report.splits]
    classes = sorted({c for s in report.splits for c in s.class_counts})
    width = max([len("class"), len("total")] + [len(c) for c in classes])
    cols = [max(len(n), 7) for n in names]
    lines = [f"dataset: {report.root}", ""]
    lines.append("  ".join([f"{'class':<{width}}"] + [f"{n:>{w}}" for n, w in zip(names, cols)]))
    for c in classes:
        cells = [f"{s.class_counts[c]:>{w}}" if c in s.class_counts else f"{'-':>{w}}"
                 for s, w in zip(report.splits, cols)]
        lines.append("  ".join([f"{c:<{width}}"] + cells))
    lines.append("  ".join([f"{'total':<{width}}"] + [f"{s.num_images:>{w}}" for s, w in zip(report.splits, cols)]))
    lines.append("")
    unreadable = report.unreadable
    if unreadable:
        lines.append(f"{len(unreadable)} unreadable file(s):")
        lines += [f"  {path}: {reason}" for path, reason in unreadable]
    for problem in report.problems:
        lines.append(f"problem: {problem}")
    if report.ok:
        lines.append(f"OK: all {report.num_images} images are readable")
    else:
        lines.append(f"FAILED: {len(unreadable)} unreadable of {report.num_images} images, "
                     f"{len(report.problems)} layout problem(s)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
