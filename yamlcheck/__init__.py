"""Path-precise validation of YAML configuration, shared by routes.yaml and engines.yaml.

Its own package so that router/ and engines/ both use it without importing each other
(router/ uses engines.launcher; engines/ must not need router/).

Every error names the file, the key path (e.g. ``models[0].backends[1].url``), what was
found and what was expected, and for unknown keys a "did you mean" hint.  Validators
read plain dicts/lists produced by ``yaml.safe_load`` and return typed values; callers
build frozen dataclasses from them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml

T = TypeVar("T")

_MISSING = object()


class ConfigError(ValueError):
    """A configuration problem, rendered as ``FILE: KEY.PATH: message``."""

    def __init__(self, file: str | Path | None, path: str, message: str) -> None:
        self.file = str(file) if file is not None else "<config>"
        self.path = path or "(top level)"
        self.message = message
        super().__init__(f"{self.file}: {self.path}: {message}")


def describe(value: Any) -> str:
    """How a found value reads in an error message."""
    if value is None:
        return "nothing (null)"
    kind = type(value).__name__
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} {text}"


class Node:
    """A value in the config tree together with its key path and file, for errors."""

    __slots__ = ("value", "path", "file")

    def __init__(self, value: Any, path: str = "", file: str | Path | None = None) -> None:
        self.value = value
        self.path = path
        self.file = file

    # -- navigation ---------------------------------------------------------------
    def _child_path(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def fail(self, message: str) -> NoReturn:
        raise ConfigError(self.file, self.path, message)

    def mapping(self, allowed: Iterable[str]) -> Node:
        """Assert this node is a mapping whose keys are all in `allowed`."""
        if self.value is None:
            self.value = {}
        if not isinstance(self.value, Mapping):
            self.fail(f"expected a mapping, found {describe(self.value)}")
        allowed = list(allowed)
        for key in self.value:
            if not isinstance(key, str) or key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
                raise ConfigError(
                    self.file,
                    self._child_path(str(key)),
                    f"unknown key '{key}'{suggestion} (allowed: {', '.join(allowed)})",
                )
        return self

    def get(self, key: str, default: Any = _MISSING) -> Node:
        """The child `key`; missing and no default -> error; missing with default -> default."""
        assert isinstance(self.value, Mapping), "call mapping() first"
        if key in self.value and self.value[key] is not None:
            return Node(self.value[key], self._child_path(key), self.file)
        if default is _MISSING:
            raise ConfigError(self.file, self._child_path(key), "required key is missing")
        return Node(default, self._child_path(key), self.file)

    def has(self, key: str) -> bool:
        return isinstance(self.value, Mapping) and self.value.get(key) is not None

    def items(self) -> list[Node]:
        """Children of a list node."""
        if self.value is None:
            return []
        if not isinstance(self.value, list):
            self.fail(f"expected a list, found {describe(self.value)}")
        return [Node(v, self._child_path(i), self.file) for i, v in enumerate(self.value)]

    # -- scalars ------------------------------------------------------------------
    def string(self, *, non_empty: bool = True) -> str:
        if not isinstance(self.value, str):
            self.fail(f"expected a string, found {describe(self.value)}")
        if non_empty and not self.value.strip():
            self.fail("expected a non-empty string")
        return self.value

    def optional_string(self) -> str | None:
        return None if self.value is None else self.string()

    def boolean(self) -> bool:
        if not isinstance(self.value, bool):
            self.fail(f"expected true or false, found {describe(self.value)}")
        return self.value

    def integer(self, *, minimum: int | None = None, maximum: int | None = None) -> int:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            self.fail(f"expected an integer, found {describe(self.value)}")
        self._check_range(self.value, minimum, maximum)
        return self.value

    def number(self, *, minimum: float | None = None, maximum: float | None = None,
               exclusive_minimum: bool = False) -> float:
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            self.fail(f"expected a number, found {describe(self.value)}")
        value = float(self.value)
        if exclusive_minimum and minimum is not None and value <= minimum:
            self.fail(f"expected a number greater than {minimum:g}, found {value:g}")
        self._check_range(value, minimum, maximum)
        return value

    def choice(self, options: Iterable[str]) -> str:
        options = list(options)
        value = self.string()
        if value not in options:
            hint = difflib.get_close_matches(value, options, n=1)
            suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
            self.fail(f"expected one of {', '.join(options)}, found '{value}'{suggestion}")
        return value

    def string_map(self) -> dict[str, str]:
        if self.value is None:
            return {}
        if not isinstance(self.value, Mapping):
            self.fail(f"expected a mapping of strings, found {describe(self.value)}")
        out: dict[str, str] = {}
        for key, val in self.value.items():
            if not isinstance(key, str) or not isinstance(val, (str, int, float, bool)):
                raise ConfigError(self.file, self._child_path(str(key)),
                                  f"expected a string value, found {describe(val)}")
            out[key] = str(val)
        return out

    def string_list(self) -> list[str]:
        return [item.string() for item in self.items()]

    def _check_range(self, value: float, minimum: float | None, maximum: float | None) -> None:
        if minimum is not None and value < minimum:
            self.fail(f"expected a value >= {minimum:g}, found {value:g}")
        if maximum is not None and value > maximum:
            self.fail(f"expected a value <= {maximum:g}, found {value:g}")


def load_yaml(file: str | Path) -> Node:
    """Read a YAML file safely into a root Node; unreadable or malformed files are ConfigErrors."""
    path = Path(file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read file: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(path, "", f"not valid YAML{where}: {problem}") from None
    return Node(data, "", path)
