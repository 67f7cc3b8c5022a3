"""The image and the installed package hold every service package the deploy files run."""

from __future__ import annotations

import fnmatch
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Folders with Python packages that are not part of what ships.
NOT_SHIPPED = {"tests", "bench", "fuzz", "deploy"}


def _service_packages() -> set[str]:
    return {p.parent.name for p in ROOT.glob("*/__init__.py")} - NOT_SHIPPED


def test_the_image_copies_every_service_package() -> None:
    """A package missing from the Dockerfile (the aggregator once was) cannot start in compose or
    Kubernetes: every top-level package is copied."""
    copied = set(re.findall(r"^COPY (\S+) \1$", (ROOT / "Dockerfile").read_text(), re.MULTILINE))
    assert _service_packages() - copied == set()


def test_the_package_build_includes_every_service_package() -> None:
    """A non-editable install (pip install .) carries every top-level package too."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["packages"]["find"]["include"]
    missing = {p for p in _service_packages() if not any(fnmatch.fnmatch(p, pat) for pat in patterns)}
    assert missing == set()


def test_every_python_module_a_deploy_file_runs_is_shipped() -> None:
    """Each `python -m <package>` in docker-compose.yml and deploy/k8s names a shipped package
    (or the standard library's, e.g. the JWKS file server's http.server)."""
    texts = [(ROOT / "docker-compose.yml").read_text()]
    texts += [p.read_text() for p in (ROOT / "deploy" / "k8s").glob("*.yaml")]
    run = {m for t in texts for m in re.findall(r"-m[\"',\s]+([a-z_]+)", t)}
    assert run, "no `python -m` found: the pattern no longer matches the deploy files"
    assert run - _service_packages() - sys.stdlib_module_names == set()
