"""PII masking: each type, near-misses that must stay, MCP result shapes, and properties."""

from __future__ import annotations

import base64
import random
import re
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.pii import ALL_TYPES, Masker, UnknownPiiType, luhn_valid, mask_jsonrpc_response, mask_mcp_result

MASKER = Masker()

JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
       "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U")

MASKED_CASES = [
    ("email", "mail jane.doe+tag@example.co.uk now"),
    ("email", "jürgen@bücher.de"),
    ("phone", "call +44 20 7946 0958 today"),
    ("phone", "call (650) 253-0000 today"),
    ("phone", "call 650-253-0000."),
    ("card", "card 4111 1111 1111 1111 exp"),
    ("card", "card 4111-1111-1111-1111"),
    ("card", "card 5500005555555559"),
    ("card", "amex 3782 822463 10005"),
    ("card", "visa13 4222222222222"),
    ("iban", "pay DE89 3704 0044 0532 0130 00 by"),
    ("iban", "pay GB82WEST12345698765432."),
    ("ssn", "ssn 123-45-6789"),
    ("ssn", "ssn 078 05 1120"),
    ("ip", "host 192.168.1.10 down"),
    ("ip", "host 2001:db8::8a2e:370:7334 down"),
    ("ip", "loopback ::1"),
    ("ip", "ll fe80::1%eth0 x"),
    ("ip", "full 2001:0db8:0000:0000:0000:ff00:0042:8329"),
    ("cloud_key", "AKIAIOSFODNN7EXAMPLE"),
    ("cloud_key", "key=ASIAY34FZKBOKMUTVV7A"),
    ("cloud_key", "AIzaSyA1234567890abcdefghijklmnopqrstuv"),
    ("cloud_key", "token ghp_0123456789abcdefghijklmnopqrstuvwxyz"),
    ("cloud_key", "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("cloud_key", "secret abc1Q~abcdefghijklmnopqrstuvwxyz0123456"),
    ("cloud_key", "stripe sk_live_abcdefghijklmnopqrstuvwx"),
    ("jwt", f"Bearer {JWT}"),
]

NEAR_MISSES = [
    "card 4111 1111 1111 1112",               # Luhn-invalid
    "order 12345678901234567890123",          # too many digits for a card
    "dates 2024-03-10 2024-09-18 2024-07-27",  # digit groups but not card formatting
    "pay GB82WEST12345698765431",             # IBAN with a bad checksum
    "pay XX89 3704 0044 0532 0130 00",        # unknown IBAN country
    "ssn 000-12-3456",                        # area 000 never issued
    "ssn 666-12-3456",                        # area 666 never issued
    "ssn 912-12-3456",                        # area 9xx never issued
    "ssn 123-00-4567",                        # group 00
    "ssn 123-45-0000",                        # serial 0000
    "ip 999.1.1.1",                           # not an IPv4 address
    "ip 1.2.3.4.5",                           # dotted version, not an address
    "code std::map and dead::beef",           # C++ scopes, not IPv6
    "time 12:30:45 and mac 00:1a:2b:3c:4d:5e",
    "phone 123-456-7890",                     # area code 123 does not exist
    "id 6502530000",                          # bare digits are not a phone number
    "eyJub3QiOiJhIGp3dCJ9",                   # one segment only
    "eyJhbGciOi.bad.x",                        # header is not base64 JSON
    "AKIA1234",                               # too short for an access key
    "email jane at example dot com",
    "version 1.2.3 build 45",
]


@pytest.mark.parametrize(("kind", "text"), MASKED_CASES)
def test_each_type_is_masked(kind: str, text: str) -> None:
    """Every PII type is found and replaced by its own label."""
    out, counts = MASKER.mask_text(text)
    assert f"[REDACTED:{kind}]" in out, out
    assert counts[kind] >= 1


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_misses_are_not_masked(text: str) -> None:
    """Candidates that fail their validator (Luhn, mod-97, SSN rules, ...) stay as they are."""
    out, counts = MASKER.mask_text(text)
    assert out == text
    assert not counts


def test_only_selected_types_are_masked() -> None:
    """A masker built for email masks emails and leaves card numbers alone."""
    text = "jane@example.com 4111 1111 1111 1111"
    out, counts = Masker(["email"]).mask_text(text)
    assert out == "[REDACTED:email] 4111 1111 1111 1111"
    assert counts == {"email": 1}


def test_aliases_and_all() -> None:
    """Type aliases map to canonical names, "all" selects every type, unknown names raise."""
    assert Masker(["credit_card", "ip_address"]).types == ("card", "ip")
    assert set(Masker(["all"]).types) == set(ALL_TYPES)
    with pytest.raises(UnknownPiiType):
        Masker(["passport"])


def test_custom_replacement() -> None:
    """The replacement template is configurable."""
    out, _ = Masker(["email"], replacement="<{type}>").mask_text("a@b.io")
    assert out == "<email>"
    out, _ = Masker(["email"], replacement="***").mask_text("a@b.io")
    assert out == "***"
    with pytest.raises(ValueError, match="template"):
        Masker(["email"], replacement="{other}")


def test_card_next_to_other_digits_is_masked() -> None:
    """Digits written right before a card cannot shield it."""
    out, _ = MASKER.mask_text("ref 7 4111 1111 1111 1111 and 12 4111111111111111")
    assert "4111" not in out


def test_overlapping_finds_merge() -> None:
    """A phone number inside an email's local part yields one replacement covering both."""
    out, counts = MASKER.mask_text("x +14155552671@example.com y")
    assert "4155552671" not in out and "example.com" not in out
    assert sum(counts.values()) == 1


def test_mask_json_walks_values_not_keys() -> None:
    """Strings at any depth are masked, keys and non-strings are untouched, input not mutated."""
    value = {"jane@example.com": [1, {"note": "call +44 20 7946 0958"}, None, True, 2.5],
             "deep": [[[["4111 1111 1111 1111"]]]]}
    original = orjson.dumps(value)
    out, counts = MASKER.mask_json(value)
    assert orjson.dumps(value) == original
    assert list(out) == ["jane@example.com", "deep"]
    assert out["jane@example.com"][1]["note"] == "call [REDACTED:phone]"
    assert out["deep"][0][0][0][0] == "[REDACTED:card]"
    assert counts == {"phone": 1, "card": 1}


def test_mask_json_deep_nesting_without_recursion() -> None:
    """Nesting deeper than Python's recursion limit is handled (no RecursionError)."""
    value: object = "a@b.io"
    for _ in range(3000):
        value = [value]
    out, counts = MASKER.mask_json(value)
    assert counts == {"email": 1}
    for _ in range(3000):
        assert isinstance(out, list)
        out = out[0]
    assert out == "[REDACTED:email]"


def test_tool_result_text_structured_and_embedded_resource() -> None:
    """tools/call: text blocks, embedded resources and structuredContent are masked; media stays."""
    image = base64.b64encode(b"\x89PNG jane@example.com").decode()
    result: dict[str, Any] = {
        "content": [
            {"type": "text", "text": "mail jane@example.com"},
            {"type": "image", "data": image, "mimeType": "image/png"},
            {"type": "resource", "resource": {"uri": "file:///a.txt", "text": "card 4111111111111111"}},
            {"type": "resource_link", "uri": "file:///jane@example.com", "name": "x",
             "description": "owner jane@example.com"},
        ],
        "structuredContent": {"owner": {"email": "jane@example.com"}},
        "isError": False,
    }
    out, counts = mask_mcp_result(result, ["email", "card"])
    assert out["content"][0]["text"] == "mail [REDACTED:email]"
    assert out["content"][1]["data"] == image
    assert out["content"][2]["resource"]["text"] == "card [REDACTED:card]"
    assert out["content"][3]["uri"] == "file:///jane@example.com"
    assert out["content"][3]["description"] == "owner [REDACTED:email]"
    assert out["structuredContent"] == {"owner": {"email": "[REDACTED:email]"}}
    assert counts == {"email": 3, "card": 1}
    assert result["content"][0]["text"] == "mail jane@example.com"  # input untouched


def test_resource_read_text_and_text_blobs() -> None:
    """resources/read: text contents and text-typed base64 blobs are masked; binary blobs pass."""
    text_blob = base64.b64encode(b"a,jane@example.com\n").decode()
    binary = base64.b64encode(b"\xff\xfejane@example.com").decode()
    result = {"contents": [
        {"uri": "db://1", "mimeType": "text/plain", "text": "ssn 123-45-6789"},
        {"uri": "db://2", "mimeType": "text/csv", "blob": text_blob},
        {"uri": "db://3", "mimeType": "application/octet-stream", "blob": binary},
        {"uri": "db://4", "blob": binary},
    ]}
    out, counts = mask_mcp_result(result, MASKER)
    assert out["contents"][0]["text"] == "ssn [REDACTED:ssn]"
    assert base64.b64decode(out["contents"][1]["blob"]).decode() == "a,[REDACTED:email]\n"
    assert out["contents"][2]["blob"] == binary
    assert out["contents"][3]["blob"] == binary
    assert counts == {"ssn": 1, "email": 1}


def test_prompt_messages_and_unknown_results() -> None:
    """prompts/get messages are masked; an unknown result shape has every string masked."""
    out, _ = mask_mcp_result({"messages": [{"role": "user", "content": {"type": "text",
                                                                         "text": "a@b.io"}}]}, MASKER)
    assert out["messages"][0]["content"]["text"] == "[REDACTED:email]"
    out, _ = mask_mcp_result({"whatever": ["a@b.io"]}, MASKER)
    assert out == {"whatever": ["[REDACTED:email]"]}


def test_jsonrpc_response_error_is_masked() -> None:
    """A JSON-RPC error's message and data are masked too."""
    msg = {"jsonrpc": "2.0", "id": 1, "error": {"code": -32000, "message": "no user a@b.io",
                                                 "data": {"ip": "10.0.0.1"}}}
    out, counts = mask_jsonrpc_response(msg, MASKER)
    assert out["error"] == {"code": -32000, "message": "no user [REDACTED:email]",
                            "data": {"ip": "[REDACTED:ip]"}}
    assert counts == {"email": 1, "ip": 1}


# --- properties ---------------------------------------------------------------------------------
def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(str(rng.randint(0, 9)) for _ in range(length - len(prefix) - 1))
    for check in "0123456789":
        if luhn_valid(body + check):
            return body + check
    raise AssertionError("unreachable")


@st.composite
def cards(draw: st.DrawFn) -> tuple[str, str]:
    """A Luhn-valid card number (digits) and the way it is written in text."""
    length = draw(st.integers(13, 19))
    prefix = draw(st.sampled_from(["4", "51", "55", "34", "37", "6011", "35", "2221"]))
    digits = _luhn_complete(prefix, length, random.Random(draw(st.integers(0, 2**32))))
    style = draw(st.sampled_from(["plain", "space4", "dash4", "amex"]))
    if style == "plain":
        written = digits
    elif style == "amex" and length == 15:
        written = f"{digits[:4]} {digits[4:10]} {digits[10:]}"
    else:
        sep = "-" if style == "dash4" else " "
        written = sep.join(digits[i:i + 4] for i in range(0, length, 4))
    return digits, written


NOISE = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
BOUNDARY = st.sampled_from([" ", "\n", ": ", ", ", "(", ")", "\t", " - ", "=", "\"", "card:"])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(before=NOISE, left=BOUNDARY, card=cards(), right=BOUNDARY, after=NOISE)
@example(before="7", left=" ", card=("4111111111111111", "4111 1111 1111 1111"), right=" ", after="2")
def test_no_luhn_valid_card_survives(before: str, left: str, card: tuple[str, str], right: str,
                                     after: str) -> None:
    """A Luhn-valid card number embedded in any text is gone after masking."""
    digits, written = card
    out, counts = MASKER.mask_text(before + left + written + right + after)
    assert written not in out
    assert digits not in re.sub(r"[ \-]", "", out) or digits in re.sub(r"[ \-]", "", before + after)
    assert counts["card"] >= 1


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False,
                                                                           allow_infinity=False)
    | st.text(max_size=30) | st.sampled_from(["jane@example.com", "4111 1111 1111 1111", JWT,
                                               "call +44 20 7946 0958", "10.0.0.1", "\u2028\"\\"]),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children,
                                                                      max_size=5),
    max_leaves=25)


@settings(max_examples=200)
@given(value=JSONISH)
def test_masked_json_round_trips(value: object) -> None:
    """Masked JSON serializes and parses again (orjson), and keeps the shape of the input."""
    out, _ = MASKER.mask_json(value)
    again = orjson.loads(orjson.dumps(out))
    assert type(again) is type(orjson.loads(orjson.dumps(value)))


# Lower-case letters, spaces and punctuation cannot form any of the types: every type needs a
# digit, "@", an upper-case prefix or "_" / "~".
SAFE_TEXT = st.text(alphabet=st.sampled_from(list("abcdefghijklmnopqrstuvwxyz .,;:!?'\"()-/\n\téüß中文🙂")),
                    max_size=300)


@settings(max_examples=300)
@given(text=SAFE_TEXT)
def test_text_without_pii_is_unchanged(text: str) -> None:
    """Text that cannot contain PII comes back identical, with no counts."""
    assert MASKER.mask_text(text) == (text, {})


WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
SMALL_NUMBER = st.integers(0, 9999).map(str)


@settings(max_examples=300)
@given(tokens=st.lists(st.tuples(WORD, SMALL_NUMBER), max_size=40))
def test_prose_with_small_numbers_is_unchanged(tokens: list[tuple[str, str]]) -> None:
    """Words interleaved with numbers of at most four digits are not mistaken for PII."""
    text = " ".join(f"{w} {n}" for w, n in tokens)
    assert MASKER.mask_text(text) == (text, {})


# Digits, the separators numbers are written with, and letters that start IBANs: the text where
# the digit-based detectors (which skip ASCII text before its first digit) have work to do.
DIGIT_TEXT = st.lists(st.sampled_from(["(", "+", "-", ".", " ", " ", "0", "1", "4", "5", "6", "9",
                                       "GB", "DE", "x", "(650) 253-0000", "+1 ", "+44 ",
                                       "4111 1111 1111 1111", "078-05-1120",
                                       "GB82 WEST 1234 5698 7654 32"]),
                      max_size=30).map("".join)
DIGIT_TYPES = ("phone", "card", "iban", "ssn", "ip")


@settings(max_examples=300)
@given(text=DIGIT_TEXT)
@example(text="++((+1 (650) 253-0000")
@example(text="GB82WEST12345698765432")
def test_ascii_fast_path_finds_what_the_full_scan_finds(text: str) -> None:
    """ASCII text is scanned from its first digit on; the result equals the full scan's (a
    non-ASCII character after a space leaves every find alone but forces the full scan)."""
    masker = Masker(DIGIT_TYPES)
    assert masker.find(text) == masker.find(text + " \u00e9")


def test_number_led_by_its_prefix_is_masked() -> None:
    """A number whose run begins before its first digit ("+", "(") is still found whole."""
    assert Masker(["phone"]).mask_text("call +1 (650) 253-0000") == (
        "call [REDACTED:phone]", {"phone": 1})
    assert Masker(["phone"]).mask_text("((650) 253-0000") == ("([REDACTED:phone]", {"phone": 1})


def test_non_ascii_digits_still_form_clusters() -> None:
    """``\\d`` matches every Unicode digit, so non-ASCII text is scanned in full."""
    text = "\u0663\u0663\u0663 call (650) 253-0000"
    assert Masker(["phone"]).mask_text(text)[1] == {"phone": 1}
