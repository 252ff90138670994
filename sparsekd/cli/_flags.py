"""Command-line flags generated from the pydantic stage configs: names, types, defaults and help live once.

A field ``max_new_tokens`` becomes ``--max-new-tokens``. Its annotation gives the parser: int, float, str; a
``Literal``'s values shown as ``{a,b}`` and checked by the config like a value from the YAML (so the error names the
field: ``eval.protocol='x': Input should be 'paper' or 'standard'``); a comma-separated list for ``list[int]``; a
bool is a switch, ``store_true`` when it is off by default, ``--x/--no-x`` otherwise. The field's ``description``
and its default give the help, ``"<description> (default <value>)"``. Every flag keeps ``default=None``: "not
given" stays distinguishable, so the --config YAML and then the config's own default apply (``_common.sections``).
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined


@dataclass(frozen=True)
class Section:
    """Flags for fields of one stage config, and the section of the --config YAML that they override."""

    name: str  # the YAML section (and the prefix of error messages: "eval.ctx=...")
    config: type[BaseModel]
    fields: tuple[str, ...] | None = None  # the fields that get a flag, in this order (None: all of them)
    label: str = ""  # help prefix for a flag that applies to one kind of run only, e.g. "gsm8k"

    def flag_fields(self) -> tuple[str, ...]:
        return tuple(self.config.model_fields) if self.fields is None else self.fields


@dataclass(frozen=True)
class Flag:
    """How one field's flag departs from the generated one (a verb's own spelling or syntax)."""

    name: str | None = None  # e.g. "--student" for model.model
    dest: str | None = None  # e.g. "models" for profile's repeated --model
    type: Callable[[str], Any] | None = None  # a custom parser, e.g. --target-reduction's list of rounds
    action: str | None = None  # e.g. "append"
    metavar: str | None = None
    note: str = ""  # command-line syntax the field does not know, appended to the help


@dataclass
class Backing:
    """The config fields behind a generated flag (read by tests/test_cli_flags.py)."""

    fields: list[tuple[str, type[BaseModel], str]] = field(default_factory=list)  # (label, config, field name)
    note: str = ""


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def default_text(config: type[BaseModel], name: str) -> str | None:
    """The field's default as a user types it, or None when there is none to state (a required field, or None,
    whose meaning the description says)."""
    default = config.model_fields[name].default
    if default is PydanticUndefined or default is None:
        return None
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, (list, tuple)):
        return ",".join(str(v) for v in default)
    return str(default)


def field_help(config: type[BaseModel], name: str, label: str = "") -> str:
    """``"[label: ]<description> (default <value>)"``: the help of a flag, without argparse's %-escaping."""
    info = config.model_fields[name]
    if not info.description:
        raise ValueError(f"{config.__name__}.{name} has no description= to make its flag's help from")
    default = default_text(config, name)
    return (f"{label}: " if label else "") + info.description + (f" (default {default})" if default else "")


def render_help(backing: Backing) -> str:
    """The help of a generated flag, %-escaped for argparse: each backing field's help, then the note."""
    return ("; ".join(field_help(config, name, label) for label, config, name in backing.fields)
            + backing.note).replace("%", "%%")


def _plain(annotation: Any) -> Any:
    """The annotation without ``| None`` (a flag that is not given is None anyway) and without ``Annotated``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            annotation = args[0]
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def int_list(flag: str) -> Callable[[str], list[int]]:
    """Parser of a comma-separated list of integers (``1,16,64``) for ``flag``."""
    def parse(text: str) -> list[int]:
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes comma-separated integers, got {text!r}") from None

    return parse


def _parser_kwargs(config: type[BaseModel], name: str, flag: str) -> dict[str, Any]:
    """add_argument keywords for the field's type."""
    info = config.model_fields[name]
    annotation = _plain(info.annotation)
    if typing.get_origin(annotation) is Literal:  # shown as {a,b}; checked by the config, whose error names the field
        choices = typing.get_args(annotation)
        return {"type": type(choices[0]), "metavar": "{" + ",".join(str(c) for c in choices) + "}"}
    if annotation is bool:
        return {"action": "store_true" if info.default is False else argparse.BooleanOptionalAction}
    if typing.get_origin(annotation) is list and typing.get_args(annotation) == (int,):
        return {"type": int_list(flag)}
    if annotation in (int, float, str):
        return {"type": annotation}
    raise TypeError(f"{config.__name__}.{name}: no command-line form for {info.annotation!r}; give a Flag(type=...)")


def add_section_flags(parser: argparse.ArgumentParser, sections: tuple[Section, ...],
                      overrides: dict[str, Flag] | None = None) -> None:
    """Add a flag for every field of ``sections`` (``overrides`` by field name). A field name that several sections
    share (eval's batch_size: windows, or GSM8K problems) is one flag whose help lists each."""
    overrides = overrides or {}
    by_dest = {a.dest: a for a in parser._actions}
    for section in sections:
        for name in section.flag_fields():
            spec = overrides.get(name, Flag())
            dest = spec.dest or name
            if dest in by_dest:  # shared: one flag, both fields' help
                action = by_dest[dest]
                action.backing.fields.append((section.label, section.config, name))
                action.help = render_help(action.backing)
                continue
            flag = spec.name or flag_name(name)
            kwargs = _parser_kwargs(section.config, name, flag)
            if spec.type is not None:
                kwargs["type"] = spec.type
            if spec.action is not None:
                kwargs = {"action": spec.action, **{k: v for k, v in kwargs.items() if k != "action"}}
            if spec.metavar is not None:
                kwargs["metavar"] = spec.metavar
            backing = Backing([(section.label, section.config, name)], spec.note)
            action = parser.add_argument(flag, dest=dest, default=None, help=render_help(backing), **kwargs)
            action.backing = backing
            by_dest[dest] = action


def section_names(sections: tuple[Section, ...]) -> str:
    return "/".join(s.name for s in sections)
