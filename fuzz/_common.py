"""Shared set-up for the atheris harnesses.

Puts the checkout on ``sys.path`` (the harnesses reuse ``tests.fuzz.reference``) and fills in
libFuzzer defaults the caller did not give: the harness's dictionary (``dicts/<name>.dict``), its
seed inputs (``seeds/<name>/*``, read-only: new corpus entries are kept in memory unless a corpus
directory is passed) and an artifact prefix under the temp dir, so crashes never land in the repo.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def libfuzzer_argv(name: str, argv: list[str]) -> list[str]:
    """``argv`` plus the defaults for harness ``name`` that it does not already set."""
    out = list(argv)
    given = {arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("-")}
    dictionary = HERE / "dicts" / f"{name}.dict"
    if "-dict" not in given and dictionary.is_file():
        out.append(f"-dict={dictionary}")
    seeds = sorted(p for p in (HERE / "seeds" / name).glob("*") if p.is_file())
    if "-seed_inputs" not in given and seeds:
        out.append("-seed_inputs=" + ",".join(str(p) for p in seeds))
    if "-artifact_prefix" not in given:
        artifacts = Path(tempfile.gettempdir()) / "mcp-gateway-fuzz" / name
        artifacts.mkdir(parents=True, exist_ok=True)
        out.append(f"-artifact_prefix={artifacts}/")
    return out


def run(name: str, test_one_input: Callable[[bytes], None]) -> None:
    import atheris  # type: ignore[import-untyped]  # atheris ships no type information

    atheris.Setup(libfuzzer_argv(name, sys.argv), test_one_input)
    atheris.Fuzz()
