"""Only one worker at a time answers "warming up": the others warm up before they take a connection.

BentoML runs a service's workers under one arbiter (circus), all accepting on one listening
socket, and starts a new worker when one dies. A worker takes connections once its service's
`__init__` has returned (BentoML creates the instance in the ASGI lifespan, before uvicorn
serves the socket). So the front decides where to warm up (`warm_in_background`):
    worker 1 while no sibling serves (the first start, or the only worker died): in the
        background, answering 503 (and /readyz 503) meanwhile, so clients and orchestrators
        learn the state at once instead of waiting on a silent socket;
    any other worker, or a replacement beside a serving sibling: inside `__init__`, so the kernel
        hands every connection to the warm workers until this one is ready.
And at the first start worker 2 may get warm before worker 1: from then on worker 1 answers
/readyz 200 and holds its requests until it is warm itself (model_handle.InProcessModel), so once
/readyz has said 200 no request meets a 503 for warming up, at start-up or after a crash.
Each warm worker leaves a marker file named after its pid in a folder its siblings share (named
after their parent, the arbiter); a marker whose process is gone, or has another parent, is stale.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import psutil

from vit_service.serving.bentoml_compat import worker_index


def marker_dir(parent: int | None = None) -> Path:
    """The folder shared by the workers of one `bentoml serve` (children of one arbiter)."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"vit-service-workers-{uid}-{parent or os.getppid()}"


def mark_warm() -> None:
    """Says this worker serves: its siblings' replacements will warm up before taking connections."""
    folder = marker_dir()
    folder.mkdir(mode=0o700, exist_ok=True)
    (folder / str(os.getpid())).touch()


def sibling_serving() -> bool:
    """Whether another worker of this server (same parent process) is warm and alive."""
    folder, me, parent = marker_dir(), os.getpid(), os.getppid()
    if not folder.is_dir():
        return False
    for marker in folder.iterdir():
        if not marker.name.isdigit() or int(marker.name) == me:
            continue
        try:
            alive = psutil.Process(int(marker.name)).ppid() == parent
        except psutil.Error:
            alive = False
        if alive:
            return True
        with contextlib.suppress(OSError):
            marker.unlink()  # a dead worker's
    return False


def warm_in_background() -> bool:
    """Whether this worker should take connections while it warms up (and answer 503)."""
    return worker_index() <= 1 and not sibling_serving()
