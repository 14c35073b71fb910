"""Where a key path is in the TOML text: the line of each key and table header, so that a
config error can say where to look. ``tomllib`` gives positions for syntax errors only; this
reads the (already valid) text a second time, so it is run only for a file with errors.

Paths are spelled as the validator spells them (``forward[2].listen``, ``hosts.vm1``). A path
gets no line where it cannot be told for certain: inside an array written inline (``forward =
[{...}, {...}]``), or when two different keys spell the same path (``"a.b" = 1`` beside
``[a] b = 1``).
"""
from __future__ import annotations

import bisect
import re
import tomllib

_Path = tuple[str | int, ...]

_SPACE = re.compile(r"(?:[ \t\r\n]|#[^\n]*)*")  # blank lines and comments
_INLINE_SPACE = re.compile(r"[ \t]*")
_KEY = re.compile(r"""[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*'""")
# A value is skipped whole: the strings first, as they may hold anything ("[[forward]]" on a
# line of its own, '#', ',', ']'); what is left ends at a separator (dates hold a space).
_STRING_OR_SCALAR = re.compile("|".join((
    r'"""(?:[^"\\]+|\\[\s\S]|"(?!""))*""""{0,2}', r"'''[\s\S]*?''''{0,2}",
    r'"(?:[^"\\\n]|\\.)*"', r"'[^'\n]*'", r"[^,\]}\r\n#]+")))


def key_lines(text: str) -> dict[str, int | None]:
    """Each key path in ``text``, spelled as in messages, with its line (from 1); None for a
    path whose line is not certain. A table's line is its header's (or the first key or
    header that makes it, when it has none); a key's is the line where the key starts."""
    try:
        found = _Scanner(text).scan()
    except (ValueError, IndexError):  # the text is not as expected: no line beats a wrong one
        return {}
    lines: dict[str, int | None] = {}
    for path, line in found.items():
        spelled = _spell(path)
        lines[spelled] = None if spelled in lines else line  # two paths, one spelling: ambiguous
    return lines


def _spell(path: _Path) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).removeprefix(".")


class _Scanner:
    """Reads the text from the start, as TOML reads it, noting where each key path begins."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.found: dict[_Path, int | None] = {}
        self.arrays: dict[_Path, int] = {}  # each [[array]] of tables: how many entries so far

    def scan(self) -> dict[_Path, int | None]:
        table: _Path = ()
        text = self.text
        while self.skip(_SPACE) < len(text):
            start = self.pos
            if text.startswith("[[", start):
                self.pos += 2
                *parent, last = self.keys()
                array = self.resolve(parent) + (last,)
                index = self.arrays.get(array, 0)
                self.arrays[array] = index + 1
                table = array + (index,)
                self.pos += 2
            elif text[start] == "[":
                self.pos += 1
                table = self.resolve(self.keys())
                self.pos += 1
            else:
                self.pair(table, located=True)
                continue
            self.define(table, start)
        return self.found

    def resolve(self, keys: list[str]) -> _Path:
        """A header's keys as a path: through an array of tables, its latest entry."""
        path: _Path = ()
        for key in keys:
            path += (key,)
            if path in self.arrays:
                path += (self.arrays[path] - 1,)
        return path

    def pair(self, table: _Path, located: bool) -> None:
        """``key = value``; inside an inline array (``located`` false) its paths get no line."""
        start = self.pos
        path = table + tuple(self.keys())
        self.define(path, start if located else None)
        self.pos += 1  # '='
        self.skip(_INLINE_SPACE)
        self.value(path, located)

    def value(self, path: _Path, located: bool) -> None:
        text = self.text
        if text[self.pos] == "[":
            self.pos += 1
            index = 0
            while text[self.skip(_SPACE)] != "]":
                self.define(path + (index,), None)
                self.value(path + (index,), False)
                index += 1
                if text[self.skip(_SPACE)] == ",":
                    self.pos += 1
            self.pos += 1
        elif text[self.pos] == "{":
            self.pos += 1
            while text[self.skip(_SPACE)] != "}":
                self.pair(path, located)
                if text[self.skip(_SPACE)] == ",":
                    self.pos += 1
            self.pos += 1
        else:
            match = _STRING_OR_SCALAR.match(text, self.pos)
            if match is None:
                raise ValueError(f"no value at offset {self.pos}")
            self.pos = match.end()

    def keys(self) -> list[str]:
        """A dotted key, from its first character to past the space after it."""
        keys = []
        while True:
            self.skip(_INLINE_SPACE)
            match = _KEY.match(self.text, self.pos)
            if match is None:
                raise ValueError(f"no key at offset {self.pos}")
            keys.append(_unquote(match.group()))
            self.pos = match.end()
            if self.text[self.skip(_INLINE_SPACE)] != ".":
                return keys
            self.pos += 1

    def define(self, path: _Path, at: int | None) -> None:
        """``path`` starts at offset ``at``; the tables above it are made there unless they
        already were (a header later may still define one: it is then the table's line)."""
        line = None if at is None else bisect.bisect_right(self.line_starts, at)
        for end in range(1, len(path)):
            self.found.setdefault(path[:end], line)
        self.found[path] = line

    def skip(self, pattern: re.Pattern[str]) -> int:
        match = pattern.match(self.text, self.pos)
        assert match is not None  # both patterns match the empty string
        self.pos = match.end()
        return self.pos


def _unquote(key: str) -> str:
    if key[0] == "'":
        return key[1:-1]
    if key[0] == '"':
        # Escapes decoded by the parser itself: "v\u006d1" is the key vm1.
        return key[1:-1] if "\\" not in key else next(iter(tomllib.loads(f"{key} = 0")))
    return key
