"""Shared CLI plumbing: settings from --config/--set, consoles, the clock."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import cached_property

import click
from rich.console import Console

from ..config import Settings, load_settings
from ..errors import ConfigError

# Piped output (files, CI logs, researchers' scripts) gets wide lines rather than cropped tables.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
console_err = Console(stderr=True, highlight=False)


@dataclass
class AppContext:
    config_path: str | None
    overrides: tuple[str, ...] = field(default_factory=tuple)

    @cached_property
    def settings(self) -> Settings:
        pairs = {}
        for item in self.overrides:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"expected KEY=VALUE, got {item!r}", source="--set")
            pairs[key.strip()] = value.strip()
        return load_settings(self.config_path, overrides=pairs)


pass_app = click.make_pass_decorator(AppContext)


def without_credentials(text: str, url: str) -> str:
    """``text`` with ``url`` (which may carry ``user:password@``) replaced by its public form."""
    from ..alerts.transport import BrokerAddress

    try:
        return text.replace(url, str(BrokerAddress.parse(url)))
    except Exception:  # noqa: BLE001 - an unparsable URL: hide it whole
        return text.replace(url, "the broker")


def id_option(kind: str):  # noqa: ANN201 - a click callback
    """A click callback that checks an option's id(s) with :func:`stresswatch.wire.ids.validate_id`
    before the command runs (``None`` passes: the option was not given)."""
    from ..errors import InvalidId
    from ..wire.ids import validate_id

    def check(ctx: click.Context, param: click.Parameter, value: object) -> object:
        if value is None:
            return None
        try:
            if isinstance(value, tuple):
                return tuple(validate_id(kind, v) for v in value)
            return validate_id(kind, value)  # type: ignore[arg-type]
        except InvalidId as exc:
            raise InvalidId(exc.message, field=param.opts[0] if param.opts else param.name) from None

    return check
