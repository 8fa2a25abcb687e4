"""``upstream.keys_file``: many echowin keys without a config line each (an agency's
subteams). The file (or environment variable) holds a JSON or YAML map of key name to key::

    acme: "ek_live_..."                       # a key: its budget is upstream.limits
    globex: {key: "ek_live_...", limits: [{requests: 500, per_seconds: 3600}]}

Each entry works like an ``upstream.extra_keys`` entry. The text is a secret: it is read
like every other (``{file: PATH}`` or ``{env: NAME}``), and no error, log line or repr ever
shows a key, or the text around a syntax error (YAML's own messages quote it): errors name
``upstream.keys_file``, the entry and the line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from proxy.config.errors import ConfigError

__all__ = [
    "KEYS_FILE",
    "MAX_KEYS",
    "MAX_KEYS_FILE_BYTES",
    "FileKey",
    "key_name_problem",
    "parse_keys_file",
    "read_entries",
]

KEYS_FILE = "upstream.keys_file"
MAX_KEYS = 10_000
"""Entries a keys file may hold: each is a budget lane, with its own metrics series."""
MAX_KEYS_FILE_BYTES = 4 * 1024 * 1024
_MAX_KEY_CHARS = 1024


@dataclass(frozen=True, slots=True)
class FileKey:
    """One entry: ``limits`` as (requests, per_seconds) pairs, None for upstream.limits."""

    name: str
    key: str = field(repr=False)  # never shown: made a Secret by proxy/config/secrets.py
    limits: tuple[tuple[int, float], ...] | None = None


def key_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name an upstream key, or None. Names are shown (metrics, logs)."""
    if not isinstance(name, str) or not name:
        return "names are 1-64 of [A-Za-z0-9_-]"
    if name in ("default", "agency"):
        return f"{name!r} is reserved; pick another name"
    if not name.replace("-", "").replace("_", "").isalnum() or len(name) > 64 or not name.isascii():
        return f"{name!r}: names are 1-64 of [A-Za-z0-9_-]"
    return None


def parse_keys_file(text: str) -> list[FileKey]:
    """The entries of a keys file's ``text``; ConfigError naming the entries at fault (all
    of them, so that one run of check-config lists everything to mend)."""
    keys, errors = read_entries(text)
    if errors:
        raise ConfigError(errors)
    return keys


def read_entries(text: str) -> tuple[list[FileKey], list[str]]:
    """The good entries of ``text`` and an error line for each bad one; ConfigError when
    the text as a whole is not a keys file (too large, not a map, a syntax error)."""
    if len(text.encode()) > MAX_KEYS_FILE_BYTES:
        raise ConfigError([f"{KEYS_FILE}: larger than {MAX_KEYS_FILE_BYTES} bytes"])
    raw = _load(text)
    if not isinstance(raw, dict):
        raise ConfigError([f"{KEYS_FILE}: must be a map of key name to key"])
    if len(raw) > MAX_KEYS:
        raise ConfigError([f"{KEYS_FILE}: {len(raw)} keys; at most {MAX_KEYS}"])
    errors: list[str] = []
    keys: list[FileKey] = []
    for name, value in raw.items():
        problem = key_name_problem(name)
        if problem is not None:
            # A name that is not one may be a key pasted in the wrong place: not echoed.
            if not _showable(name):
                name, problem = "?", "names are 1-64 of [A-Za-z0-9_-]"
            errors.append(f"{KEYS_FILE}: entry {name!r}: {problem}")
            continue
        try:
            keys.append(_entry(name, value))
        except ValueError as exc:
            errors.append(f"{KEYS_FILE}.{name}: {exc}")
    return keys, errors


def _showable(name: object) -> bool:
    """True when ``name`` may be shown in an error: short and printable (a long one may
    be a key)."""
    return isinstance(name, str) and len(name) <= 64 and name.isprintable()


def _entry(name: str, value: object) -> FileKey:
    """One entry; ValueError (never quoting the key) when it is not one."""
    limits: tuple[tuple[int, float], ...] | None = None
    if isinstance(value, dict):
        unknown = sorted(str(k) for k in value if k not in ("key", "limits"))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; takes key and limits")
        if "limits" in value:
            limits = _limits(value["limits"])
        value = value.get("key")
    if not isinstance(value, str) or not value.strip():
        raise ValueError("the key must be a non-empty string")
    key = value.strip()
    if len(key) > _MAX_KEY_CHARS or not key.isprintable() or any(c.isspace() for c in key):
        raise ValueError(f"the key must be 1-{_MAX_KEY_CHARS} printable characters, no spaces")
    return FileKey(name, key, limits)


def _limits(value: object) -> tuple[tuple[int, float], ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("limits must be a non-empty list of {requests, per_seconds}")
    out: list[tuple[int, float]] = []
    for index, item in enumerate(value):
        where = f"limits[{index}]"
        if not isinstance(item, dict) or set(item) != {"requests", "per_seconds"}:
            raise ValueError(f"{where} must be {{requests: N, per_seconds: S}}")
        requests, per = item["requests"], item["per_seconds"]
        if isinstance(requests, bool) or not isinstance(requests, int) or requests <= 0:
            raise ValueError(f"{where}.requests must be a positive integer")
        if isinstance(per, bool) or not isinstance(per, int | float) or not math.isfinite(per):
            raise ValueError(f"{where}.per_seconds must be a positive number")
        if per <= 0:
            raise ValueError(f"{where}.per_seconds must be a positive number")
        out.append((requests, float(per)))
    return tuple(out)


def _load(text: str) -> Any:
    """JSON (fast) or YAML; a name given twice is refused (both would silently keep the
    last). Errors give the line only: YAML's and JSON's messages quote the text."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text, object_pairs_hook=_unique)
        except json.JSONDecodeError as exc:
            raise ConfigError([f"{KEYS_FILE}: not valid JSON (line {exc.lineno})"]) from None
    try:
        return yaml.load(text, Loader=_UniqueLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError([f"{KEYS_FILE}: not valid YAML{line}"]) from None
    except yaml.YAMLError:
        raise ConfigError([f"{KEYS_FILE}: not valid YAML"]) from None


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise ConfigError([f"{KEYS_FILE}: {_shown(name)} is listed twice"])
        out[name] = value
    return out


def _shown(name: object) -> str:
    if isinstance(name, str) and key_name_problem(name) is None:
        return repr(name)
    return "an entry"


class _UniqueLoader(yaml.SafeLoader):
    """SafeLoader refusing a mapping key given twice."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError([f"{KEYS_FILE}: {_shown(key)} is listed twice (line {line})"])
            if isinstance(key, str):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)
