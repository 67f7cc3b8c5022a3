"""One reading of a files path and of a ``file:`` URI, shared by the policy facts and the files server.

The policy judges a path and the files server opens a path: if the two read the same URI in
different ways (one percent-decodes, the other does not), a spelling the policy does not
recognise (``file:///%74enants/globex/...``) reaches a file the policy would refuse. So both
sides call :func:`file_uri_path` here, and it accepts exactly one spelling per path: the one
:func:`file_uri` writes. Any other spelling (``%74`` for ``t``, ``%2F`` for ``/``, lower-case hex,
``%2e%2e``, raw non-ASCII, a host, a query or fragment, ``FILE:``, ``file:/x``, invalid or overlong
UTF-8, double encoding, empty or dot segments) is no path at all, so there is nothing left to
decode differently.

The bounds are the files server's own (``MAX_PATH_CHARS`` is what its sandbox accepts); the
gateway checks them before it builds any fact from a path.
"""

from __future__ import annotations

from urllib.parse import quote, unquote_to_bytes

# The sandbox refuses longer paths; Linux's PATH_MAX is the same.
MAX_PATH_CHARS = 4096
# Deeper than any real tree; bounds the work per path whatever its length.
MAX_PATH_SEGMENTS = 128
# A canonical URI of a MAX_PATH_CHARS path needs up to 3 characters per UTF-8 byte; anything
# longer than this is refused before it is decoded.
MAX_URI_CHARS = 16384

FILE_URI_PREFIX = "file:///"


def file_uri(path: str) -> str:
    """The one URI of a path relative to the root: ``a b/c.txt`` -> ``file:///a%20b/c.txt``."""
    return FILE_URI_PREFIX + quote(path, safe="/")


def file_uri_path(uri: str) -> str | None:
    """The path relative to the root that ``uri`` names, or None unless ``uri`` is canonical.

    Canonical means: equal to ``file_uri(path)`` of a normalized path (no empty, ``.`` or ``..``
    segments; ``file:///`` alone names the root ``""``) without NUL, backslash or ``%``.
    """
    if not uri.startswith(FILE_URI_PREFIX) or not uri.isascii() or len(uri) > MAX_URI_CHARS:
        return None
    encoded = uri[len(FILE_URI_PREFIX):]
    try:
        # Strict UTF-8: overlong forms (%c0%ae), surrogates and stray bytes are refused.
        path = unquote_to_bytes(encoded).decode("utf-8")
    except UnicodeDecodeError:
        return None
    # Re-encoding is what makes the spelling unique: quote() escapes every byte but the
    # unreserved ASCII characters and '/', with upper-case hex.
    if quote(path, safe="/") != encoded:
        return None
    if "\x00" in path or "\\" in path:
        return None  # what no path argument may hold either (gateway.policy.facts.path_facts)
    if "%" in path:
        return None  # %25: whoever decodes once more would read another path
    if path and any(seg in ("", ".", "..") for seg in path.split("/")):
        return None
    return path
