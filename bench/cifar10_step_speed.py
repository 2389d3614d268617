"""Train-step throughput (img/s) of CIFAR-sized ViT variants, measured side by side.

Accuracy per epoch does not depend on the machine; img/s does. This script ranks candidate
architectures / batch sizes / precisions by the rate of forward + backward + AdamW on in-memory
batches (random pixels: the rate does not depend on content), interleaving the variants round by
round so a shared machine's load hits them all alike. Report the median of the rounds.

On a busy machine wall-clock rates mostly measure the neighbours; `--clock cpu` (with
`--threads 1`) times the CPU the step itself used (time.thread_time of the one computing thread),
which other processes barely change: use it to rank variants, then scale a quiet wall-clock
anchor (250 img/s for the cifar10.yaml model at 2 threads) by the ratios.

    python bench/cifar10_step_speed.py --threads 2 --rounds 5 \
        --variant 'base={embed_dim: 128, depth: 6, num_heads: 2, mlp_ratio: 2.0}' \
        --variant 'narrow={embed_dim: 96, depth: 6, num_heads: 2, mlp_ratio: 2.0}' \
        --variant 'base@24={embed_dim: 128, depth: 6, num_heads: 2, mlp_ratio: 2.0, image_size: 24}'

A variant is NAME=YAML of ViTConfig overrides on `vit_cifar_patch4_32`, plus optional keys
`batch_size` and `precision` (32 or bf16) and `image_size` (the input side; the pos-embed is
built for 32 px and resampled, as in progressive resizing).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import yaml

from vit_service.host import host_line
from vit_service.model import ViTConfig, VisionTransformer, count_parameters


def build(spec: dict) -> tuple[VisionTransformer, int, str, int]:
    spec = dict(spec)
    batch = int(spec.pop("batch_size", 256))
    precision = str(spec.pop("precision", "32"))
    side = int(spec.pop("image_size", 32))
    spec.setdefault("global_pool", "avg")
    model = VisionTransformer(ViTConfig.from_preset("vit_cifar_patch4_32", **spec))
    return model, batch, precision, side


def rate(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: int, precision: str, side: int,
         steps: int, clock=time.perf_counter) -> float:
    x = torch.randn(batch, 3, side, side)
    y = torch.randint(0, 10, (batch,))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    start = clock()
    for _ in range(steps):
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch / (clock() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", required=True, help="NAME=YAML overrides")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=4.0, help="approximate time per variant per round")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: time.thread_time of the computing thread (needs --threads 1)")
    args = p.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu needs --threads 1 (thread_time sees only the main thread)")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    variants = []
    for item in args.variant:
        name, spec = item.split("=", 1)
        model, batch, precision, side = build(yaml.safe_load(spec) or {})
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        first = rate(model, opt, batch, precision, side, 2, clock)  # warm-up; also sizes the rounds
        steps = max(2, round(args.seconds * first / batch))
        variants.append((name, model, opt, batch, precision, side, steps, []))

    for _ in range(args.rounds):
        for name, model, opt, batch, precision, side, steps, samples in variants:
            samples.append(rate(model, opt, batch, precision, side, steps, clock))

    print(host_line())
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds, {args.clock} clock")
    print("| variant | params | batch | precision | input | median img/s | min-max |")
    print("|---|---:|---:|---|---:|---:|---|")
    for name, model, _, batch, precision, side, _, samples in variants:
        print(f"| {name} | {count_parameters(model) / 1e6:.2f}M | {batch} | {precision} | {side} | "
              f"{statistics.median(samples):.0f} | {min(samples):.0f}-{max(samples):.0f} |")


if __name__ == "__main__":
    main()
