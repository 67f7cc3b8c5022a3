"""Pin the deployment files' images to the digests in deploy/images.yaml.

    .venv/bin/python deploy/pin_images.py --check   # exit 1 while a digest is missing
    .venv/bin/python deploy/pin_images.py --apply   # write <image>:<tag>@sha256:<digest>

A reference is ``image: <name>:<tag>`` or ``image: <name>:<tag>@sha256:<hex>`` in
docker-compose.yml and deploy/k8s/*.yaml. Every one must be listed in images.yaml (exit 2
otherwise); --apply replaces the digest of each listed reference that has one and leaves the
others as they are (so it is idempotent and can run again after a digest changes).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
LOCAL = "local"  # built where it runs (compose's build:), so it has no registry digest
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
REFERENCE = re.compile(r"(?P<lead>\bimage:\s*)(?P<quote>[\"']?)(?P<ref>[A-Za-z0-9][\w./-]*:[\w.-]+)"
                       r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?(?P=quote)")


def deployment_files(root: Path) -> list[Path]:
    return [root / "docker-compose.yml", *sorted((root / "deploy" / "k8s").glob("*.yaml"))]


def load_digests(root: Path) -> dict[str, str]:
    """images.yaml: name:tag -> digest ("" for none yet); a malformed digest is an error."""
    raw = yaml.safe_load((root / "deploy" / "images.yaml").read_text(encoding="utf-8"))
    images = raw.get("images") if isinstance(raw, dict) else None
    if not isinstance(images, dict):
        raise SystemExit("deploy/images.yaml: `images` must map <image>:<tag> to a digest")
    for ref, digest in images.items():
        if not isinstance(digest, str) or (digest not in ("", LOCAL) and not DIGEST.match(digest)):
            raise SystemExit(f"deploy/images.yaml: {ref}: the digest must be sha256:<64 hex>, "
                             f"\"\" or {LOCAL!r}, got {digest!r}")
    return dict(images)


def references(root: Path) -> list[tuple[Path, str, str | None]]:
    """(file, name:tag, digest or None) for every image reference of the deployment files."""
    out = []
    for path in deployment_files(root):
        for match in REFERENCE.finditer(path.read_text(encoding="utf-8")):
            out.append((path, match.group("ref"), match.group("digest")))
    return out


def pinned_text(text: str, digests: dict[str, str]) -> str:
    def pin(match: re.Match[str]) -> str:
        listed = digests.get(match.group("ref"))
        digest = (listed if listed != LOCAL else None) or match.group("digest")
        suffix = f"@{digest}" if digest else ""
        quote = match.group("quote")
        return f"{match.group('lead')}{quote}{match.group('ref')}{suffix}{quote}"
    return REFERENCE.sub(pin, text)


def main(argv: list[str] | None = None, root: Path = REPO) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 while any digest is missing")
    mode.add_argument("--apply", action="store_true", help="write the digests into the files")
    args = parser.parse_args(argv)
    digests = load_digests(root)
    unlisted = sorted({f"{p.relative_to(root)}: {ref}" for p, ref, _ in references(root)
                       if ref not in digests})
    if unlisted:
        print("not listed in deploy/images.yaml:\n  " + "\n  ".join(unlisted), file=sys.stderr)
        return 2
    if args.apply:
        for path in deployment_files(root):
            text = path.read_text(encoding="utf-8")
            pinned = pinned_text(text, digests)
            if pinned != text:
                path.write_text(pinned, encoding="utf-8")
                print(f"pinned {path.relative_to(root)}")
        return 0
    missing = sorted({ref for _, ref, digest in references(root) if not (digests[ref] or digest)})
    # (a LOCAL image counts as pinned: it is built from this checkout)
    if missing:
        print("no digest yet (fill deploy/images.yaml at release time):\n  " + "\n  ".join(missing),
              file=sys.stderr)
        return 1
    print("every image is pinned by digest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
