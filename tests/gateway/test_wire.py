"""The wire contract has one home: every header name the gateway owns and the metadata namespace
are literals only in gateway/wire.py, the protocol versions only in gateway/mcp.py, and the
identity codec round-trips."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway import mcp, wire

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "ext_authz", "ext_proc", "mcp_servers")
NAMES = (*wire.GATEWAY_HEADERS, *wire.SIGNAL_HEADERS, wire.EXT_AUTHZ_NAMESPACE)


def _sources(home: str = "gateway/wire.py") -> list[Path]:
    packages = (*PACKAGES, "gatewayctl") if (ROOT / "gatewayctl").is_dir() else PACKAGES
    return [p for pkg in packages for p in (ROOT / pkg).rglob("*.py") if p != ROOT / home]


@pytest.mark.parametrize("name", NAMES)
def test_each_name_is_a_literal_in_one_module_only(name: str) -> None:
    """No service spells a gateway header name or the metadata namespace itself."""
    literal = re.compile(r"""["']""" + re.escape(name) + r"""["']""", re.IGNORECASE)
    spelled = [str(p.relative_to(ROOT)) for p in _sources() if literal.search(p.read_text("utf-8"))]
    assert spelled == []


@pytest.mark.parametrize("version", mcp.SUPPORTED_HEADER_VERSIONS)
def test_each_protocol_version_is_a_literal_in_one_module_only(version: str) -> None:
    """The protocol versions are spelled in gateway/mcp.py alone; the servers, the catalog client
    and the CLI import them."""
    literal = re.compile(r"""["']""" + re.escape(version) + r"""["']""")
    spelled = [str(p.relative_to(ROOT)) for p in _sources("gateway/mcp.py")
               if literal.search(p.read_text("utf-8"))]
    assert spelled == []


@pytest.mark.parametrize("value", ["alice", "zo\u00eb", "100%", "%41", "a\r\nx-mcp-roles: admin",
                                   "\u2028", "a,b"])
def test_identity_codec_round_trips(value: str) -> None:
    """What ext_authz encodes the servers decode to the same value, printable ASCII on the wire."""
    encoded = wire.encode_identity(value)
    assert encoded.isascii() and encoded.isprintable()
    assert wire.decode_identity(encoded) == value


@pytest.mark.parametrize("spelling", ["%41", "%c3%a9", "%", "%zz", "%C3", "%25%"])
def test_identity_decoder_refuses_spellings_the_encoder_never_makes(spelling: str) -> None:
    """One identity, one form: anything the encoder would not produce is refused."""
    with pytest.raises(ValueError):
        wire.decode_identity(spelling)
