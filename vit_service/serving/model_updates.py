"""Model updates without a dropped request: each worker follows `NAME:latest` in the model store.

With `VIT_MODEL_TAG` ending in `:latest` (the default) every worker looks at the store every
`VIT_MODEL_WATCH_S` seconds. A new version is loaded and warmed up beside the one that serves,
must pass the start-up checks (`check_servable`: manifest, weights, int8 guard) and a smoke
prediction, and only then takes requests: the swap is one assignment, and requests already in the
old version's batcher finish there. A version that fails is refused with its reason (log,
`vit_model_updates_total{outcome="refused"}`, /model_info "updates") and the old one keeps
serving; it is not tried again until another version appears. Going back is one call: delete the
new version (`bentoml models delete NAME:VERSION`), and `latest` is the previous one again.
No route changes the model, so there is no admin action to protect.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any

from vit_service.serving import metrics

logger = logging.getLogger("bentoml.vit_service")


class ModelWatcher:
    """Moves `service.model` to each new version of `name:latest` that passes its checks."""

    def __init__(self, service: Any, settings: Any, every_s: float) -> None:
        self.service = service
        self.settings = settings
        self.every_s = every_s
        self.name = str(service.model.tag).split(":")[0]
        self.refused: dict[str, str] = {}  # version -> reason, not tried again
        self.last: dict[str, Any] = {}  # the last move or refusal, for /model_info
        self._stop = threading.Event()
        self._last_problem = ""  # said once, not at every look
        self._thread = threading.Thread(target=self._run, name="model-watch", daemon=True)

    def start(self) -> ModelWatcher:
        self._thread.start()
        return self

    def status(self) -> dict[str, Any]:
        return {"following": f"{self.name}:latest", "every_s": self.every_s, "serving": str(self.service.model.tag),
                "last": self.last or None, "refused": self.refused}

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.check_once()
                self._last_problem = ""
            except Exception as e:  # e.g. no version left in the store: keep serving, look again next time
                problem = f"{type(e).__name__}: {e}"
                if problem != self._last_problem:
                    logger.warning("looking for a new version of %s failed (still serving %s): %s", self.name,
                                   self.service.model.tag, problem)
                self._last_problem = problem

    def check_once(self) -> None:
        import bentoml

        from vit_service.backends import check_servable
        from vit_service.serving.model_handle import InProcessModel

        latest = bentoml.models.get(f"{self.name}:latest")
        tag = str(latest.tag)
        if tag == str(self.service.model.tag) or latest.tag.version in self.refused:
            return
        logger.info("model update: loading %s beside %s", tag, self.service.model.tag)
        start = time.perf_counter()
        backend, precision = self.move_backend(Path(latest.path))
        settings = dataclasses.replace(self.settings, backend=backend, precision=precision)
        try:
            check_servable(latest.path, settings.backend, settings.precision)
            candidate = InProcessModel(settings, latest.path, latest.tag, replacement=True)
        except Exception as e:  # any reason a version cannot serve is a refusal, never an outage
            reason = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
            self.refused[latest.tag.version] = reason
            self.last = {"outcome": "refused", "tag": tag, "reason": reason, "at": time.time()}
            metrics.model_updates_total.labels(outcome="refused").inc()
            logger.error("model update: %s refused, %s keeps serving: %s", tag, self.service.model.tag, reason)
            return
        old, self.service.model = self.service.model, candidate
        self.last = {"outcome": "moved", "tag": tag, "from": str(old.tag), "seconds": round(time.perf_counter() - start, 2),
                     "at": time.time()}
        metrics.model_updates_total.labels(outcome="moved").inc()
        logger.info("model update: %s serves (from %s, ready in %.1f s)", tag, old.tag, self.last["seconds"])
        # The old version's last requests finish in its batcher; its threads stop once they have.
        threading.Timer(self.settings.timeout + 5, old.close).start()

    def move_backend(self, folder: Path) -> tuple[str, str]:
        """(backend, precision) a new version loads with: the serving version's, not a new race (a race
        in every worker at once took the cores the requests needed: bench/README.md, "Model updates");
        where that is int8 and the new version's int8 does not pass its guard, the same backend's
        other precisions are measured (and kept, decision.py)."""
        from vit_service.artifact import ModelArtifact
        from vit_service.quantize import int8_guard

        backend, precision = self.service.model.serving
        if precision == "int8" and int8_guard(ModelArtifact.read(folder).int8):
            return backend, self.settings.precision
        return backend, precision

    def stop(self) -> None:
        self._stop.set()
