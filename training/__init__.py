"""Training side of the project (Lightning): module, data, callbacks and the vit-* commands.

Progress messages go through Python logging (`logging.getLogger(__name__)` in each module), to
stdout, once per run: the handler below drops records from every process but global rank zero,
so a DDP run prints each line once, not once per process (Lightning's own `rank_zero_only.rank`,
which its strategies set). Silence them with `logging.getLogger("training").setLevel("WARNING")`.
"""

from __future__ import annotations

import logging
import sys


class _RankZeroStdout(logging.StreamHandler):
    """Writes to the current sys.stdout (as print does), on global rank zero only."""

    def emit(self, record: logging.LogRecord) -> None:
        from lightning_utilities.core.rank_zero import rank_zero_only

        if getattr(rank_zero_only, "rank", 0) == 0:
            self.stream = sys.stdout
            super().emit(record)


_log = logging.getLogger(__name__)
if not _log.handlers:
    _log.addHandler(_RankZeroStdout(sys.stdout))
    _log.setLevel(logging.INFO)
    _log.propagate = False
