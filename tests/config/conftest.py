"""Helpers of the config tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import (
    ConfigError,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[2]


def errors_of(raw: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return info.value.lines
