"""Pipeline strings: a readable, round-trippable form of a list of configured passes.

    canonicalize,infer-shapes,quantize-weights{bits=4,group-size=128,exclude=[lm_head,*.gate]}

Grammar::

    pipeline := entry ("," entry)*
    entry    := pass-name ("{" option ("," option)* "}")?
    option   := option-name "=" value
    value    := atom | "[" (atom ("," atom)*)? "]"
    atom     := bare | "\"" chars "\""        bare: letters, digits and _ . * ? / : + -

Option values are typed by the pass's dataclass fields (int, float, bool, str, None, tuples of
str). A parsed pipeline prints back exactly as written (options in the order given), once
spacing is removed and values are in their plain form; a pipeline made from pass objects prints
each pass with the options that differ from their defaults.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kompakt.errors import PipelineError, did_you_mean
from kompakt.passes.base import Pass, is_optional, strip_optional
from kompakt.passes.registry import get_pass

_BARE = re.compile(r"[A-Za-z0-9_.*?/:+\-]+")


@dataclass(frozen=True)
class PipelineEntry:
    """One configured pass and its text in the pipeline string."""

    pass_: Pass
    text: str


class Pipeline:
    """An ordered list of configured passes that prints as a pipeline string."""

    def __init__(self, entries: Iterable[PipelineEntry | Pass]) -> None:
        self.entries: tuple[PipelineEntry, ...] = tuple(
            e if isinstance(e, PipelineEntry) else PipelineEntry(e, format_pass(e)) for e in entries
        )

    @classmethod
    def parse(cls, text: str) -> Pipeline:
        """Parses a pipeline string; raises `PipelineError` pointing at the fault."""
        return cls(_Parser(text).parse())

    @property
    def passes(self) -> list[Pass]:
        return [e.pass_ for e in self.entries]

    def __str__(self) -> str:
        return ",".join(e.text for e in self.entries)

    def __repr__(self) -> str:
        return f"Pipeline({str(self)!r})"

    def __iter__(self) -> Iterator[Pass]:
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and self.passes == other.passes

    def __hash__(self) -> int:
        return hash(tuple(self.passes))

    def __add__(self, other: Pipeline) -> Pipeline:
        return Pipeline(self.entries + other.entries)


def format_pass(p: Pass) -> str:
    """``name{opt=value,...}`` with the options that differ from their defaults."""
    options = p.non_default_options()
    if not options:
        return p.name
    return p.name + "{" + ",".join(f"{k}={format_value(v)}" for k, v in options.items()) + "}"


def format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    text = str(value)
    if _BARE.fullmatch(text) and text not in ("none", "true", "false"):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def convert_option(pass_name: str, option: str, annotation: Any, raw: Any) -> Any:
    """Converts a parsed value (str, or list of str; quoted strings are `_Quoted`) to the type."""
    where = f"option '{option}' of pass '{pass_name}'"
    if isinstance(raw, str) and not isinstance(raw, _Quoted) and raw == "none":
        if is_optional(annotation):
            return None
        raise PipelineError(f"{where} cannot be none")
    base = strip_optional(annotation)
    origin = typing.get_origin(base)
    if origin in (tuple, list, Sequence, typing.Sequence):
        items = raw if isinstance(raw, list) else [raw]
        (item_type, *_) = typing.get_args(base) or (str,)
        return tuple(convert_option(pass_name, option, item_type, item) for item in items)
    if isinstance(raw, list):
        raise PipelineError(f"{where} takes one value, not a list")
    if origin is typing.Literal:
        choices = typing.get_args(base)
        if raw not in choices:
            raise PipelineError(
                f"{where} must be one of {', '.join(map(str, choices))}; got '{raw}'"
                + did_you_mean(raw, map(str, choices))
            )
        return raw
    try:
        if base is bool:
            if raw in ("true", "false"):
                return raw == "true"
            raise ValueError
        if base is int:
            return int(raw)
        if base is float:
            return float(raw)
        if base is str:
            return str(raw)
    except ValueError:
        pass
    else:
        raise PipelineError(f"{where} has a type kompakt cannot parse: {annotation}")
    name = getattr(base, "__name__", str(base))
    raise PipelineError(f"{where} expects {name}, got '{raw}'")


class _Quoted(str):
    """A string value that was quoted in the source (so 'none' stays a string)."""


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, message: str) -> PipelineError:
        pointer = " " * self.pos + "^"
        return PipelineError(f"{message} at position {self.pos}:\n  {self.text}\n  {pointer}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            found = f"'{self.peek()}'" if self.peek() else "the end"
            raise self.fail(f"expected '{char}' but found {found}")
        self.pos += 1

    def bare(self, what: str) -> str:
        self.skip_space()
        match = _BARE.match(self.text, self.pos)
        if not match:
            raise self.fail(f"expected {what}")
        self.pos = match.end()
        return match.group()

    def atom(self) -> str:
        if self.peek() != '"':
            return self.bare("a value")
        self.pos += 1
        out = []
        while self.pos < len(self.text) and self.text[self.pos] != '"':
            if self.text[self.pos] == "\\" and self.pos + 1 < len(self.text):
                self.pos += 1
            out.append(self.text[self.pos])
            self.pos += 1
        if self.pos >= len(self.text):
            raise self.fail("unterminated quoted string")
        self.pos += 1
        return _Quoted("".join(out))

    def value(self) -> str | list[str]:
        if self.peek() != "[":
            return self.atom()
        self.pos += 1
        items: list[str] = []
        if self.peek() == "]":
            self.pos += 1
            return items
        while True:
            items.append(self.atom())
            if self.peek() == "]":
                self.pos += 1
                return items
            self.expect(",")

    def parse(self) -> list[PipelineEntry]:
        if not self.text.strip():
            return []
        entries = [self.entry()]
        while self.peek() == ",":
            self.pos += 1
            entries.append(self.entry())
        if self.peek():
            raise self.fail(f"unexpected '{self.peek()}'")
        return entries

    def entry(self) -> PipelineEntry:
        start = self.pos
        name = self.bare("a pass name")
        try:
            cls = get_pass(name)
        except PipelineError as err:
            self.pos = start
            self.skip_space()
            raise self.fail(str(err)) from None
        options = {o.name: o for o in cls.options()}
        given: dict[str, Any] = {}
        texts: list[str] = []
        if self.peek() == "{":
            self.pos += 1
            while True:
                key_pos = self.pos
                key = self.bare("an option name")
                if key not in options:
                    self.pos = key_pos
                    self.skip_space()
                    valid = ", ".join(options) or "none"
                    raise self.fail(
                        f"pass '{name}' has no option '{key}'{did_you_mean(key, options)} "
                        f"(its options: {valid})"
                    )
                if options[key].field in given:
                    raise self.fail(f"option '{key}' of pass '{name}' is given twice")
                self.expect("=")
                raw = self.value()
                value = convert_option(name, key, options[key].type, raw)
                given[options[key].field] = value
                texts.append(f"{key}={format_value(value)}")
                if self.peek() == "}":
                    self.pos += 1
                    break
                self.expect(",")
        try:
            instance = cls(**given)
        except (TypeError, ValueError) as err:
            raise PipelineError(f"pass '{name}': {err}") from None
        text = name + ("{" + ",".join(texts) + "}" if texts else "")
        return PipelineEntry(instance, text)
