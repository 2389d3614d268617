"""Model updates without a dropped request (serving/model_updates.py), through a real `bentoml serve`
with two workers under load: a new version in the store takes over in every worker with no request
lost, deleting it goes back, and a version that fails its checks is refused while the old serves."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from service_fixtures import BIN, REPO, bentoml_server, encode, picture, poll, save_tiny_model

JPEG = encode(picture(11), "JPEG")


class Load:
    """Clients posting /classify back to back; every answer's status and model version kept."""

    def __init__(self, url: str, clients: int) -> None:
        self.url, self.answers, self._stop = url, [], threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set():
                try:
                    r = client.post("/classify", files={"image": ("a.jpg", JPEG, "image/jpeg")})
                    self.answers.append((r.status_code, r.headers.get("x-model-version")))
                except httpx.HTTPError as e:
                    self.answers.append((0, repr(e)))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)

    def versions_since(self, start: int) -> set[str | None]:
        return {v for _, v in self.answers[start:]}


def bentoml_cli(home: Path, *args: str) -> None:
    out = subprocess.run([str(BIN / "bentoml"), *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", "PATH": str(BIN)})
    assert out.returncode == 0, out.stderr[-2000:]


def test_a_new_version_moves_every_worker_without_a_dropped_request(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("updates_home")
    first = save_tiny_model(home)
    log = tmp_path_factory.mktemp("updates") / "serve.log"
    env = {"VIT_WORKERS": "2", "VIT_MODEL_WATCH_S": "1", "VIT_PRECISION": "fp32"}
    with bentoml_server(home, log, env=env) as url, Load(url, clients=4) as load:
        poll(lambda: len(load.answers), until=lambda n: n >= 20, attempts=600)
        assert load.versions_since(0) == {first}

        second = save_tiny_model(home)  # a new version of vit-classifier: latest moves
        mark = len(load.answers)
        # every worker serves it: the last 30 answers all name it (both workers answer under load)
        poll(lambda: load.versions_since(max(mark, len(load.answers) - 30)), until=lambda v: v == {second},
             attempts=1200)
        info = httpx.get(f"{url}/model_info", timeout=30).json()
        assert info["model_tag"] == second and info["updates"]["last"]["outcome"] == "moved"

        bentoml_cli(home, "models", "delete", "-y", second)  # going back is one call
        mark = len(load.answers)
        poll(lambda: load.versions_since(max(mark, len(load.answers) - 30)), until=lambda v: v == {first},
             attempts=1200)

        # A version whose weights are spoilt, made in another store and imported whole, so the
        # watcher can never see it half-written (it would load the good file and move).
        other = tmp_path_factory.mktemp("broken_home")
        broken = save_tiny_model(other)
        (other / "models" / "vit-classifier" / broken.split(":")[1] / "model.safetensors").write_bytes(b"spoilt")
        archive = other / "broken.bentomodel"
        bentoml_cli(other, "models", "export", broken, str(archive))
        bentoml_cli(home, "models", "import", str(archive))
        refused = poll(lambda: httpx.get(f"{url}/model_info", timeout=30).json()["updates"]["last"] or {},
                       until=lambda last: last.get("outcome") == "refused", attempts=1200)
        assert refused["tag"] == broken and "unreadable weights" in refused["reason"], refused
        mark = len(load.answers)
        poll(lambda: len(load.answers), until=lambda n: n >= mark + 20, attempts=600)
        assert load.versions_since(mark) == {first}  # the old one kept serving
    failed = [a for a in load.answers if a[0] != 200]
    assert failed == [] and len(load.answers) > 60, (failed[:5], len(load.answers))
    text = log.read_text()
    assert "refused" in text and "Traceback" not in text.split("refused")[0]
    metrics_moved = text.count("model update: vit-classifier:")
    assert metrics_moved >= 4  # loading and serving lines, in both workers
