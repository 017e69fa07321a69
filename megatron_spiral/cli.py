"""Megatron-style command-line flags generated from dataclasses.

Every config dataclass declares its fields once; this module turns them into an argparse group
(``hidden_size`` -> ``--hidden-size``) with the field's ``metadata["help"]`` as help text, and back.
There is no global argument object: callers get plain dataclass instances.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Iterable, Optional, Type, TypeVar

T = TypeVar("T")


def flag_name(field_name: str) -> str:
    """``seq_length`` -> ``--seq-length`` (Megatron spelling)."""
    return "--" + field_name.replace("_", "-")


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_dataclass_arguments(
    parser: argparse.ArgumentParser,
    cls: Type[Any],
    title: str,
    description: Optional[str] = None,
    skip: Iterable[str] = (),
    defaults_to_none: bool = False,
) -> argparse._ArgumentGroup:
    """Add one flag per dataclass field to a new argument group.

    With ``defaults_to_none`` every flag defaults to ``None`` so a caller can tell which flags the
    user gave explicitly (used to let explicit flags override a preset).
    Fields may set ``metadata={"help": ..., "choices": [...], "flag": "--other-name",
    "cli": False}``.
    """
    group = parser.add_argument_group(title, description)
    hints = typing.get_type_hints(cls)
    skip = set(skip)
    for field in dataclasses.fields(cls):
        meta = field.metadata
        if field.name in skip or meta.get("cli") is False or field.name.startswith("_"):
            continue
        tp = _unwrap_optional(hints[field.name])
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = field.default_factory()  # type: ignore[misc]
        else:
            default = None
        help_text = meta.get("help", "")
        shown_default = default
        if defaults_to_none:
            default = None
        if help_text and shown_default is not None and "%(default)" not in help_text:
            help_text += f" (default: {shown_default})"
        kwargs: dict = {"dest": field.name, "help": help_text, "default": default}
        names = [meta.get("flag", flag_name(field.name))]
        if tp is bool and field.name.startswith("no_"):
            # Megatron's negative flags (--no-load-optim): BooleanOptionalAction would read any
            # "--no-..." spelling as False, i.e. ignore the flag.
            kwargs["action"] = "store_true"
        elif tp is bool:
            # --flag / --no-flag, as Megatron users expect both spellings to work.
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (list, tuple):
            inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
            kwargs["nargs"] = "+"
            kwargs["type"] = inner
        else:
            kwargs["type"] = tp if tp in (int, float, str) else str
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        group.add_argument(*names, **kwargs)
    return group


def explicit_overrides(args: argparse.Namespace, cls: Type[Any]) -> dict:
    """Fields of ``cls`` whose flag the user gave (requires ``defaults_to_none=True``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def dataclass_from_args(cls: Type[T], args: argparse.Namespace, **extra: Any) -> T:
    """Instantiate ``cls`` from the parsed flags (fields missing from ``args`` keep defaults)."""
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if f.init and hasattr(args, f.name) and getattr(args, f.name) is not None
    }
    values.update(extra)
    return cls(**values)
