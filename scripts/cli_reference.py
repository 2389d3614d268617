"""docs/cli.md: the `--help` of each argparse command (vit-export, vit-explain, vit-data and its
subcommands), as the commands print it. tests/test_docs.py checks that the page matches the code;
after changing a command's options:

    python scripts/cli_reference.py          # rewrites docs/cli.md

vit-train's options are LightningCLI's, generated from the module, data module and configs/
(`vit-train fit --help`, docs/training.md), so they are not copied here.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Callable
from pathlib import Path
from unittest.mock import patch

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "cli.md"
WIDTH = "100"  # argparse wraps to $COLUMNS: one width, so the page does not depend on the terminal


def _commands() -> list[tuple[str, Callable[[list[str]], object]]]:
    sys.path.insert(0, str(REPO))
    from training.data_cli import main as data_main
    from training.export import main as export_main
    from vit_service.explain_cli import main as explain_main

    return [("vit-export", export_main), ("vit-explain", explain_main), ("vit-data", data_main),
            *[(f"vit-data {sub}", lambda argv, sub=sub: data_main([sub, *argv]))
              for sub in ("demo", "cifar10", "verify", "optimize")]]


def help_text(main: Callable[[list[str]], object]) -> str:
    """What `COMMAND --help` prints, from its entry point in this process."""
    out = io.StringIO()
    with patch.dict(os.environ, {"COLUMNS": WIDTH}), contextlib.redirect_stdout(out), \
            contextlib.suppress(SystemExit):
        main(["--help"])
    return out.getvalue().rstrip() + "\n"


def page() -> str:
    parts = ["# Command reference\n",
             "Each command's `--help`, generated from the code by `python scripts/cli_reference.py` (a test checks",
             "that this page matches it). `vit-train` takes LightningCLI's options: `vit-train fit --help`, and",
             "[training.md](training.md).\n"]
    for name, main in _commands():
        parts += [f"## `{name}`\n", "```text", help_text(main).rstrip(), "```\n"]
    return "\n".join(parts)


if __name__ == "__main__":
    PAGE.write_text(page())
    print(f"wrote {PAGE.relative_to(REPO)}")
