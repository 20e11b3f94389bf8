"""Path-precise validation of YAML configuration, shared by routes.yaml and engines.yaml.

Its own package so that router/ and engines/ both use it without importing each other
(router/ uses engines.launcher; engines/ must not need router/).

Every error names the file, the key path (e.g. ``models[0].backends[1].url``), what was
found and what was expected, and for unknown keys a "did you mean" hint.  Validators
read plain dicts/lists produced by ``yaml.safe_load`` and return typed values; callers
build frozen dataclasses from them.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Callable, Iterable, Mapping
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


class ConfigErrors(ConfigError):
    """Several configuration problems found in one run, in file order (``every_error``)."""

    def __init__(self, errors: list[ConfigError]) -> None:
        first = errors[0]
        super().__init__(first.file, first.path, first.message)
        self.errors = errors
        self.args = ("\n".join(str(e) for e in errors),)

    def __str__(self) -> str:
        return str(self.args[0])


_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _tokens(path: str) -> list[str | int]:
    if path in ("", "(top level)"):
        return []
    return [int(index) if index else key for key, index in _TOKEN.findall(path)]


def _render(tokens: list[str | int]) -> str:
    out = ""
    for token in tokens:
        out += f"[{token}]" if isinstance(token, int) else (f".{token}" if out else token)
    return out


def every_error(data: Any, file: str | Path | None, validate: Callable[[Any], T], *, limit: int = 100) -> T:
    """`validate(data)`, or every ConfigError it finds, in file order, as one ConfigErrors.

    Validators stop at their first problem.  So that a file with four mistakes is fixed in one
    run, not four, each problem's key is taken out of a copy of the document (its default then
    applies; a missing key takes out the nearest enclosing item) and the copy validated again,
    until it passes or nothing more can be taken out.  A problem reported on an item that
    encloses one already taken out (``models: expected at least one model`` after the only
    model went) is a consequence, not a mistake of the file, and ends the search."""
    try:
        return validate(data)  # the common case: valid, no copy (validators do not change it)
    except ConfigErrors:
        raise
    except ConfigError:
        pass
    work = copy.deepcopy(data)
    removed: dict[tuple[str | int, ...], list[int]] = {}  # list path (file indices) -> items taken out
    taken: list[tuple[str | int, ...]] = []  # paths taken out, in file indices
    errors: list[tuple[tuple[str | int, ...], ConfigError]] = []
    for _ in range(limit):
        try:
            result = validate(work)
        except ConfigErrors:
            raise
        except ConfigError as exc:
            tokens = _tokens(exc.path if exc.path != "(top level)" else "")
            original = _to_file_indices(tokens, removed)
            if any(original == t[:len(original)] for t in taken):
                break  # a consequence of something already reported
            errors.append((original, ConfigError(exc.file, _render(list(original)), exc.message)))
            cut = _take_out(work, tokens, removed, original)
            if cut is None:
                break
            taken.append(cut)
            continue
        if not errors:
            return result
        break
    if len(errors) == 1:
        raise errors[0][1]
    lines = _line_numbers(file)
    order = sorted(range(len(errors)), key=lambda i: (_line_of(errors[i][0], lines), i))
    raise ConfigErrors([errors[i][1] for i in order])


def _to_file_indices(tokens: list[str | int], removed: dict[tuple[str | int, ...], list[int]]) -> tuple[str | int, ...]:
    """A path in the trimmed copy's list indices, in the file's."""
    out: list[str | int] = []
    for token in tokens:
        if isinstance(token, int):
            gone = removed.get(tuple(out), [])
            index = token
            for g in sorted(gone):  # the token-th item not taken out
                if g <= index:
                    index += 1
            token = index
        out.append(token)
    return tuple(out)


def _take_out(work: Any, tokens: list[str | int], removed: dict[tuple[str | int, ...], list[int]],
              original: tuple[str | int, ...]) -> tuple[str | int, ...] | None:
    """Remove the deepest existing item on `tokens` (not the root); its file path, or None."""
    depth = len(tokens)
    while depth > 0:
        parent = work
        for token in tokens[:depth - 1]:
            parent = _child(parent, token)
            if parent is _MISSING:
                break
        last = tokens[depth - 1]
        if isinstance(parent, Mapping) and isinstance(last, str) and last in parent:
            del parent[last]  # type: ignore[attr-defined]
            return original[:depth]
        if isinstance(parent, list) and isinstance(last, int) and 0 <= last < len(parent):
            parent.pop(last)
            removed.setdefault(tuple(original[:depth - 1]), []).append(int(original[depth - 1]))
            return original[:depth]
        depth -= 1
    return None


def _child(value: Any, token: str | int) -> Any:
    if isinstance(token, int):
        return value[token] if isinstance(value, list) and 0 <= token < len(value) else _MISSING
    return value.get(token, _MISSING) if isinstance(value, Mapping) else _MISSING


def _line_numbers(file: str | Path | None) -> dict[tuple[str | int, ...], int]:
    """Key path -> line in the file (empty when it cannot be read again)."""
    if file is None:
        return {}
    try:
        root = yaml.compose(Path(file).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    lines: dict[tuple[str | int, ...], int] = {}

    def walk(node: Any, path: tuple[str | int, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*path, str(key.value))
                lines[child] = key.start_mark.line + 1
                walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, i)] = item.start_mark.line + 1
                walk(item, (*path, i))

    if root is not None:
        walk(root, ())
    return lines


def _line_of(path: tuple[str | int, ...], lines: dict[tuple[str | int, ...], int]) -> int:
    """The line of `path`, or of its nearest enclosing key that the file has (a missing key)."""
    for depth in range(len(path), 0, -1):
        line = lines.get(path[:depth])
        if line is not None:
            return line
    return 0
