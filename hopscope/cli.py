"""The ``hopscope`` command line."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from hopscope import __version__
from hopscope.errors import HopscopeError


class _Group(click.Group):
    """Turns HopscopeError and ^C into one line on stderr and an exit code (also under
    click's CliRunner, which tests use)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HopscopeError as exc:
            click.echo(f"hopscope: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("hopscope: interrupted", err=True)
            sys.exit(130)


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
    except click.ClickException as exc:
        hint = "; see --help" if isinstance(exc, click.UsageError) else ""
        click.echo(f"hopscope: {exc.format_message().rstrip('.')}{hint}", err=True)
        sys.exit(exc.exit_code)
    except BrokenPipeError:  # `hopscope replay ... | head`
        sys.exit(0)
    sys.exit(rv if isinstance(rv, int) else 0)


def _register() -> None:
    from hopscope.agent.doctor import doctor
    from hopscope.collector.cli import QUERY_COMMANDS, agent, collector
    from hopscope.demo import demo
    from hopscope.install import install, uninstall
    from hopscope.pcap_cli import pcap
    from hopscope.replay_cli import replay
    from hopscope.testbed.cli import testbed

    main.add_command(replay)
    main.add_command(pcap)
    main.add_command(demo)
    main.add_command(testbed)
    main.add_command(doctor)
    main.add_command(collector)
    main.add_command(agent)
    main.add_command(install)
    main.add_command(uninstall)
    for cmd in QUERY_COMMANDS:
        main.add_command(cmd)


_register()
