"""POST /explain on a real `bentoml serve`: JSON grid equal to the explainer run directly, the
overlay PNG at the upload's aspect ratio, 4xx JSON for mistakes, real curl as in the README,
BentoML's client, /classify alongside, and the API docs' own title and version."""

from __future__ import annotations

import io
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
from PIL import Image

import vit_service
from service_fixtures import CLASS_NAMES, metric_value
from vit_service.artifact import load_model
from vit_service.explain import Explainer
from vit_service.overlay import legend_height
from vit_service.preprocessing import decode_image


@pytest.fixture(scope="module")
def url(tiny_model_server) -> str:
    return tiny_model_server[0]


@pytest.fixture(scope="module")
def explainer(tiny_model_server) -> Explainer:
    home = tiny_model_server[1]
    folder = next(p for p in (home / "models" / "vit-classifier").iterdir() if p.is_dir())
    return Explainer(*load_model(folder))


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("img") / "wide.jpg"
    Image.fromarray(rng.integers(0, 255, (50, 110, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def post(url: str, path: Path, **form: str) -> httpx.Response:
    return httpx.post(f"{url}/explain", files={"image": (path.name, path.read_bytes(), "image/jpeg")},
                      data=form, timeout=60)


@pytest.mark.parametrize("method,class_name", [("rollout", None), ("grad", None), ("grad", "square")])
def test_explain_json_matches_the_explainer(url: str, explainer: Explainer, jpeg: Path, method: str,
                                            class_name: str | None) -> None:
    form = {"method": method, **({"class_name": class_name} if class_name else {})}
    r = post(url, jpeg, **form)
    assert r.status_code == 200, r.text
    body = r.json()
    image = decode_image(jpeg.read_bytes(), draft_size=explainer.preprocessing.resize_size)
    want = explainer.explain_image(image, method, explainer.class_index(class_name))
    assert body["method"] == method and body["grid_shape"] == [4, 4]
    assert body["explained_class"] == (class_name or CLASS_NAMES[int(np.argmax(want.probs))])
    assert np.allclose(body["grid"], want.grid, atol=1e-3)
    assert [p["label"] for p in body["predictions"]][0] == CLASS_NAMES[int(np.argmax(want.probs))]
    assert body["image_size"] == [110, 50] and body["crop_box"] == pytest.approx([30, 0, 80, 50], abs=1)


def test_explain_png_is_the_overlay_at_the_upload_aspect(url: str, jpeg: Path) -> None:
    r = post(url, jpeg, format="png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    overlay = Image.open(io.BytesIO(r.content))
    picture_h = overlay.height - legend_height(overlay.width)  # the legend strip is below the picture
    assert overlay.format == "PNG" and abs(overlay.width / picture_h - 110 / 50) < 0.03


@pytest.mark.parametrize("case,status,message", [
    ("text", 400, "not a recognised image format"),
    ("method", 400, "'method' must be one of rollout, grad"),
    ("class", 400, "unknown 'class_name' 'giraffe'"),
    ("format", 400, "'format' must be one of json, png"),
    ("field", 400, "unexpected form field(s) 'colour'"),
    ("top_k", 400, "top_k must be between 1 and 4"),
    ("get", 405, "Method Not Allowed"),
])
def test_explain_mistakes_are_4xx_json(url: str, jpeg: Path, tmp_path: Path, case: str, status: int, message: str) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    r = {"text": lambda: post(url, text),
         "method": lambda: post(url, jpeg, method="lrp"),
         "class": lambda: post(url, jpeg, class_name="giraffe"),
         "format": lambda: post(url, jpeg, format="gif"),
         "field": lambda: post(url, jpeg, colour="red"),
         "top_k": lambda: post(url, jpeg, top_k="9"),
         "get": lambda: httpx.get(f"{url}/explain")}[case]()
    assert r.status_code == status and message in r.json()["error"]


def test_explain_rejections_are_counted_like_classify(url: str, jpeg: Path, tmp_path: Path) -> None:
    """Each 4xx of /explain carries a reason in vit_rejected_uploads_total, as /classify's do."""
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    cases = [("bad_image", lambda: post(url, text)), ("bad_top_k", lambda: post(url, jpeg, top_k="9")),
             ("bad_option", lambda: post(url, jpeg, method="lrp")), ("unknown_field", lambda: post(url, jpeg, colour="red"))]
    for reason, send in cases:
        before = httpx.get(f"{url}/metrics").text
        assert send().status_code == 400
        after = httpx.get(f"{url}/metrics").text
        for name, labels in (("vit_rejected_uploads_total", {"reason": reason}),
                             ("vit_rejected_uploads_total", {}),
                             *([("vit_images_total", {"endpoint": "explain", "outcome": "rejected"})]
                               if reason != "unknown_field" else [])):  # refused before the route
            assert metric_value(after, name, **labels) == metric_value(before, name, **labels) + 1, (reason, name)


def test_readme_curl_commands(url: str, jpeg: Path, tmp_path: Path) -> None:
    out = subprocess.run(["curl", "-s", "-F", f"image=@{jpeg}", f"{url}/explain"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["grid_shape"] == [4, 4]
    png = tmp_path / "overlay.png"
    subprocess.run(["curl", "-s", "-F", f"image=@{jpeg}", "-F", "format=png", "-o", str(png), f"{url}/explain"], check=True)
    assert Image.open(png).format == "PNG"


def test_bentoml_client_and_classify_alongside(url: str, jpeg: Path) -> None:
    with bentoml.SyncHTTPClient(url) as client:
        body = client.explain(image=jpeg, method="grad")
    assert body["method"] == "grad" and len(body["grid"]) == 4
    # /explain never goes through the batch queue: the batcher's pass count (vit_batch_size, one
    # observation per forward pass) does not move for three /explain calls, and moves by one
    # for one /classify (so the count would show a queued /explain).
    from service_fixtures import batch_histogram

    with httpx.Client(base_url=url, timeout=60) as c:
        passes_before, _, _ = batch_histogram(c)
        assert [post(url, jpeg, method=m).status_code for m in ("rollout", "grad", "rollout")] == [200] * 3
        assert batch_histogram(c)[0] == passes_before
        assert c.post("/classify", files={"image": jpeg.read_bytes()}).status_code == 200
        assert batch_histogram(c)[0] == passes_before + 1
    # /explain and /classify at once: both answer (the map is made outside the batch queue).
    with ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(post, url, jpeg) for _ in range(2)]
        jobs += [pool.submit(httpx.post, f"{url}/classify", files={"image": jpeg.read_bytes()}, timeout=60)
                 for _ in range(6)]
        assert [j.result().status_code for j in jobs] == [200] * 8


def test_page_and_docs_carry_a_same_origin_content_security_policy(url: str) -> None:
    for path in ("/", "/ui", "/docs"):
        csp = httpx.get(url + path).headers["content-security-policy"]
        directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
        assert directives["default-src"] == ["'self'"], csp
        # Nothing may name another origin: every source is 'self', a keyword, or data:/blob: URLs.
        sources = {src for values in directives.values() for src in values}
        assert all(src.startswith("'") or src in ("data:", "blob:") for src in sources), csp
        for fetching in ("script-src", "connect-src", "img-src", "style-src", "font-src"):
            assert "'self'" in directives.get(fetching, directives["default-src"]), (fetching, csp)


def test_docs_are_ours_and_local(url: str) -> None:
    spec = httpx.get(f"{url}/docs.json").json()
    assert spec["info"]["title"] == "vit-service" and spec["info"]["version"] == vit_service.__version__
    assert "/explain" in spec["paths"] and "BentoML" not in json.dumps(spec["info"])
    for path in ("/", "/ui", "/docs"):
        page = httpx.get(url + path)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "googletagmanager" not in page.text and "https://" not in page.text and "http://" not in page.text
