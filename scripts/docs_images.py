"""Makes the README's pictures, docs/ui.png and docs/overlay.png, from a trained demo checkpoint.

    python scripts/docs_images.py --ckpt runs/demo/version_0/checkpoints/last.ckpt --image data/demo/val/triangle/00003.jpg

Exports the checkpoint into a temporary BentoML store, serves it on a free loopback port, opens the
web page in headless Chromium, uploads the image, turns the heatmap on and takes a screenshot;
then runs `vit-explain` on the same image for the overlay.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--out", default=str(REPO / "docs"))
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    from test_ui_browser import CHROMIUM, LAUNCH_ARGS
    from bench.local_server import local_server

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "BENTOML_HOME": tmp, "BENTOML_DO_NOT_TRACK": "true"}
        subprocess.run([str(BIN / "vit-export"), "--ckpt", args.ckpt, "--name", "vit-classifier"], env=env, check=True)
        subprocess.run([str(BIN / "vit-explain"), args.image, "--model", args.ckpt, "--out", tmp + "/explain"], check=True)
        shutil.copy(Path(tmp) / "explain" / f"{Path(args.image).stem}.png", out / "overlay.png")
        with local_server(Path(tmp) / "serve.log", {"BENTOML_HOME": tmp}) as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
            page = browser.new_page(viewport={"width": 1000, "height": 660})
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
            page.set_input_files("#file", args.image)
            page.wait_for_selector("#toggle:enabled")
            page.check("#toggle")
            page.wait_for_selector("#overlay", state="visible")
            page.screenshot(path=str(out / "ui.png"))
            browser.close()
    for name in ("ui.png", "overlay.png"):
        print(out / name, (out / name).stat().st_size, "bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
