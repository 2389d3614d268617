"""LightningModule: the ViT, the DeiT-style recipe (AdamW, warmup + cosine, label smoothing,
Mixup/CutMix, stochastic depth) and top-1/top-5 metrics per split."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, Timer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from training.callbacks.time_budget import TimeBudget
from training.lightning_compat import estimated_stepping_batches
from training.lr_schedule import warmup_cosine
from vit_service.formats.checkpoints import load_weights
from vit_service.formats.sources import CHECKPOINT_CONFIG_KEY, build_model_config, init_from_source
from vit_service.model import VisionTransformer

log = logging.getLogger(__name__)


class ViTClassifier(L.LightningModule):
    def __init__(
        self,
        preset: str = "vit_tiny_patch16_224",
        num_classes: int = 1000,
        image_size: int | None = None,
        model_overrides: dict[str, Any] | None = None,
        init_from: str | None = None,
        init_prefer_ema: bool = False,
        lr: float = 5e-4,
        lr_base_batch_size: int = 512,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 5.0,
        min_lr_ratio: float = 0.01,
        layer_decay: float | None = None,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        compile: bool = False,
        grad_checkpointing: bool = False,
        class_names: list[str] | None = None,
        preprocessing: dict[str, Any] | None = None,
    ) -> None:
        """
        Args:
            preset: a `ViTConfig` preset name (vit_tiny_patch16_224, vit_cifar_patch4_32, ...).
            num_classes: linked from the data module's class folders; never typed by hand.
            image_size: linked from the data module.
            model_overrides: any other ViTConfig field, e.g. {depth: 6, drop_path_rate: 0.1}.
            init_from: weights to start from (timm, torchvision, Lightning or exported artifact,
                any resolution); the head is re-initialised when the class count differs. A timm
                hub name (vit_small_patch16_224.augreg_in21k_ft_in1k, from the Hugging Face cache)
                or a transformers ViT folder also sets the architecture, replacing `preset`.
            lr: peak learning rate for a global batch of `lr_base_batch_size` (scaled linearly).
            warmup_epochs: linear warmup length, then cosine decay to `lr * min_lr_ratio`.
            layer_decay: layer-wise LR decay factor for fine-tuning (e.g. 0.65); None disables.
            mixup_alpha, cutmix_alpha: timm Mixup/CutMix strengths; both 0 disables them.
            class_names, preprocessing: linked from the data module; stored in the checkpoint so
                `vit-export` needs nothing else.
        """
        super().__init__()
        self.save_hyperparameters()
        self.model = VisionTransformer(build_model_config(preset, num_classes, image_size, model_overrides, init_from))
        if not compile:  # Lightning's model summary counts FLOPs on this input (else "Total FLOPs: 0")
            size = self.model.config.image_size
            self.example_input_array = torch.zeros(1, 3, size, size)
        if init_from:
            report = load_weights(self.model, init_from_source(init_from).weights, prefer_ema=init_prefer_ema)
            log.info(f"init_from: {report}")
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)

        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            # timm's Mixup folds label smoothing into its soft targets.
            self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mixup_prob,
                               switch_prob=mixup_switch_prob, label_smoothing=label_smoothing,
                               num_classes=num_classes)
            self.train_loss = SoftTargetCrossEntropy()
        else:
            self.train_loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

        self.train_metrics = _accuracy_metrics(num_classes, "train/")
        self.val_metrics = _accuracy_metrics(num_classes, "val/")
        self.test_metrics = _accuracy_metrics(num_classes, "test/")

    def configure_model(self) -> None:
        if self.hparams.compile:
            self.model.compile()  # in place: parameter names (and checkpoints) stay unchanged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        if split == "train" and self.mixup is not None:
            x, soft_targets = self.mixup(x, y)
            logits = self(x)
            loss = self.train_loss(logits, soft_targets)
        else:
            logits = self(x)
            loss = self.train_loss(logits, y) if split == "train" else F.cross_entropy(logits, y)
        metrics = getattr(self, f"{split}_metrics")
        metrics.update(logits, y)
        on_step = split == "train"
        if split != "train":  # how many images the figures are over (a limited run sees part of the set)
            self.log(f"{split}/images", float(len(y)), on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True,
                     batch_size=len(y))
        self.log(f"{split}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=True, sync_dist=not on_step)
        self.log_dict(metrics, prog_bar=True, on_step=False, on_epoch=True)
        return loss, logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")[0]

    # Logits and targets go to the callbacks' on_*_batch_end (the evaluation report in report.py).
    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return {"logits": self._step(batch, "val")[1].detach(), "targets": batch[1]}

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return {"logits": self._step(batch, "test")[1].detach(), "targets": batch[1]}

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = self(x).softmax(dim=-1)
        scores, indices = probs.topk(min(5, probs.shape[-1]), dim=-1)
        return {"indices": indices, "scores": scores}

    # One training clock: Lightning's Timer (a TimeBudget is one); resumed runs continue its count.
    def configure_callbacks(self) -> list[Callback]:
        return [] if self._timer() else [Timer(verbose=False)]

    def _timer(self) -> Timer | None:
        return next((cb for cb in self.trainer.callbacks if isinstance(cb, Timer)), None)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            # Wall-clock minutes of training (validation included): accuracy-vs-time plots.
            self.log("time/elapsed_min", self._timer().time_elapsed() / 60, rank_zero_only=True)

    def on_train_epoch_end(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "num_skipped_files"):
            self.log("data/skipped_files", float(dm.num_skipped_files()), rank_zero_only=True)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        global_batch = self._global_batch_size()
        lr = hp.lr * global_batch / hp.lr_base_batch_size
        no_wd = self.model.no_weight_decay()
        # Keyword arguments: timm's positional order differs between these two helpers and releases.
        if hp.layer_decay:
            groups = param_groups_layer_decay(self.model, weight_decay=hp.weight_decay, no_weight_decay_list=no_wd,
                                              layer_decay=hp.layer_decay)
        else:  # AdamW with no weight decay on norms, biases, pos_embed and cls_token
            groups = param_groups_weight_decay(self.model, weight_decay=hp.weight_decay, no_weight_decay_list=no_wd)
        for g in groups:
            g["lr"] = lr * g.pop("lr_scale", 1.0)
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(hp.betas))

        # Not trainer.estimated_stepping_batches itself: asked here, it loses a resumed run's loader
        # position (Lightning #20550); the wrapper keeps it.
        total_steps = max(1, int(estimated_stepping_batches(self.trainer)))
        steps_per_epoch = total_steps / max(1, self.trainer.max_epochs or 1)
        warmup_steps = min(int(hp.warmup_epochs * steps_per_epoch), total_steps - 1)
        # LambdaLR rather than timm's schedulers: Lightning steps it per optimizer step natively.
        # Warmup from 1/(warmup_steps + 1) so the first step already moves. With a TimeBudget the
        # same schedule runs on the budget's clock instead (training/lr_schedule.py).
        budget = self._budget()

        def factor(step: int) -> float:
            if budget is not None:  # the share of the budget spent when the budget stepped the schedule
                return budget.lr_factor(budget.progress())
            return warmup_cosine(step, warmup_steps, total_steps, hp.min_lr_ratio, start=1 / (warmup_steps + 1))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        log.info(f"optimizer: AdamW, global batch {global_batch}, peak lr {lr:.3g}, "
                 f"{warmup_steps} warmup / {total_steps} total steps")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        # A TimeBudget steps the schedule itself, at each batch start, once it has read its clock.
        if self._budget() is None:
            super().lr_scheduler_step(scheduler, metric)

    def _budget(self) -> TimeBudget | None:
        timer = self._timer()
        return timer if isinstance(timer, TimeBudget) else None

    def _global_batch_size(self) -> int:
        # The per-device batch where Lightning's batch-size finder looks for it: a `batch_size`
        # attribute or hyper-parameter of this module or of the data module (ours: --data.batch_size).
        if lightning_hasattr(self, "batch_size"):
            per_device = lightning_getattr(self, "batch_size")
        else:  # loaders handed straight to trainer.fit: nothing says their batch size this early
            rank_zero_warn("no `batch_size` on the module or its data module: the LR is scaled for a per-device "
                           "batch of 1 (lr x global batch / lr_base_batch_size); set the module's `batch_size` "
                           "to the training loader's")
            per_device = 1
        return int(per_device) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    # The architecture, training time and last validation scores travel in the checkpoint.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The resolved architecture (as nanoGPT's `model_args`): readers rebuild the model from it,
        # never from `preset`, which an `init_from` hub model or folder overrides.
        checkpoint[CHECKPOINT_CONFIG_KEY] = self.model.config.to_dict()
        metrics = self.trainer.callback_metrics
        timer = self._timer()
        checkpoint["vit_service"] = {
            "train_time_s": round(timer.time_elapsed(), 1) if timer else None,
            "epoch": self.current_epoch,
            "global_step": self.global_step,
            "val_images_total": dataset_size(self.trainer.val_dataloaders),
            **{k.replace("/", "_"): float(v) for k, v in metrics.items() if k.startswith("val/")},
        }


def dataset_size(loader: Any) -> int | None:
    """Images in a loader's whole dataset (None where it has no length)."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def _accuracy_metrics(num_classes: int, prefix: str) -> MetricCollection:
    # acc1/acc5: the share of images whose label is in the top 1/5 (micro), as timm, torchvision's
    # references and papers report them; torchmetrics' default ("macro") is the mean per-class
    # recall, which differs on imbalanced or partly evaluated sets: kept as balanced_acc1.
    return MetricCollection(
        {"acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
         "acc5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
         "balanced_acc1": MulticlassAccuracy(num_classes, top_k=1, average="macro")},
        prefix=prefix,
    )

