"""The production service with its warm-up held until a file exists, for the test that watches
/readyz answer 503 before the model is warm (test_service_modes.py). Test machinery stays here:

    WARMUP_GATE=/tmp/go PYTHONPATH=tests bentoml serve gated_service:ViTClassifier

BentoML imports this module in every worker, so each worker's warm-up waits for the file
(`{worker}` in WARMUP_GATE: one file per worker, e.g. /tmp/go-{worker}; tests/test_faults.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from vit_service.serving import model_handle
from vit_service.serving.service import ViTClassifier  # noqa: F401  (the service to serve)

_warm_up = model_handle.warm_up


def gated_warm_up(*args: Any, **kwargs: Any) -> None:
    from vit_service.serving.bentoml_compat import worker_index

    gate = Path(os.environ["WARMUP_GATE"].format(worker=worker_index()))  # "{worker}": one gate per worker
    while not gate.exists():
        time.sleep(0.05)  # pacing the poll; the file decides when warm-up starts
    _warm_up(*args, **kwargs)


model_handle.warm_up = gated_warm_up
