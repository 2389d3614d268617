"""`vit-explain` as installed: vit_service's command with vit-train run folders first in its list of
model formats (training/run_checkpoints.py). Still without Lightning: a run folder is read with
torch alone."""

from __future__ import annotations

import sys

from training.run_checkpoints import MODEL_FORMATS
from vit_service.explain_cli import main


def entry() -> None:
    sys.exit(main(formats=MODEL_FORMATS))


if __name__ == "__main__":
    entry()
