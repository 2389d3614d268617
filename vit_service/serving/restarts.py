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

The signal between siblings comes from the kernel: a warm worker listens on a Unix socket in
Linux's abstract namespace, named after the arbiter's pid and the worker's index. The name exists
exactly as long as the process does (no file to leave behind, nothing to clean up), and a sibling
asks by connecting to it without waiting (nothing accepts: the name being bound is the answer).
Where there is no abstract namespace (not Linux), no worker sees a sibling: each warms up in the
background, answering 503 meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import socket

from vit_service.serving.bentoml_compat import worker_index

_listening: socket.socket | None = None  # held for the life of this worker


def _name(index: int) -> str:
    return f"\0vit-service-warm-{os.getppid()}-{index}"  # "\0": the abstract namespace


def mark_warm() -> None:
    """Says this worker serves: its siblings' replacements will warm up before taking connections."""
    global _listening
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(_name(worker_index()))
        sock.listen(8)
    except OSError:  # not Linux, or a name still held: siblings then do not see this one
        sock.close()
        return
    _listening = sock


def sibling_serving(workers: int) -> bool:
    """Whether another of this server's `workers` workers is warm and alive."""
    me = worker_index()
    for index in range(1, workers + 1):
        if index == me:
            continue
        with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as sock:
            # Non-blocking: the warm worker never accepts, so each ask stays in its listen backlog,
            # and once that is full a blocking connect waits for an accept that never comes. That
            # froze a cold worker 1 (it asks on every /readyz and while holding requests) for good.
            sock.setblocking(False)
            try:
                sock.connect(_name(index))
            except BlockingIOError:  # EAGAIN: its backlog is full, so the name is bound: it serves
                return True
            except OSError:  # ECONNREFUSED / ENOENT: no such name, the sibling is cold or gone
                continue
            return True
    return False


def warm_in_background(workers: int) -> bool:
    """Whether this worker should take connections while it warms up (and answer 503)."""
    return worker_index() <= 1 and not sibling_serving(workers)
