"""Every use of Lightning's private API in this project, in one place.

Each workaround names the upstream issue or the missing public hook, and
`tests/test_lightning_compat.py` checks that what it relies on is still there (and, for a bug,
that the bug still exists, so the workaround goes once it is fixed).
"""

from __future__ import annotations

import csv
import inspect
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


def keep_trainer_counts_integers() -> None:
    """Makes `--trainer.limit_val_batches 1` one batch again wherever the process has been; ViTCLI
    calls it before it builds its parser.

    typing caches unions by equality, under which the same members in another order are equal, so
    `Optional[Union[int, float]]` can come back as an earlier `Union[float, int, None]`, and
    jsonargparse tries a union's members in order: parsed float first, `1` became 1.0, all of the
    validation set instead of one batch. It happens twice over:
    - at import: Lightning's fabric.py makes `Optional[Union[float, int]]`, and trainer.py then
      gets it for its own `Optional[Union[int, float]]` hints unless enough else is imported between
      them to push it out of typing's cache; after `import nncf` (so in any process that quantizes
      first, and in the test suite) it is not;
    - at parser build: jsonargparse wraps those three-member hints in `Optional[...]` again (its
      `is_optional` knows `Optional[X]` only), which returns any equal union made earlier.
    So: int back before float in the Trainer's own hints (every int-or-float one of them counts
    batches or steps when an int: limit_*_batches, val_check_interval, overfit_batches, ...), then
    typing's caches emptied (`typing._cleanups`, its own list of their `cache_clear`; private, there
    in Python 3.11). Not reported upstream yet (no network here); test_lightning_compat.py checks
    both causes still exist."""
    hints = inspect.unwrap(L.Trainer.__init__).__annotations__
    for name, hint in hints.items():
        members = typing.get_args(hint)
        if typing.get_origin(hint) is typing.Union and {int, float} <= set(members) \
                and members.index(float) < members.index(int):
            ordered = [int if m is float else float if m is int else m for m in members]
            hints[name] = typing.Union[tuple(ordered)]  # keyed by the tuple, in order: never a reordered one
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
