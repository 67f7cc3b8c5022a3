"""PII masking for tool results and resources: regular expressions find candidates, validators
(Luhn, IBAN mod-97, phonenumbers, SSN area rules, ipaddress, JWT header) keep false positives down.

A :class:`Masker` is compiled once per set of types and reused. Each detector scans the text on
its own, so a failed candidate of one type never hides a real one of another; overlapping finds
are merged into one replacement, which can only mask more, never less. Cheap substring gates
(``"@"`` for email, ``"eyJ"`` for JWTs, ...) skip whole detectors on the common no-PII path.

Binary ``blob`` contents (base64) are decoded and masked only when they are UTF-8 text with a
textual MIME type (or none); images and other binary payloads pass unchanged, since regexes over
them would only corrupt the data (see :func:`mask_mcp_result`).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator
from typing import Any

import orjson
import phonenumbers
from stdnum import iban as stdnum_iban

__all__ = ["ALL_TYPES", "DEFAULT_REPLACEMENT", "Masker", "mask_jsonrpc_response", "mask_mcp_result"]

DEFAULT_REPLACEMENT = "[REDACTED:{type}]"

Span = tuple[int, int]


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# --- digit clusters ---------------------------------------------------------------------------------
# Every digit-based type (card, SSN, phone, IPv4) lies inside a run of digits and separators. One
# scan finds those runs; the specific patterns then run only inside them. A pattern that starts with
# \d costs ~1.5 ms per 100 KB of number-heavy text in `re`, so doing that once instead of four times
# is most of the budget.
_CLUSTER = re.compile(r"[\d(+][\d \-.()+\u00a0]{5,}\d")
_DIGITS = "0123456789"


_CLUSTER_CHARS = frozenset(_DIGITS + " -.()+\u00a0")


def _digit_count(s: str) -> int:
    return sum(s.count(d) for d in _DIGITS)


def _first_ascii_digit(text: str) -> int:
    """Index of the first digit of an ASCII ``text``, or -1 (str.find is far cheaper than `re`)."""
    first = -1
    for d in _DIGITS:
        i = text.find(d, 0, first) if first >= 0 else text.find(d)
        if i >= 0:
            first = i
    return first


def _clusters(text: str) -> list[Span]:
    """``_CLUSTER``'s matches. Every match ends in a digit and lies in a run of cluster
    characters, so in ASCII text none starts before the run that holds the first digit: the
    scan starts there (no digit: no match). ``\\d`` also matches non-ASCII digits, hence the
    full scan of any other text."""
    start = 0
    if text.isascii():
        first = _first_ascii_digit(text)
        if first < 0:
            return []
        start = first
        while start > 0 and text[start - 1] in _CLUSTER_CHARS:
            start -= 1
    return [m.span() for m in _CLUSTER.finditer(text, start)]


# --- payment cards -------------------------------------------------------------------------------
# A run of digit groups separated by single spaces or dashes. Any contiguous sub-run of groups with
# 13-19 digits that passes Luhn and looks like card formatting (one separator kind; groups of 4-6
# digits but the last) is a card. The union of all of them is masked, so digits written next to a
# card ("ref 7 4111 1111 1111 1111") cannot shield it.
_CARD_RUN = re.compile(r"(?<!\d)\d+(?:[ \-\u00a0]\d+)*(?!\d)")


def _card_window_spans(run: str, base: int) -> Iterator[Span]:
    groups: list[tuple[int, int]] = []
    pos = 0
    n = len(run)
    while pos < n:
        end = pos
        while end < n and run[end] in _DIGITS:
            end += 1
        groups.append((pos, end))
        pos = end + 1
    for i in range(len(groups)):
        count = 0
        digits = ""
        sep = run[groups[i][1]] if groups[i][1] < n else ""
        for j in range(i, len(groups)):
            s, e = groups[j]
            size = e - s
            count += size
            if count > 19:
                break
            digits += run[s:e]
            if count >= 13 and luhn_valid(digits):
                yield base + groups[i][0], base + e
            # The next group extends the window only if this one is a card-style group.
            if not 4 <= size <= 6 or (e < n and run[e] != sep):
                break


def _card_spans(text: str, clusters: list[Span]) -> Iterator[Span]:
    for start, end in clusters:
        if end - start < 13 or _digit_count(text[start:end]) < 13:
            continue
        for m in _CARD_RUN.finditer(text, start, end):
            if m.end() - m.start() >= 13:
                yield from _card_window_spans(m.group(), m.start())


# --- US social security numbers ---------------------------------------------------------------------
_SSN = re.compile(r"(?<![\d\-])(\d{3})([\- ])(\d{2})\2(\d{4})(?!\d|-\d)")


def _ssn_spans(text: str, clusters: list[Span]) -> Iterator[Span]:
    for start, end in clusters:
        if end - start < 11:
            continue
        for m in _SSN.finditer(text, start, end):
            area, group, serial = int(m.group(1)), int(m.group(3)), int(m.group(4))
            # SSA rules: area 000, 666 and 900-999 are never issued; group 00 and serial 0000 neither.
            if area == 0 or area == 666 or area >= 900 or group == 0 or serial == 0:
                continue
            yield m.span()


# --- phone numbers ----------------------------------------------------------------------------------
# International numbers start with "+"; national ones need NANP-style punctuation so that bare
# digit runs (ids, timestamps) are not mistaken for phone numbers.
_PHONE_INTL = re.compile(r"(?<![\w+])\+[1-9](?:[ .\-]?\(?\d{1,5}\)?){1,7}(?!\d)")
_PHONE_NATIONAL = re.compile(
    r"(?<![\w+\-.])(?:1[ .\-])?(?:\(\d{3}\) ?|\d{3}[ .\-])\d{3}[ .\-]\d{4}(?![\w\-]|\.\d)")
_PHONE_SEP = re.compile(r"[ .\-]")


def _phone_valid(candidate: str, region: str | None) -> bool:
    try:
        num = phonenumbers.parse(candidate, region)
    except phonenumbers.NumberParseException:
        return False
    return bool(phonenumbers.is_valid_number(num))


def _make_phone_spans(region: str) -> Callable[[str, list[Span]], Iterator[Span]]:
    def spans(text: str, clusters: list[Span]) -> Iterator[Span]:
        for start, end in clusters:
            if "+" in text[start:end]:
                for m in _PHONE_INTL.finditer(text, start, end):
                    cand = m.group()
                    # Trailing digit groups (a year, a count) may follow a number: trim and retry.
                    while True:
                        if _phone_valid(cand, None):
                            yield m.start(), m.start() + len(cand)
                            break
                        cuts = [x.start() for x in _PHONE_SEP.finditer(cand)]
                        if not cuts:
                            break
                        cand = cand[:cuts[-1]]
            if end - start >= 12:
                for m in _PHONE_NATIONAL.finditer(text, start, end):
                    if _phone_valid(m.group(), region):
                        yield m.span()
    return spans


# --- IP addresses -----------------------------------------------------------------------------------
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\d|\.\d)")
_IPV6 = re.compile(
    r"(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?"
    r"(?:%[0-9A-Za-z]{1,16})?(?!\w|:[\w:])")
# An IPv6 address has "::" or at least four colons in a row of hex groups: a literal-led pattern
# (fast in `re`) finds those anchors, then the full pattern runs from the start of the token.
_IPV6_ANCHOR = re.compile(r"::|:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:")
_HEX_COLON = frozenset("0123456789abcdefABCDEF:")
_WORDISH = re.compile(r"[\w:.]")


def _ipv4_spans(text: str, clusters: list[Span]) -> Iterator[Span]:
    for start, end in clusters:
        if "." not in text[start:end]:
            continue
        for m in _IPV4.finditer(text, start, end):
            try:
                ipaddress.IPv4Address(m.group())
            except ValueError:
                continue
            yield m.span()


def _ipv6_spans(text: str) -> Iterator[Span]:
    if ":" not in text:
        return
    done = -1
    for a in _IPV6_ANCHOR.finditer(text):
        if a.start() < done:
            continue
        start = a.start()
        while start > 0 and start > a.start() - 40 and text[start - 1] in _HEX_COLON:
            start -= 1
        if start > 0 and _WORDISH.match(text, start - 1):
            continue  # part of a longer word or dotted name
        m = _IPV6.match(text, start)
        if m is None:
            continue
        done = m.end()
        cand = m.group()
        if cand.endswith(":") and not cand.endswith("::"):
            cand = cand[:-1]  # a colon that ends a sentence or a label, not part of the address
        # Hex-only words joined by "::" ("dead::beef", "std::map") are code, not addresses.
        if not any(c in _DIGITS for c in cand):
            continue
        try:
            ipaddress.IPv6Address(cand.split("%", 1)[0])
        except ValueError:
            continue
        yield start, start + len(cand)


# --- IBAN ------------------------------------------------------------------------------------------
# Country code, check digits, then 11-30 alphanumerics optionally in space-separated groups.
_IBAN_START = re.compile(r"[A-Z][A-Z]\d\d")
_IBAN = re.compile(r"[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
_ALNUM = re.compile(r"[A-Za-z0-9]")


def _iban_spans(text: str) -> Iterator[Span]:
    begin = 0
    if text.isascii():  # a start has a digit two characters in (see _clusters for non-ASCII)
        first = _first_ascii_digit(text)
        if first < 0:
            return
        begin = max(0, first - 2)
    done = -1
    for s in _IBAN_START.finditer(text, begin):
        start = s.start()
        if start < done or (start > 0 and _ALNUM.match(text, start - 1)):
            continue
        m = _IBAN.match(text, start)
        if m is None:
            continue
        cand = m.group()
        # The pattern may swallow a following all-caps word; drop trailing groups until valid.
        while len(cand) >= 15:
            if stdnum_iban.is_valid(cand):
                done = start + len(cand)
                yield start, done
                break
            cut = cand.rfind(" ")
            if cut < 0:
                break
            cand = cand[:cut]


# --- email ------------------------------------------------------------------------------------------
# Found from each "@": the local part is matched backwards over at most 64 characters, the domain
# forwards. Linear in the text, never a scan from every character of every word.
_EMAIL_LOCAL = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]{1,64}\Z")
# No lookahead after the TLD: "a@example.com_" or "a@example.com2024" must still be masked (a
# masker errs towards masking); the greedy TLD takes every letter that follows.
_EMAIL_DOMAIN = re.compile(r"(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+[^\W\d_]{2,63}")


def _email_spans(text: str) -> Iterator[Span]:
    at = text.find("@")
    while at > 0:
        local = _EMAIL_LOCAL.search(text, max(0, at - 64), at)
        domain = _EMAIL_DOMAIN.match(text, at + 1)
        if local is not None and domain is not None:
            yield local.start(), domain.end()
        at = text.find("@", at + 1)


# --- JWTs -------------------------------------------------------------------------------------------
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*(?![\w-])")
_B64URL = re.compile(r"[\w-]")


def _jwt_spans(text: str) -> Iterator[Span]:
    if "eyJ" not in text:
        return
    for m in _JWT.finditer(text):
        if m.start() > 0 and _B64URL.match(text, m.start() - 1):
            continue
        header = m.group().split(".", 1)[0]
        try:
            decoded = orjson.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
        except (binascii.Error, ValueError):
            continue
        if isinstance(decoded, dict):
            yield m.span()


# --- cloud access keys ------------------------------------------------------------------------------
# Each alternative starts with a literal so `re` can skip ahead with a fast substring search; the
# "not preceded by" checks are done in Python on the rare matches.
_CLOUD_PATTERNS: tuple[tuple[re.Pattern[str], int], ...] = (
    # AWS access key ids (by prefix), Google API keys.
    (re.compile(r"A(?:3T[A-Z0-9]|KIA|SIA|BIA|CCA|GPA|IDA|IPA|NPA|NVA|PKA|ROA)[A-Z0-9]{16}(?![A-Za-z0-9])"
                r"|AIza[0-9A-Za-z_-]{35}(?![\w-])"), 0),
    (re.compile(r"gh[pousr]_[A-Za-z0-9]{36,255}(?![A-Za-z0-9])|github_pat_[A-Za-z0-9_]{60,255}"), 0),
    # Entra ID (Azure AD) client secrets: 3 chars, a digit, "Q~", 31-34 chars.
    (re.compile(r"Q~[A-Za-z0-9_~.-]{31,34}(?![\w~.-])"), 4),
    (re.compile(r"AccountKey=[A-Za-z0-9+/]{86}==|SharedAccessSignature=[^\s;\"']{20,}"), 0),
    (re.compile(r"_live_[A-Za-z0-9]{20,99}(?![A-Za-z0-9])"), 2),  # Stripe sk_live_ / rk_live_
    (re.compile(r"xox[abposr]-[A-Za-z0-9-]{10,250}"), 0),  # Slack
)
_ENTRA_PREFIX = re.compile(r"[A-Za-z0-9_~.-]{3}\d\Z")
_AWS_SECRET = re.compile(
    r"aws_?secret_?access_?key[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])", re.IGNORECASE)
_KEY_CHAR = re.compile(r"[\w~.-]")


def _cloud_spans(text: str) -> Iterator[Span]:
    for pattern, back in _CLOUD_PATTERNS:
        for m in pattern.finditer(text):
            start = m.start() - back
            if start < 0:
                continue
            if back == 4 and not _ENTRA_PREFIX.search(text, start, m.start()):
                continue
            if back == 2 and text[start:m.start()] not in ("sk", "rk"):
                continue
            if start > 0 and _KEY_CHAR.match(text, start - 1):
                continue
            yield start, m.end()
    if "ecret" in text or "ECRET" in text:
        for m in _AWS_SECRET.finditer(text):
            yield m.span()


# --- the masker -------------------------------------------------------------------------------------
ALL_TYPES: tuple[str, ...] = (
    "email", "phone", "card", "iban", "ssn", "ip", "cloud_key", "jwt")
_ALIASES = {"credit_card": "card", "payment_card": "card", "ip_address": "ip", "ipv4": "ip",
            "ipv6": "ip", "access_key": "cloud_key", "api_key": "cloud_key", "phone_number": "phone",
            "us_ssn": "ssn"}
# Earlier types win the label when finds overlap (a JWT can contain digit runs, an email a phone).
_PRIORITY = ("jwt", "cloud_key", "email", "iban", "card", "ssn", "phone", "ip")

_TEXT_MIME = re.compile(r"^(?:text/|application/(?:[\w.+-]*\+)?(?:json|xml|yaml|x-yaml|javascript|"
                        r"x-www-form-urlencoded|csv|sql|graphql|toml|x-sh)\b)", re.IGNORECASE)


class UnknownPiiType(ValueError):
    """A PII type name that the masker does not know; the message lists the known ones."""


def normalize_types(types: Iterable[str]) -> tuple[str, ...]:
    """Canonical type names; ``all`` expands; unknown names raise (config errors surface early)."""
    out: list[str] = []
    for raw in types:
        name = _ALIASES.get(raw.lower(), raw.lower())
        if name == "all":
            return ALL_TYPES
        if name not in ALL_TYPES:
            raise UnknownPiiType(f"unknown PII type {raw!r}; known: {', '.join(ALL_TYPES)}, all")
        if name not in out:
            out.append(name)
    return tuple(sorted(out, key=_PRIORITY.index))


_TextDetector = Callable[[str], Iterator[Span]]
_ClusterDetector = Callable[[str, list[Span]], Iterator[Span]]


# Each pass replaces at least one span; real text settles in one or two.
_MAX_MASK_PASSES = 8


class Masker:
    """Finds and replaces PII of the chosen types. Immutable and thread-safe once built."""

    def __init__(self, types: Iterable[str] = ALL_TYPES, *, replacement: str = DEFAULT_REPLACEMENT,
                 phone_region: str = "US") -> None:
        self.types = normalize_types(types)
        try:
            self._replacements = {t: replacement.format(type=t) for t in self.types}
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"replacement must be a format template using only {{type}}: {exc}") from None
        text_detectors: list[tuple[str, _TextDetector]] = []
        cluster_detectors: list[tuple[str, _ClusterDetector]] = []
        for t in self.types:
            if t == "jwt":
                text_detectors.append((t, _jwt_spans))
            elif t == "cloud_key":
                text_detectors.append((t, _cloud_spans))
            elif t == "email":
                text_detectors.append((t, _email_spans))
            elif t == "iban":
                text_detectors.append((t, _iban_spans))
            elif t == "card":
                cluster_detectors.append((t, _card_spans))
            elif t == "ssn":
                cluster_detectors.append((t, _ssn_spans))
            elif t == "phone":
                cluster_detectors.append((t, _make_phone_spans(phone_region)))
            elif t == "ip":
                cluster_detectors.append((t, _ipv4_spans))
                text_detectors.append((t, _ipv6_spans))
        self._text_detectors = tuple(text_detectors)
        self._cluster_detectors = tuple(cluster_detectors)
        self._rank = {t: i for i, t in enumerate(_PRIORITY)}

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """Merged, sorted, non-overlapping (start, end, type) spans of PII in ``text``."""
        if len(text) < 3:
            return []
        found: list[tuple[int, int, int, str]] = []
        rank = self._rank
        for kind, detect in self._text_detectors:
            for start, end in detect(text):
                found.append((start, -end, rank[kind], kind))
        if self._cluster_detectors:
            clusters = _clusters(text)
            if clusters:
                for kind, cdetect in self._cluster_detectors:
                    for start, end in cdetect(text, clusters):
                        found.append((start, -end, rank[kind], kind))
        if not found:
            return []
        found.sort()
        merged: list[tuple[int, int, str]] = []
        for start, neg_end, _rank, kind in found:
            end = -neg_end
            if merged and start < merged[-1][1]:
                last = merged[-1]
                if end > last[1]:
                    merged[-1] = (last[0], end, last[2])
                continue
            merged.append((start, end, kind))
        return merged

    def mask_text(self, text: str) -> tuple[str, Counter[str]]:
        """Return ``text`` with every PII span replaced, and how many of each type were replaced.

        Masking is repeated until nothing more is found: a replacement changes what its neighbours
        see (an IPv6 address glued to a card number, "...1111fe80::1", is only an address once the
        card is replaced), and what a second look would find must not pass unmasked. Text without
        PII pays nothing extra; a rescan of masked text costs ~15% of the first pass.
        """
        counts: Counter[str] = Counter()
        for _ in range(_MAX_MASK_PASSES):
            spans = self.find(text)
            if not spans:
                return text, counts
            text = self._replace(text, spans, counts)
        return text, counts

    def _replace(self, text: str, spans: list[tuple[int, int, str]], counts: Counter[str]) -> str:
        parts: list[str] = []
        pos = 0
        for start, end, kind in spans:
            parts.append(text[pos:start])
            parts.append(self._replacements[kind])
            counts[kind] += 1
            pos = end
        parts.append(text[pos:])
        return "".join(parts)

    def mask_json(self, value: Any, *, skip: Callable[[dict[str, Any]], Container[str]] | None = None
                  ) -> tuple[Any, Counter[str]]:
        """Mask every string value in a parsed JSON value (keys untouched); input is not mutated.

        ``skip(obj)`` names the keys of an object whose values are left as they are (binary
        payloads, say)."""
        counts: Counter[str] = Counter()
        if isinstance(value, str):
            return self.mask_text(value)
        if not isinstance(value, (dict, list)):
            return value, counts
        # An explicit stack: orjson accepts nesting deeper than Python's recursion limit.
        root: list[Any] = [value]
        stack: list[tuple[Any, Any]] = [(root, 0)]
        while stack:
            container, key = stack.pop()
            item = container[key]
            if isinstance(item, str):
                masked, c = self.mask_text(item)
                if c:
                    container[key] = masked
                    counts.update(c)
            elif isinstance(item, dict):
                copy = dict(item)
                container[key] = copy
                skipped = skip(copy) if skip is not None else ()
                stack.extend((copy, k) for k in copy if k not in skipped)
            elif isinstance(item, list):
                copy_list = list(item)
                container[key] = copy_list
                stack.extend((copy_list, i) for i in range(len(copy_list)))
        return root[0], counts


# --- MCP-aware helpers ------------------------------------------------------------------------------
def _mask_blob(item: dict[str, Any], masker: Masker, counts: Counter[str]) -> None:
    blob = item.get("blob")
    mime = item.get("mimeType")
    if not isinstance(blob, str) or (isinstance(mime, str) and not _TEXT_MIME.match(mime)):
        return
    try:
        text = base64.b64decode(blob, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):  # ValueError: non-ASCII base64 text
        return  # not text: binary payloads are passed as they are (documented limitation)
    masked, c = masker.mask_text(text)
    if c:
        item["blob"] = base64.b64encode(masked.encode("utf-8")).decode("ascii")
        counts.update(c)


def _mask_resource_contents(item: dict[str, Any], masker: Masker, counts: Counter[str]) -> None:
    if isinstance(item.get("text"), str):
        masked, c = masker.mask_text(item["text"])
        item["text"] = masked
        counts.update(c)
    if "blob" in item:
        _mask_blob(item, masker, counts)


def _mask_content_list(content: list[Any], masker: Masker, counts: Counter[str]) -> list[Any]:
    out: list[Any] = []
    for block in content:
        if not isinstance(block, dict):
            masked_value, c = masker.mask_json(block)
            counts.update(c)
            out.append(masked_value)
            continue
        block = dict(block)
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            block["text"], c = masker.mask_text(block["text"])
            counts.update(c)
        elif kind == "resource" and isinstance(block.get("resource"), dict):
            resource = dict(block["resource"])
            _mask_resource_contents(resource, masker, counts)
            block["resource"] = resource
        elif kind in ("image", "audio"):
            pass  # base64 media: no text to mask
        else:
            # resource_link and unknown block types: mask every string except the base64 payloads.
            for key, value in block.items():
                if key not in ("type", "data", "blob", "uri"):
                    block[key], c = masker.mask_json(value)
                    counts.update(c)
        out.append(block)
    return out


def mask_mcp_result(result: Any, masker: Masker | Iterable[str]) -> tuple[Any, Counter[str]]:
    """Mask the user-visible parts of an MCP result; returns a new object and the counts.

    ``tools/call``: ``content[].text``, embedded resources, ``structuredContent``.
    ``resources/read``: ``contents[].text`` and text-typed base64 ``blob`` items.
    ``prompts/get``: ``messages[].content``. Anything else: every string value.
    """
    if not isinstance(masker, Masker):
        masker = Masker(masker)
    counts: Counter[str] = Counter()
    if not isinstance(result, dict):
        return masker.mask_json(result)
    out = dict(result)
    known = False
    if isinstance(out.get("content"), list):
        known = True
        out["content"] = _mask_content_list(out["content"], masker, counts)
    if "structuredContent" in out:
        known = True
        out["structuredContent"], c = masker.mask_json(out["structuredContent"])
        counts.update(c)
    if isinstance(out.get("contents"), list):
        known = True
        items = []
        for item in out["contents"]:
            if isinstance(item, dict):
                item = dict(item)
                _mask_resource_contents(item, masker, counts)
            items.append(item)
        out["contents"] = items
    if isinstance(out.get("messages"), list):
        known = True
        messages = []
        for msg in out["messages"]:
            if isinstance(msg, dict) and isinstance(msg.get("content"), dict):
                msg = dict(msg)
                msg["content"] = _mask_content_list([msg["content"]], masker, counts)[0]
            messages.append(msg)
        out["messages"] = messages
    if not known:
        return masker.mask_json(result)
    return out, counts


def mask_jsonrpc_response(message: Any, masker: Masker) -> tuple[Any, Counter[str]]:
    """Mask a whole JSON-RPC response: the result as MCP content, an error's message and data."""
    if not isinstance(message, dict):
        return masker.mask_json(message)
    out = dict(message)
    counts: Counter[str] = Counter()
    if "result" in out:
        out["result"], counts = mask_mcp_result(out["result"], masker)
    if isinstance(out.get("error"), dict):
        out["error"], c = masker.mask_json(out["error"])
        counts.update(c)
    return out, counts
