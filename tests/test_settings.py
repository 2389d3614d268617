"""Settings are declared once (vit_service/serving/settings.py): every VIT_* variable the service
reads comes from there, and the README's table is what settings.py renders."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vit_service.serving.settings import Settings, markdown_table

REPO = Path(__file__).resolve().parents[1]


def test_readme_settings_table_is_the_rendered_one() -> None:
    """The table may move (README.md or a docs/ page): it must stand, unedited, in one of them."""
    table = markdown_table()
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    holding = [p.relative_to(REPO).as_posix() for p in pages if p.exists() and table in p.read_text()]
    assert holding, ("the VIT_* settings table in README.md (or docs/) differs from settings.py's; "
                     "regenerate it with: python -m vit_service.serving.settings")


def test_every_vit_variable_in_the_serving_code_is_a_setting() -> None:
    declared = set(re.findall(r"`(VIT_\w+)`", markdown_table()))
    assert len(declared) >= 18
    for path in (REPO / "vit_service").rglob("*.py"):
        if path.name == "settings.py":
            continue
        for name in re.findall(r"os\.environ(?:\.get)?\s*[\[(]\s*[\"'](VIT_\w+)", path.read_text()):
            pytest.fail(f"{path.relative_to(REPO)} reads {name} itself: read it in settings.py")


def test_vit_backend_is_read_by_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIT_DEVICE", "cpu")
    monkeypatch.delenv("VIT_BACKEND", raising=False)
    assert Settings.from_env().backend == "auto"
    monkeypatch.setenv("VIT_BACKEND", " openvino ")
    assert Settings.from_env().backend == "openvino"
