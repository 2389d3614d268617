"""Resident memory of one serving process per backend: after imports, once the model serves
(load_backend + warm-up, as a worker does), and after its first /explain (which needs the torch
model: the runtime's own for torch, loaded once beside openvino). Each backend in a fresh process.

    python bench/backend_memory.py --model /path/to/exported/model [--backends auto,torch,openvino]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)

def rss_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024

from vit_service.backends import load_backend
from vit_service.explain import Explainer
before = rss_mib()
p = load_backend(sys.argv[1], backend=sys.argv[2], device="cpu", threads=1, cache=Path(sys.argv[3]))
p.warmup(16)
served = rss_mib()
x = np.zeros((1, *p.input_shape), np.uint8)
Explainer(p.model, p.artifact, p.device).explain_uint8(x)
print(json.dumps({"backend": sys.argv[2], "serves": f"{p.backend} {p.precision}", "rss_after_imports_mib": before,
                  "rss_serving_mib": served, "rss_after_explain_mib": rss_mib()}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="an exported model folder (vit-export --dir)")
    p.add_argument("--backends", default="auto,torch,openvino")
    args = p.parse_args()
    from vit_service.host import host_line

    print(host_line())
    with tempfile.TemporaryDirectory() as cache:
        for backend in args.backends.split(","):
            # twice: the first run measures (auto) or converts (openvino) and keeps it; the second is a later start
            for start in ("first start", "later start"):
                out = subprocess.run([sys.executable, "-c", CHILD, str(args.model), backend, cache],
                                     capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                print(json.dumps({"start": start, **row}))


if __name__ == "__main__":
    main()
