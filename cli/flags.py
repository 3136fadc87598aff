"""One flag per configuration field, from either kind of configuration r2m has: the service's pydantic settings
(`ServiceSettings`, every field also an `R2M_*` variable) and the trainer's dataclass (`TrainConfig`). The field's
own description is the flag's help, so `--help` and the configuration never drift apart."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Flag", "add_flags", "config_flags", "dest_values", "flag_name", "setting_default", "settings_flags"]

SECRETS = frozenset({"api_key"})  # come from the environment, never from argv (visible in `ps`)


@dataclass(frozen=True)
class Flag:
    name: str  # the field name; the flag is `--name-with-dashes`
    annotation: Any
    help: str
    required: bool = False


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def setting_default(field: Any) -> str:
    """A pydantic field's default as its variable would spell it (`true`, not `True`)."""
    if field.default_factory is not None:
        return "computed, see above"
    return str(field.default).lower() if isinstance(field.default, bool) else str(field.default)


def settings_flags(settings_cls: Any, env_prefix: str, names: Iterable[str] | None = None) -> Iterator[Flag]:
    """The fields of a pydantic-settings class (those in `names`, in that order, when given); values stay strings
    (but for a Literal's choices and a bool's --x/--no-x) for pydantic to parse and check, as it does the `R2M_*`
    variables."""
    fields = settings_cls.model_fields
    for name in fields if names is None else names:
        field = fields[name]
        if name not in SECRETS:
            typed = typing.get_origin(field.annotation) is typing.Literal or field.annotation is bool
            text = f"{field.description} [env {env_prefix}{name.upper()}; default {setting_default(field)}]"
            yield Flag(name, field.annotation if typed else str, text)


def config_flags(config_cls: Any) -> Iterator[Flag]:
    """The init fields of a dataclass whose fields carry `metadata={"help": ...}`."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.init and f.name not in SECRETS:
            missing = f.default is dataclasses.MISSING
            text = f.metadata["help"] + ("" if missing or f.default is None else f" [default: {f.default}]")
            yield Flag(f.name, hints[f.name], text, required=missing)


def add_flags(parser: argparse._ActionsContainer, flags: Iterable[Flag]) -> None:
    """`--name` for each flag, default None (so an unset flag leaves the field's own default or variable alone), on a
    parser or one of its argument groups."""
    for flag in flags:
        kind = flag.annotation
        if kind is bool:
            parser.add_argument(
                flag_name(flag.name), dest=flag.name, default=None, action=argparse.BooleanOptionalAction,
                help=flag.help,
            )  # fmt: skip
            continue
        args = typing.get_args(kind)
        choices = args if typing.get_origin(kind) is typing.Literal else None
        base = next((t for t in (int, float, str) if kind is t or t in args), str)  # a Literal's: str
        parser.add_argument(
            flag_name(flag.name),
            dest=flag.name,
            type=base,
            default=None,
            choices=choices,
            required=flag.required,
            metavar=None if choices else flag.name.upper(),
            help=flag.help,
        )


def dest_values(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The flags among `names` that were given."""
    wanted = set(names)
    return {k: v for k, v in vars(args).items() if k in wanted and v is not None}
