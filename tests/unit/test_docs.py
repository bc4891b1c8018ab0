"""The docs a user reads stay in step with the code."""

from __future__ import annotations

from pathlib import Path

from common.settings import Settings
from worker.options import WorkerOptions

REPO = Path(__file__).resolve().parents[2]


def test_configuration_doc_names_every_setting() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text()
    fields = [*Settings.model_fields, *WorkerOptions.model_fields]
    names = [f"TIDAL_{n.upper()}" for n in fields]
    missing = [n for n in names if f"`{n}`" not in doc]
    assert missing == []


def test_readme_gives_the_two_commands_first() -> None:
    readme = (REPO / "README.md").read_text()
    assert "make up" in readme and "make test" in readme
    assert readme.index("make up") < readme.index("tidal submit")
