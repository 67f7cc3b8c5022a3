"""Images by digest: every image the deployment files name is listed in deploy/images.yaml, and
deploy/pin_images.py writes the listed digests into the files (the release step) and refuses a
release while one is missing. No digest is shipped that was not taken from a registry."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
FAKE = "sha256:" + "ab" * 32


def pin_images() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pin_images", REPO / "deploy/pin_images.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def copy_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "deploy").mkdir(parents=True)
    shutil.copy(REPO / "docker-compose.yml", root)
    shutil.copytree(REPO / "deploy/k8s", root / "deploy/k8s")
    shutil.copy(REPO / "deploy/images.yaml", root / "deploy")
    return root


def test_every_image_is_listed_with_a_digest_or_none_yet() -> None:
    """Each image reference of compose and Kubernetes is <name>:<tag> listed in images.yaml, or
    already <name>:<tag>@<its listed digest>; each listed digest is a sha256 or empty."""
    module = pin_images()
    digests = module.load_digests(REPO)
    refs = module.references(REPO)
    assert {ref for _, ref, _ in refs} == set(digests)  # nothing unlisted, nothing stale
    for path, ref, digest in refs:
        assert digest is None or digest == digests[ref], (path, ref)
    third_party = {"envoyproxy/envoy", "openpolicyagent/opa", "redis", "prom/prometheus",
                   "otel/opentelemetry-collector-contrib", "grafana/grafana"}
    assert third_party <= {ref.split(":")[0] for ref in digests}


def test_apply_pins_every_listed_digest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With every digest filled, --apply writes <name>:<tag>@<digest> everywhere (quoted or not),
    --check then passes, and a second --apply changes nothing."""
    module = pin_images()
    root = copy_repo(tmp_path)
    images = yaml.safe_load((root / "deploy/images.yaml").read_text())
    assert module.main(["--check"], root) == 1  # digests missing: the release gate holds
    images["images"] = {ref: (d if d == module.LOCAL else FAKE) for ref, d in images["images"].items()}
    (root / "deploy/images.yaml").write_text(yaml.safe_dump(images))
    assert module.main(["--apply"], root) == 0
    for path, ref, digest in module.references(root):
        assert digest == (None if images["images"][ref] == module.LOCAL else FAKE), (path, ref)
    assert module.main(["--check"], root) == 0
    before = {p: p.read_text() for p in module.deployment_files(root)}
    assert module.main(["--apply"], root) == 0
    assert {p: p.read_text() for p in module.deployment_files(root)} == before
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    assert compose["services"]["envoy"]["image"] == f"envoyproxy/envoy:v1.40.0@{FAKE}"


def test_an_unlisted_image_or_a_bad_digest_is_refused(tmp_path: Path) -> None:
    """An image the file does not list stops both modes (exit 2); a digest that is not
    sha256:<64 hex> is refused naming the image."""
    module = pin_images()
    root = copy_repo(tmp_path)
    compose = root / "docker-compose.yml"
    compose.write_text(compose.read_text().replace("redis:7.4", "redis:7.2"))
    assert module.main(["--check"], root) == 2
    assert module.main(["--apply"], root) == 2
    (root / "deploy/images.yaml").write_text("images: {\"redis:7.2\": sha256:abc}\n")
    with pytest.raises(SystemExit, match=r"redis:7\.2: the digest must be sha256:<64 hex>"):
        module.main(["--check"], root)


def test_the_readme_says_digests_are_filled_at_release() -> None:
    """The Kubernetes README tells the release step (the shipped files name tags only)."""
    text = (REPO / "deploy/k8s/README.md").read_text()
    assert "pin_images.py --apply" in text and "release" in text
