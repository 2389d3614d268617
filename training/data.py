"""LightningDataModule for ImageNet-style folders (train/<class>/*.jpg, val/<class>/*.jpg) or LitData
shards written by `vit-data optimize` (a local folder or an s3:// / gs:// URI), with the same
transforms and class-list checks for both."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from timm.data import create_transform
from litdata import StreamingDataLoader
from torch.utils.data import DataLoader, Dataset, Subset

from training.folder_dataset import DatasetError, ImageFolderDataset, find_classes
from training.memory_data import BatchAugment, DecodedImages
from training.predict import PredictFolderDataset
from training.shards import ShardDataset, check_same_classes, is_shard_dir, shard_class_names
from vit_service.host import host_cores
from vit_service.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing


class ImageFolderDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_dir: str,
        val_dir: str | None = None,
        test_dir: str | None = None,
        predict_dir: str | None = None,
        val_fraction: float = 0.1,
        image_size: int = 224,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        batch_size: int = 64,
        num_workers: int | None = None,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float | None = 0.4,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        pin_memory: bool = True,
        in_memory: bool = False,
        seed: int = 42,
    ) -> None:
        """
        Args:
            train_dir: folder of class folders; its sorted folder names are the classes. Or LitData
                shards from `vit-data optimize` (local folder, s3:// or gs:// URI), streamed.
            val_dir: same layout (folder or shards) and classes; when absent, `val_fraction` of a
                train folder is held out.
            test_dir: optional class folders for `vit-train test`.
            predict_dir: images (any layout, no labels) for `vit-train predict`.
            image_size, crop_pct, interpolation, mean, std: the eval preprocessing, exported
                with the model so serving uses exactly the same.
            batch_size: per device; the learning rate scales with the global batch.
            num_workers: data-loading processes; default all available cores.
            scale, ratio, hflip, color_jitter, auto_augment, re_prob: timm's training transform
                (RandomResizedCrop, RandAugment string such as "rand-m9-mstd0.5-inc1", random erasing).
            in_memory: decode the training images once into memory (uint8, image_size px square)
                and crop/flip/normalise/erase whole batches on the training device
                (training/memory_data.py): for datasets that fit in RAM, such as CIFAR-10
                (150 MB), where the per-image pipeline costs more than the training step. Folders
                only; no color_jitter or auto_augment.
        """
        super().__init__()
        self.save_hyperparameters()
        self.class_names: list[str] = (shard_class_names(train_dir) if is_shard_dir(train_dir)
                                       else find_classes(train_dir))
        self.num_classes = len(self.class_names)
        self.preprocessing = Preprocessing(image_size, crop_pct, interpolation, tuple(mean), tuple(std))
        self.preprocessing_config: dict[str, Any] = self.preprocessing.to_dict()
        self.num_workers = host_cores() if num_workers is None else num_workers
        self.datasets: dict[str, Dataset] = {}

    def train_transform(self) -> Any:
        hp = self.hparams
        return create_transform(
            input_size=hp.image_size, is_training=True, scale=tuple(hp.scale), ratio=tuple(hp.ratio),
            hflip=hp.hflip, color_jitter=hp.color_jitter, auto_augment=hp.auto_augment,
            interpolation=hp.interpolation, mean=tuple(hp.mean), std=tuple(hp.std), re_prob=hp.re_prob,
        )

    def _eval_dataset(self, root: str) -> Dataset:
        # Decoded exactly as the service decodes uploads (same JPEG draft size, same transform).
        if is_shard_dir(root):
            check_same_classes(root, shard_class_names(root), self.class_names)
            return ShardDataset(root, self.preprocessing, shuffle=False, draft_size=self.preprocessing.resize_size)
        return ImageFolderDataset(root, self.preprocessing, self.class_names,
                                  draft_size=self.preprocessing.resize_size)

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage == "fit" and "train" not in self.datasets:
            if is_shard_dir(hp.train_dir):
                if not hp.val_dir:
                    raise DatasetError(f"{hp.train_dir}: shards need --data.val_dir (holding out "
                                       "--data.val_fraction works on folders only)")
                train = ShardDataset(hp.train_dir, self.train_transform(), shuffle=True, seed=hp.seed)
            else:
                if hp.in_memory and (hp.color_jitter or hp.auto_augment):
                    raise DatasetError("--data.in_memory augments whole batches (crop, flip, erasing): set "
                                       "--data.color_jitter null and --data.auto_augment null, or in_memory false")
                train = ImageFolderDataset(hp.train_dir, self.train_transform(), self.class_names)
            if hp.val_dir:
                # Scanning with train's class list also checks that val's classes agree.
                self.datasets["val"] = self._eval_dataset(hp.val_dir)
            else:
                val_full = self._eval_dataset(hp.train_dir)
                order = torch.randperm(len(train), generator=torch.Generator().manual_seed(hp.seed)).tolist()
                n_val = max(1, int(len(order) * hp.val_fraction))
                if n_val >= len(order):
                    raise DatasetError(f"{hp.train_dir}: too few images to hold out a validation split")
                train = Subset(train, order[n_val:])
                self.datasets["val"] = Subset(val_full, order[:n_val])
            if hp.in_memory:
                if isinstance(train, ShardDataset):
                    raise DatasetError(f"{hp.train_dir}: --data.in_memory reads image folders, not shards")
                folder = train.dataset if isinstance(train, Subset) else train
                samples = ([folder.samples[i] for i in train.indices] if isinstance(train, Subset)
                           else folder.samples)
                train = DecodedImages(samples, hp.image_size, hp.interpolation, root=hp.train_dir)
                self.batch_augment = BatchAugment(hp.image_size, hp.scale, hp.ratio, hp.hflip, hp.mean,
                                                  hp.std, hp.re_prob)
            self.datasets["train"] = train
        if stage == "validate" and "val" not in self.datasets:
            self.setup("fit")
        if stage == "test" and "test" not in self.datasets:
            if not hp.test_dir:
                raise DatasetError("`vit-train test` needs --data.test_dir")
            self.datasets["test"] = self._eval_dataset(hp.test_dir)
        if stage == "predict" and "predict" not in self.datasets:
            folder = hp.predict_dir or hp.test_dir or hp.val_dir
            if not folder:
                raise DatasetError("`vit-train predict` needs --data.predict_dir (a folder of images)")
            # Unlabeled images at any depth; an unreadable one becomes a row naming it, not a skip.
            self.datasets["predict"] = PredictFolderDataset(folder, self.preprocessing)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if isinstance(self.datasets[split], ShardDataset):
            # LitData's loader: shards split across ranks and workers, and a state_dict that
            # Lightning saves in checkpoints, so a resumed run continues mid-epoch.
            return StreamingDataLoader(
                self.datasets[split], batch_size=self.hparams.batch_size, num_workers=self.num_workers,
                pin_memory=self.hparams.pin_memory and torch.cuda.is_available(), drop_last=shuffle,
            )
        if isinstance(self.datasets[split], DecodedImages):
            # Indexing a tensor in memory: worker processes would only add copying between them.
            return DataLoader(self.datasets[split], batch_size=self.hparams.batch_size, shuffle=shuffle,
                              num_workers=0, drop_last=shuffle)
        return DataLoader(
            self.datasets[split], batch_size=self.hparams.batch_size, shuffle=shuffle,
            num_workers=self.num_workers, pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0, drop_last=shuffle,  # Mixup needs even, full batches
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Only loader batches (images, labels): Lightning's model summary also passes the module's
        # example_input_array (one float tensor) through this hook at the start of fit.
        if (self.trainer is not None and self.trainer.training and isinstance(self.datasets.get("train"), DecodedImages)
                and isinstance(batch, (list, tuple)) and len(batch) == 2):
            images, labels = batch  # (B, 3, S, S) uint8 on the training device
            batch = [self.batch_augment.to(images.device)(images), labels]
        return batch

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)

    def num_skipped_files(self) -> int:
        """Unreadable files skipped so far (counted across loader worker processes)."""
        total = 0
        for ds in self.datasets.values():
            ds = ds.dataset if isinstance(ds, Subset) else ds
            total += getattr(ds, "num_skipped", 0)
        return total
