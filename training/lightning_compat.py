"""Every use of Lightning's private API in this project, in one place.

Each workaround names the upstream issue or the missing public hook, and
`tests/test_lightning_compat.py` checks that what it relies on is still there (and, for a bug,
that the bug still exists, so the workaround goes once it is fixed).
"""

from __future__ import annotations

import csv
import typing
import warnings

import lightning as L
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.trainer.states import TrainerFn

# The type of Trainer(precision=...): private in Lightning, and what jsonargparse reads to parse
# --trainer.precision, so a Trainer subclass that widens it must name the same type.
PrecisionInput = _PRECISION_INPUT


def forget_reordered_unions() -> None:
    """Empties typing's caches of subscripted types; LightningCLI calls it before it builds its parser.

    jsonargparse wraps a hint that already allows None in `Optional[...]` once more when it has more
    than two members (its `is_optional` knows `Optional[X]` only), and typing caches unions by
    equality, under which the same members in another order are equal: Lightning's
    `limit_val_batches: Optional[Union[int, float]]` came back as an earlier `Union[float, int, None]`,
    parsed float first, so `--trainer.limit_val_batches 1` ran 1.0, all of the validation set. This
    happened in a process that had made such a union before (tests running `vit-train` in-process);
    a fresh `vit-train` process never has one. Not yet reported upstream (no network here);
    test_lightning_compat.py fails once jsonargparse stops adding the second Optional.
    `typing._cleanups` is typing's own list of its caches' `cache_clear` (private; there in Python 3.11)."""
    for clear in getattr(typing, "_cleanups", ()):
        clear()


LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def hide_lightning_pytree_warning() -> None:
    """torch 2.14 deprecated `torch.utils._pytree.LeafSpec`, and Lightning still builds one
    (`lightning/pytorch/utilities/_pytree.py`), so every vit-train run printed a FutureWarning that
    is neither ours nor the user's. Filtered by its exact text and category, nothing else; the
    test fails once Lightning stops using LeafSpec, and then this goes."""
    warnings.filterwarnings("ignore", message=LEAFSPEC_WARNING, category=FutureWarning)


def estimated_stepping_batches(trainer: L.Trainer) -> int | float:
    """`trainer.estimated_stepping_batches`, without losing a resumed run's loader position.

    To count the batches, Lightning builds the train loader and starts iterating it (one batch is
    prefetched). Called from `configure_optimizers`, that happens before the checkpoint's loader
    state (LitData's position within the epoch) is restored, and the fit loop then keeps that
    loader and drops the restored state: `vit-train fit --ckpt_path last` ran the right number of
    steps but replayed the epoch from its start (Lightning issue #20550, open in 2.6). Dropping the
    counting loader when resuming makes the fit loop build it again after the restore and load the
    state into it, as it does when nothing asks for the count early. Fresh runs keep the loader.
    """
    total = trainer.estimated_stepping_batches
    if trainer.ckpt_path is not None and trainer.state.fn == TrainerFn.FITTING:
        # Private: FitLoop.setup_data() returns early while this is set; None makes it rebuild the
        # loader and apply `_combined_loader_states_to_load` (set by restore_training_state()).
        trainer.fit_loop._combined_loader = None
    return total


class _AppendingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing metrics.csv; a resumed run appends to it instead.
    Private: `_check_log_dir_exists` (it warns and the writer then removes the file), `_fs`,
    `metrics_keys` (the header the writer keeps); Lightning has no append option."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if self._fs.isfile(self.metrics_file_path):  # the resumed run's columns come first
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])

    def _check_log_dir_exists(self) -> None:
        pass


class ResumableCSVLogger(CSVLogger):
    """CSVLogger that keeps the metrics of the run it resumes (same version folder). Private:
    `rank_zero_experiment`, `_experiment`, `_fs`, as Lightning's own `experiment` property uses them."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
