"""``--config FILE``: a command's options from a TOML file (one file per role).

The systemd units run ``hopscope agent run --config /etc/hopscope/agent.toml``
and ``hopscope collector serve --config /etc/hopscope/collector.toml``
(``systemd/*.toml.example`` document every key with its default).

* Keys are the command's long option names without the dashes in front
  (``token-file``, ``entry-port``, ``collector``); ``token_file`` is the same
  key (giving both is an error). Values are TOML strings, integers, booleans,
  or arrays for repeatable options; a repeatable ``NAME=VALUE`` option
  (``iface``, ``otlp-header``) also takes a table (``iface = { eth0 = "nic" }``).
* The file gives defaults: an option given on the command line wins.
* In the values of path options, ``$VAR`` and ``${VAR}`` are replaced from the
  environment when the option is used (so that ``token-file =
  "${CREDENTIALS_DIRECTORY}/token"`` reads the credential systemd's
  ``LoadCredential=`` hands the service).
* An unknown key, a value of the wrong type (``true`` for a number, ``1.5``
  for an integer), a file that is not TOML: one error line naming the file and
  the key.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable
from typing import Any, TypeVar

import click

from hopscope.errors import UsageError

F = TypeVar("F", bound=Callable[..., Any])

#: options that are not configuration
NOT_KEYS = frozenset({"config", "help", "ready_file"})

_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def option_keys(command: click.Command) -> dict[str, click.Option]:
    """TOML key -> option: every visible long option of ``command`` (``--token-file`` is
    ``token-file``)."""
    out: dict[str, click.Option] = {}
    for p in command.params:
        if not isinstance(p, click.Option) or p.name in NOT_KEYS or p.hidden:
            continue
        for o in p.opts:
            if o.startswith("--"):
                out[o[2:]] = p
    return out


def expand_vars(value: str, where: str) -> str:
    """``$VAR``/``${VAR}`` replaced from the environment; an unset one is an error."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        val = os.environ.get(name)
        if val is None:
            hint = (" (systemd sets it for a unit with LoadCredential=; outside the unit give "
                    "the file's path)") if name == "CREDENTIALS_DIRECTORY" else ""
            raise UsageError(f"{where}: ${name} is not set{hint}")
        return val

    return _VAR.sub(sub, value)


def _kind(opt: click.Option) -> str:
    """What a value of ``opt`` must be, as the error says it."""
    if isinstance(opt.type, click.types.IntParamType):
        return "an integer"
    if isinstance(opt.type, click.types.FloatParamType):
        return "a number"
    return "a string"


def _scalar(path: str, key: str, opt: click.Option, x: Any) -> Any:
    """One TOML value for ``opt``: a boolean only for a flag, an integer (not a float,
    which click would truncate) for an integer option."""
    if isinstance(x, bool) and not opt.is_flag:
        raise UsageError(f"{path}: {key}: expected {_kind(opt)}, not {str(x).lower()}")
    if isinstance(x, float) and isinstance(opt.type, click.types.IntParamType):
        raise UsageError(f"{path}: {key}: expected an integer, not {x!r}")
    return x if isinstance(x, (bool, int, float)) else str(x)


def _shape(path: str, key: str, opt: click.Option, value: Any) -> Any:
    """The TOML value in the shape click expects for ``opt`` (not yet converted)."""
    if isinstance(value, dict):
        if not opt.multiple:
            raise UsageError(f"{path}: {key}: a table is not a value of --{key}")
        value = [f"{k}={v}" for k, v in value.items()]
    if opt.multiple:
        items = value if isinstance(value, list) else [value]
        if any(isinstance(x, (dict, list)) for x in items):
            raise UsageError(f"{path}: {key}: expected an array of values")
        return [_scalar(path, key, opt, x) for x in items]
    if isinstance(value, list):
        raise UsageError(f"{path}: {key}: takes one value, not an array")
    if opt.is_flag and not isinstance(value, bool):
        raise UsageError(f"{path}: {key}: expected true or false, not {value!r}")
    return _scalar(path, key, opt, value)


def load_config(ctx: click.Context, path: str) -> dict[str, Any]:
    """The default map for ``ctx.command`` from the TOML file ``path``."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"--config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: not UTF-8 text (byte {exc.start})") from None
    keys = option_keys(ctx.command)
    out: dict[str, Any] = {}
    seen: dict[str, str] = {}  # option name -> the key that set it
    for raw_key, raw in data.items():
        key = raw_key.replace("_", "-")
        opt = keys.get(key)
        if opt is None or opt.name is None:
            near = difflib.get_close_matches(key, list(keys), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise UsageError(f"{path}: unknown key {raw_key!r}{hint}; the keys are the options "
                             f"of `{ctx.command_path}`: {', '.join(sorted(keys))}")
        if opt.name in seen:
            raise UsageError(f"{path}: {seen[opt.name]!r} and {raw_key!r} are the same key: "
                             "keep one")
        seen[opt.name] = raw_key
        value = _shape(path, raw_key, opt, raw)
        if isinstance(opt.type, click.Path) and isinstance(value, str) and _VAR.search(value):
            # expanded when used: a command-line flag may replace it
            out[opt.name] = _deferred(value, f"{path}: {raw_key}")
            continue
        try:
            opt.type_cast_value(ctx, value)
        except click.BadParameter as exc:
            raise UsageError(f"{path}: {raw_key} = {raw!r}: {exc.message}") from None
        out[opt.name] = value
    return out


def _deferred(value: str, where: str) -> Callable[[], str]:
    return lambda: expand_vars(value, where)


def _on_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is None:
        return
    ctx.default_map = {**(ctx.default_map or {}), **load_config(ctx, value)}


def config_option(f: F) -> F:
    """Add ``--config FILE`` to a click command (read before its other options)."""
    deco = click.option(
        "--config", "config", type=click.Path(dir_okay=False), default=None, is_eager=True,
        expose_value=False, callback=_on_config, metavar="FILE",
        help="Read options from this TOML file (keys: the long option names, e.g. "
             "token-file); options on the command line win.")
    return deco(f)
