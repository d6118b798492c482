"""The ``hopscope`` command line."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

import click

from hopscope import __version__
from hopscope.errors import HopscopeError

#: subcommand -> "module:attribute". A command's module is imported when the command is
#: looked up, not when ``hopscope`` starts: importing them all (the collector's asyncio,
#: protobuf and Prometheus modules, the agent's doctor) took 0.35 s of every invocation,
#: a fifth of a 220,000-packet ``hopscope replay``.
COMMANDS = {
    "replay": "hopscope.replay_cli:replay",
    "pcap": "hopscope.pcap_cli:pcap",
    "demo": "hopscope.demo:demo",
    "testbed": "hopscope.testbed.cli:testbed",
    "doctor": "hopscope.agent.doctor:doctor",
    "collector": "hopscope.collector.cli:collector",
    "agent": "hopscope.collector.cli:agent",
    "install": "hopscope.install:install",
    "uninstall": "hopscope.install:uninstall",
    "trace": "hopscope.collector.cli:trace",
    "requests": "hopscope.collector.cli:requests",
    "stats": "hopscope.collector.cli:stats",
    "drops": "hopscope.collector.cli:drops",
}


class _Group(click.Group):
    """Turns HopscopeError and ^C into one line on stderr and an exit code (also under
    click's CliRunner, which tests use); loads its subcommands (:data:`COMMANDS`) on
    first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is None and cmd_name in COMMANDS:
            module, attr = COMMANDS[cmd_name].split(":")
            cmd = getattr(importlib.import_module(module), attr)
            assert isinstance(cmd, click.Command)
            self.add_command(cmd, cmd_name)
        return cmd

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HopscopeError as exc:
            click.echo(f"hopscope: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("hopscope: interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:  # `hopscope replay --json ... | head`: the reader had enough
            _quiet_stdout()
            sys.exit(0)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: the interpreter's last flush has nowhere to fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="hopscope")
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-vv for debug).")
def main(verbose: int) -> None:
    """Per-request hop latency for k3s: NIC, UFW, Traefik, kube-proxy, Flannel VXLAN, pod."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def run(argv: list[str] | None = None) -> None:
    """The console entry point: every error is one line on stderr and an exit code."""
    try:
        rv = main.main(args=argv, prog_name="hopscope", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("hopscope: aborted", err=True)
        sys.exit(1)
    except click.exceptions.NoArgsIsHelpError as exc:  # `hopscope`, `hopscope agent`: help
        click.echo(exc.ctx.get_help() if exc.ctx else exc.format_message())
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        hint = "; see --help" if isinstance(exc, click.UsageError) else ""
        click.echo(f"hopscope: {exc.format_message().rstrip('.')}{hint}", err=True)
        sys.exit(exc.exit_code)
    except BrokenPipeError:  # `hopscope replay ... | head`
        _quiet_stdout()
        sys.exit(0)
    sys.exit(rv if isinstance(rv, int) else 0)
