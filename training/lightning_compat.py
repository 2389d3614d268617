"""Where this project works around a Lightning bug through a private attribute, in one place.

Each workaround names the upstream issue, and `tests/test_lightning_compat.py` checks that what it
relies on is still there and that the bug still exists (so the workaround goes once it is fixed).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn


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
