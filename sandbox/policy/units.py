"""Parsing of sizes ("4GiB"), rates ("10mbit") and durations ("30m") in policies."""
from __future__ import annotations

import re

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}
_RATE_UNITS = {  # bits per second
    "bit": 1, "kbit": 1000, "mbit": 1000**2, "gbit": 1000**3,
    "bps": 8, "kbps": 8 * 1000, "mbps": 8 * 1000**2, "gbps": 8 * 1000**3,
}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "ms": 0.001}
_NUM = r"([0-9]+(?:\.[0-9]+)?)"


def parse_size(value: object) -> int:
    """Bytes from an int or a string like '512MiB'. Raises ValueError with the reason."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 4GiB, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size like 4GiB, got {type(value).__name__}")
    m = re.fullmatch(_NUM + r"\s*([A-Za-z]*)", value.strip())
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {value!r} (use e.g. 512MiB, 4GiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_rate(value: object) -> int:
    """Bits per second from an int or a string like '10mbit' or '2MBps'."""
    if isinstance(value, bool):
        raise ValueError("expected a rate like 10mbit, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a rate cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a rate like 10mbit, got {type(value).__name__}")
    m = re.fullmatch(_NUM + r"\s*([A-Za-z]+)", value.strip())
    if not m or m.group(2).lower() not in _RATE_UNITS:
        raise ValueError(f"not a rate: {value!r} (use e.g. 10mbit, 1gbit, 2mbps)")
    return int(float(m.group(1)) * _RATE_UNITS[m.group(2).lower()])


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like '30m', '2h', '500ms'."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30m, got a boolean")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a duration like 30m, got {type(value).__name__}")
    m = re.fullmatch(_NUM + r"\s*([a-z]*)", value.strip())
    if not m or m.group(2) not in _DURATION_UNITS:
        raise ValueError(f"not a duration: {value!r} (use e.g. 90s, 30m, 2h)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def format_size(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
