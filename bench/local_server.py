"""Runs `bentoml serve` as a child process on a free loopback port (tests, benchmarks, scripts)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TARGET = "vit_service.serving.service:ViTClassifier"


def server_processes(url: str, service: str | None = None) -> tuple[Any, list[Any]]:
    """(the `bentoml serve` process listening at `url`, its worker processes): psutil.Process
    objects, found through the process tree. `service` ("vit_classifier", "vit_model") keeps only
    that service's workers. For the fault tests and benchmarks, which kill a worker."""
    import psutil

    port = str(urlparse(url).port)
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        # BentoML's arbiter renames itself "circusd" when setproctitle is installed (mutmut
        # brings it), so it is also found by the socket it listens on.
        if ("serve" in cmd and "--port" in cmd and cmd[cmd.index("--port") + 1:][:1] == [port]) or (
                cmd[:1] == ["circusd"] and _listens_on(proc, int(port))):
            workers = []
            for child in proc.children():
                with contextlib.suppress(psutil.Error):
                    args = child.cmdline()
                    if "_bentoml_impl.worker.service" in args and (service is None or service in args):
                        workers.append(child)
            return proc, workers
    raise LookupError(f"no `bentoml serve ... --port {port}` process found")


def _listens_on(proc: Any, port: int) -> bool:
    import psutil

    with contextlib.suppress(psutil.Error):
        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in proc.net_connections("tcp"))
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_server(log_path: Path, env: dict[str, str] | None = None, target: str = DEFAULT_TARGET,
                 ready_timeout: float = 180, cwd: Path = REPO, ready_path: str = "/readyz") -> Iterator[str]:
    """`bentoml serve target` on 127.0.0.1:<free port>; yields its URL once `ready_path` answers
    200 (/readyz: the model is warm; /livez: the server is up).

    The server runs in its own process group, which is always terminated afterwards.
    """
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "bentoml"), "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    with server_process(cmd, port, log_path, {"BENTOML_DO_NOT_TRACK": "true", **(env or {})}, ready_timeout, cwd,
                        ready_path, name="bentoml serve") as url:
        yield url


@contextlib.contextmanager
def server_process(cmd: list[str], port: int, log_path: Path, env: dict[str, str], ready_timeout: float,
                   cwd: Path = REPO, ready_path: str = "/readyz", name: str = "the server") -> Iterator[str]:
    """Runs `cmd` (a server listening on 127.0.0.1:`port`) in its own process group, logging to
    `log_path`; yields its URL once `ready_path` answers 200, and always terminates the group."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + ready_timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}{ready_path}", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not ready in {ready_timeout} s:\n{log_path.read_text()[-4000:]}")
                time.sleep(0.25)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
