"""The documentation site: ``mkdocs build --strict`` passes (a broken link or anchor, or a page missing from
the nav, fails it), the generated reference pages name every field of the code they are generated from,
and every relative link of the README resolves to a file of the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
from pydantic import BaseModel

from pruning_core.settings import Settings
from pruning_core.spec import JobSpec, method_options

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=os.environ | {"NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    return out


def page(site: Path, name: str) -> str:
    return (site / name / "index.html").read_text(encoding="utf-8")


def test_the_site_builds_strict_with_every_page(site: Path) -> None:
    pages = ("http-api", "job-spec", "methods", "python-api", "configuration", "guarantees", "benchmarks")
    for name in pages:
        assert (site / name / "index.html").is_file(), name
    assert (site / "deploy" / "index.html").is_file(), "docs/deploy.md is part of the site"
    assert "Table A" in page(site, "benchmarks"), "BENCHMARKS.md is included"


def test_the_job_spec_page_names_every_field(site: Path) -> None:
    html = page(site, "job-spec")
    for name, field in JobSpec.model_fields.items():
        models = _models(field.annotation)
        if not models:
            assert f"<code>{name}</code>" in html, name
            continue
        if name == "method":
            continue  # below, per method
        for sub in models[0].model_fields:
            assert f"<code>{name}.{sub}</code>" in html, f"{name}.{sub}"
    sections = re.split(r"<h3 ", html)
    for method, options in method_options().items():
        (section,) = [s for s in sections if f"method.name: {method}<" in s]
        for sub in options.model_fields:
            assert f"<code>method.{sub}</code>" in section, f"{method}: method.{sub}"


def test_each_method_has_its_options_on_the_methods_page(site: Path) -> None:
    html = page(site, "methods")
    sections = re.split(r"<h2 ", html)
    for method, options in method_options().items():
        (section,) = [s for s in sections if s.startswith(f'id="{method}"')]
        for sub in options.model_fields:
            assert f"<code>method.{sub}</code>" in section, f"{method}: method.{sub}"


def test_the_configuration_page_names_every_setting(site: Path) -> None:
    html = page(site, "configuration")
    for name in Settings.model_fields:
        assert f"<code>{name.upper()}</code>" in html, name.upper()


def test_every_relative_link_of_the_readme_resolves() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    relative = [link for link in links if not re.match(r"[a-z]+:|#", link)]
    assert relative, "the README links the docs"
    missing = [link for link in relative if not (ROOT / link.split("#", 1)[0]).exists()]
    assert not missing, missing


def test_the_sdk_page_shows_the_readmes_tested_example() -> None:
    """tests/test_quickstart.py runs the README's SDK example; the SDK page shows the same block."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8").split("### SDK and CLI", 1)[1]
    sdk = (ROOT / "docs" / "sdk.md").read_text(encoding="utf-8")
    block = re.compile(r"```python\n(.*?)```", re.S)
    assert block.findall(readme)[0] == block.findall(sdk)[0]


def _models(annotation: object) -> list[type]:
    """The pydantic models a field holds: its own type, or the members of a union (``method``, ``notify``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
