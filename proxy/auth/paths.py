"""Request paths decoded into segments, or refused (pure: no I/O, no asyncio, no aiohttp).

What could be read two ways is refused (``PathError``, answered with 400): encoded
delimiters, dot segments, malformed or double escapes, invalid UTF-8, control characters,
and non-ASCII segments whose NFKC form is a dot segment or holds a delimiter.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final
from unicodedata import normalize

__all__ = ["MAX_PATH_LENGTH", "PathError", "normalise_path"]

# Longer than any real echowin path by far; aiohttp caps the request line near 8 KiB anyway.
MAX_PATH_LENGTH: Final = 8192

# Bytes refused when they arrive percent-encoded. Each one decodes into a character that
# changes how a path splits or resolves, so a server decoding before routing and one
# decoding after would see different routes. Read-only view: no module-level mutable state.
_REFUSED_ENCODED: Final[Mapping[int, str]] = MappingProxyType(
    {
        0x2F: "encoded slash",
        0x5C: "encoded backslash",
        0x2E: "encoded dot",
        0x00: "encoded NUL",
        0x25: "double encoding (%25)",
        0x3B: "path parameter (;)",
        0x3F: "encoded ? or #",
        0x23: "encoded ? or #",
    }
)
_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")
# ASCII characters that a Unicode compatibility form (NFKC, as some servers apply) must not
# produce: two FULLWIDTH FULL STOPs (U+FF0E) or a TWO DOT LEADER (U+2025) become "..",
# a FULLWIDTH SOLIDUS (U+FF0F) becomes "/".
_DELIMITERS: Final = frozenset("/\\;?#%")


class PathError(ValueError):
    """A request path the gateway refuses to interpret (answer 400).

    `reason` is a short, fixed, human text ("empty path segment", "dot segment", ...). The
    message never echoes the path itself: it is attacker-chosen and may carry ids.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"refused path: {reason}")
        self.reason = reason


def normalise_path(raw_path: str) -> list[str]:
    """Decode a request path into segments, or raise PathError.

    `raw_path` is the path as received on the wire, percent-encoded, WITHOUT the query
    string (callers split at the first "?"; a "?" or "#" left in it is refused). "/"
    yields []. Refused: not starting with "/"; empty segments (`//`, trailing slash);
    segments made only of dots; "\\", ";", control characters, raw or encoded;
    %2F %5C %2E %00 %25 %3B %3F %23 in any hex case; malformed escapes; invalid UTF-8;
    non-ASCII segments whose NFKC form is a dot segment or holds a delimiter.
    """
    if len(raw_path) > MAX_PATH_LENGTH:
        raise PathError("path too long")
    if not raw_path.startswith("/"):
        raise PathError("path must start with /")
    if raw_path == "/":
        return []
    raw_segments = raw_path[1:].split("/")
    last = len(raw_segments) - 1
    segments = []
    for index, raw in enumerate(raw_segments):
        if not raw:
            raise PathError("trailing slash" if index == last else "empty path segment")
        segments.append(_decode_segment(raw))
    return segments


def _decode_segment(raw: str) -> str:
    """Percent-decode one non-empty raw segment (UTF-8 strict) and vet the result."""
    data = bytearray()
    i = 0
    while i < len(raw):
        char = raw[i]
        if char == "%":
            digits = raw[i + 1 : i + 3]
            if len(digits) != 2 or not _HEX_DIGITS.issuperset(digits):
                raise PathError("malformed percent escape")
            byte = int(digits, 16)
            reason = _REFUSED_ENCODED.get(byte)
            if reason is not None:
                raise PathError(reason)
            data.append(byte)
            i += 3
            continue
        _check_raw_char(char)
        try:
            data += char.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogate, e.g. from a surrogateescape decode
            raise PathError("invalid UTF-8") from None
        i += 1
    try:
        text = data.decode("utf-8")  # strict: overlong forms such as %C0%AE are refused
    except UnicodeDecodeError:
        raise PathError("invalid UTF-8") from None
    _check_decoded(text)
    return text


def _check_raw_char(char: str) -> None:
    if char == "\\":
        raise PathError("backslash")
    if char == ";":
        raise PathError("path parameter (;)")
    if char in "?#":
        raise PathError("query or fragment in path")


def _check_decoded(text: str) -> None:
    # Unicode category Cc is exactly U+0000-U+001F and U+007F-U+009F; checking after
    # decoding also catches UTF-8-encoded C1 controls such as %C2%85 (NEL).
    if any(c < " " or "\x7f" <= c <= "\x9f" for c in text):
        raise PathError("control character")
    if not text.strip("."):
        raise PathError("dot segment")
    if not text.isascii():
        folded = normalize("NFKC", text)
        if not folded.strip(".") or not _DELIMITERS.isdisjoint(folded):
            raise PathError("unicode lookalike of a path delimiter")
