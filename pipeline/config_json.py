"""Reading JSON configs: the config error types, a key-path reader, and canonical JSON with its hash.

Every access through `Section` names its key path, and every key left unread is reported: a warning list for
SAT's sections (SAT ignores unknown keys), an error for our own. `canonical_json` is the one form that is hashed
(configs, manifests, architectures).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any


class ConfigError(ValueError):
    """A config value breaks a rule; the message names the file, the key path and what was expected."""


class MissingPackageError(ConfigError):
    """A valid config names a part whose optional package is not installed (dac, laion_clap, ...)."""


class Section:
    """A JSON object being read at ``path``; remembers which keys were read."""

    def __init__(self, data: Any, path: str, unknown: list[str] | None):
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected an object, got {show(data)}")
        self.data, self.path, self.unknown, self.seen = data, path, unknown, set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def raw(self, name: str, default: Any = None, required: bool = False) -> Any:
        self.seen.add(name)
        if name not in self.data or self.data[name] is None:
            if required:
                raise ConfigError(f"{self.key(name)}: required key is missing")
            return default
        return self.data[name]

    def int(self, name, default=None, required=False, minimum=None):
        value = self.raw(name, default, required)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.key(name)}: expected an integer, got {show(value)}")
        if minimum is not None and value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise ConfigError(f"{self.key(name)}: expected {what}, got {show(value)}")
        return value

    def float(self, name, default=None, required=False):
        value = self.raw(name, default, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self.key(name)}: expected a number, got {show(value)}")
        return float(value)

    def bool(self, name, default=False):
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(name)}: expected true or false, got {show(value)}")
        return value

    def str(self, name, default=None, required=False, choices=None):
        value = self.raw(name, default, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{self.key(name)}: expected a string, got {show(value)}")
        if choices is not None and value not in choices:
            raise ConfigError(f"{self.key(name)}: expected one of {', '.join(choices)}, got {show(value)}")
        return value

    def dict(self, name, default=None, required=False):
        value = self.raw(name, default, required)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{self.key(name)}: expected an object, got {show(value)}")
        return value

    def list(self, name, default=(), required=False):
        value = self.raw(name, default, required)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{self.key(name)}: expected a list, got {show(value)}")
        return tuple(value)

    def strs(self, name):
        values = self.list(name)
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise ConfigError(f"{self.key(name)}[{i}]: expected a string, got {show(v)}")
        return values

    def section(self, name, required=False):
        value = self.raw(name, None, required)
        return None if value is None else Section(value, self.key(name), self.unknown)

    def done(self) -> None:
        """Record unknown keys: a warning for SAT sections (unknown=list), an error for ours (None)."""
        extra = sorted(set(self.data) - self.seen)
        if not extra:
            return
        if self.unknown is None:
            raise ConfigError(f"{self.key(extra[0])}: unknown key; known keys: {', '.join(sorted(self.seen))}")
        self.unknown.extend(self.key(k) for k in extra)


def show(value: Any) -> str:
    """A value as JSON for an error message, cut to 60 characters."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace: the form that is hashed (configs, manifests, architectures)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_of(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def read_json(path: str) -> dict:
    """Read a local JSON config file; errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data
