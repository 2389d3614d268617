"""A Lightning callback that records what a real training run did, so tests check effects
(the batch the loss saw, the LR at each step, the gradient norm after clipping, the metrics
each DDP rank ended with) rather than the flags that asked for them.

Used in-process (`--trainer.callbacks+=tests.training_probe.TrainingProbe`) and from `vit-train`
subprocesses (with the repository on PYTHONPATH); with `out_dir` set, each rank writes what it
saw to `out_dir/rank<N>.json` at the end of every validation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch

from training.callbacks import TimeBudget


def _grad_norm(params: list[torch.Tensor]) -> float:
    grads = [p.grad.detach().flatten() for p in params if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else 0.0


class TrainingProbe(L.Callback):
    def __init__(self, out_dir: str | None = None, keep_batches: int = 1) -> None:
        self.out_dir = out_dir
        self.keep_batches = keep_batches
        self.param_groups: dict[str, dict[str, float]] = {}  # parameter name -> {lr, weight_decay}
        self.step_lrs: list[list[float]] = []  # per training batch: each group's LR at its start
        self.optimizer_lrs: list[list[float]] = []  # per optimizer step: each group's LR as it steps
        self.block0_dtypes: list[str] = []  # dtype of block 0's first MLP layer output per training forward (autocast)
        self.loader_batches: list[torch.Tensor] = []  # images as the loader gave them
        self.model_inputs: list[torch.Tensor] = []  # images as the model saw them in training
        self.loss_calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (logits, targets, loss)
        self.block0_calls_per_step: list[int] = []
        self.grad_norms_before_clip: list[float] = []
        self.grad_norms_at_step: list[float] = []  # what the optimizer stepped with (after clipping)
        self.val_metrics: list[dict[str, float]] = []
        self.batch_labels: list[list[int]] = []  # per training batch: its (hard) labels, in order
        self.batch_sums: list[list[float]] = []  # per training batch: each image's pixel sum (which image)
        self._block0_calls = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        names = {id(p): n for n, p in pl_module.model.named_parameters()}
        optimizer = trainer.optimizers[0]
        for group in optimizer.param_groups:
            for p in group["params"]:
                self.param_groups[names[id(p)]] = {"lr": group["lr"], "weight_decay": group["weight_decay"]}
        pl_module.model.register_forward_pre_hook(self._record_model_input)
        pl_module.train_loss.register_forward_hook(self._record_loss)
        # A pre-hook: torch's non-reentrant checkpoint stops its recomputation early, before
        # a forward (post) hook would run.
        pl_module.model.blocks[0].register_forward_pre_hook(self._count_block0)
        # A Linear's output: bf16 under bf16 autocast (the fp32 residual stream would hide it).
        pl_module.model.blocks[0].mlp.fc1.register_forward_hook(self._record_block0_dtype)

    def _training(self, module: torch.nn.Module) -> bool:
        return module.training and torch.is_grad_enabled()

    def _record_model_input(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if self._training(module) and len(self.model_inputs) < self.keep_batches:
            self.model_inputs.append(args[0].detach().clone())

    def _record_loss(self, module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        if len(self.loss_calls) < self.keep_batches:
            self.loss_calls.append((args[0].detach().clone(), args[1].detach().clone(), output.detach().clone()))

    def _count_block0(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if module.training:
            self._block0_calls += 1

    def _record_block0_dtype(self, module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        if self._training(module) and len(self.block0_dtypes) < 1000:
            self.block0_dtypes.append(str(output.dtype))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._block0_calls = 0
        self.step_lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])
        if len(self.loader_batches) < self.keep_batches:
            self.loader_batches.append(batch[0].detach().clone())
        self.batch_labels.append(batch[1].tolist())
        self.batch_sums.append([round(float(x.double().sum()), 2) for x in batch[0]])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.block0_calls_per_step.append(self._block0_calls)
        # The gradients the optimizer stepped with (clipped); they stay until the next step's zero_grad.
        optimizer = trainer.optimizers[0]
        self.grad_norms_at_step.append(_grad_norm([p for g in optimizer.param_groups for p in g["params"]]))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this hook before it clips (and right before optimizer.step).
        self.optimizer_lrs.append([g["lr"] for g in optimizer.param_groups])
        self.grad_norms_before_clip.append(_grad_norm([p for g in optimizer.param_groups for p in g["params"]]))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.val_metrics.append(metrics)
        self._write(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)  # also for a run that stops mid-epoch (max_steps), before any validation

    def _write(self, trainer: L.Trainer) -> None:
        if self.out_dir:
            path = Path(self.out_dir) / f"rank{trainer.global_rank}.json"
            path.write_text(json.dumps({"rank": trainer.global_rank, "world_size": trainer.world_size,
                                        "val_metrics": self.val_metrics, "step_lrs": self.step_lrs,
                                        "optimizer_lrs": self.optimizer_lrs, "block0_dtypes": self.block0_dtypes,
                                        "batch_labels": self.batch_labels, "batch_sums": self.batch_sums}))


class SkewedTimeBudget(TimeBudget):
    """A TimeBudget whose clock runs `skew_s` ahead on rank 1, as no two machines' clocks (or two
    processes' start times) agree exactly; the ranks must still follow one schedule.

    With `step_s`, the clock is not the wall clock but a step counter: every finished training
    step takes exactly `step_s` seconds, so how many steps fit the budget, and the LR at each, are
    known in advance, however loaded the machine is."""

    def __init__(self, minutes: float, skew_s: float, step_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(minutes, **kwargs)
        self.skew_s = skew_s
        self.step_s = step_s
        self._steps_done = 0
        self._rank = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._rank = trainer.global_rank

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._steps_done += 1
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def time_elapsed(self, stage: str = "train") -> float:
        elapsed = super().time_elapsed(stage) if self.step_s is None else self._steps_done * self.step_s
        return elapsed + (self.skew_s if self._rank == 1 else 0.0)


class KillAtStep(L.Callback):
    """Stands in for a run killed mid-epoch: raises once the global step reaches `step`, after the
    probes (listed before it) have recorded that step and before any end-of-run checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            for cb in trainer.callbacks:
                if isinstance(cb, TrainingProbe):
                    cb._write(trainer)
            raise SystemExit(f"killed at step {self.step}")
