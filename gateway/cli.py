"""The ``vendgate`` command line.

`main` parses the arguments, resolves the configuration once (file < environment < ``--set``
< ``--log-level`` / ``--log-format``), configures logging from it, and runs the handler the
chosen subcommand registered. To add a subcommand, write a ``_register_<name>`` function that
adds a subparser and sets ``handler=`` on it, write the handler, and list the register
function in `_COMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from gateway import __version__
from gateway.config import Config, LogFormat, LogLevel, load_config
from gateway.errors import ConfigError
from gateway.logs import configure_logging

if TYPE_CHECKING:
    # argparse exposes the type of add_subparsers() only under a private name.
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]  # noqa: SLF001

__all__ = ["Handler", "main"]

PROG: Final = "vendgate"
USAGE_ERROR: Final = 2

Handler = Callable[[argparse.Namespace, Config], int]
"""Runs a subcommand with its parsed arguments and the resolved configuration; returns the
exit code."""


# ---------------------------------------------------------------------------------------------
# config show / config check


def _config_show(_args: argparse.Namespace, config: Config) -> int:
    print(json.dumps(config.to_dict(redact=True), indent=2))
    return 0


def _config_check(_args: argparse.Namespace, config: Config) -> int:
    # Loading validated every value; reading the secret file is the one check left.
    config.security.master_secret_bytes()
    print("ok")
    return 0


def _register_config(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "config",
        help="show or check the resolved configuration",
        description="Resolve the configuration (defaults < file < environment < command line).",
    )
    parser.set_defaults(handler=None, parser=parser)
    actions = parser.add_subparsers(title="actions", metavar="ACTION")
    show = actions.add_parser("show", help="print the resolved configuration as JSON, redacted")
    show.set_defaults(handler=_config_show)
    check = actions.add_parser("check", help="validate the configuration; print ok or the error")
    check.set_defaults(handler=_config_check)


# ---------------------------------------------------------------------------------------------
# demo


def _demo(_args: argparse.Namespace, _config: Config) -> int:
    from gateway import demo  # noqa: PLC0415  (only this command needs it)

    return demo.run(sys.stdout)


def _register_demo(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "demo",
        help="play the vend protocol end to end with faults, in one process",
        description="Drive the reference machine through lost acks, lost results, a jam, an "
        "expired vend, a forged frame and a reboot mid-vend, printing every frame.",
    )
    parser.set_defaults(handler=_demo)


# ---------------------------------------------------------------------------------------------
# frame decode


def _frame_decode(args: argparse.Namespace, config: Config) -> int:
    from protocols import codec, jsonform  # noqa: PLC0415  (only this command needs them)
    from protocols.errors import ProtocolError  # noqa: PLC0415

    try:
        data = bytes.fromhex(args.hex)
    except ValueError:
        print(f"{PROG}: error: not a hex string", file=sys.stderr)
        return USAGE_ERROR
    try:
        if args.unverified:
            frame = codec.decode_unverified(data)
        else:
            secret = config.security.master_secret_bytes()
            if secret is None:
                raise ConfigError(
                    "security.master_secret is not set; it is needed to verify a frame "
                    "(or pass --unverified)",
                    source="configuration",
                    key="security.master_secret",
                )
            try:
                key = codec.FrameKey.derive(secret, args.machine_id)
            except ValueError as exc:
                print(f"{PROG}: error: --machine-id: {exc}", file=sys.stderr)
                return USAGE_ERROR
            frame = codec.decode(data, key)
    except ProtocolError as exc:
        print(json.dumps({"error": exc.kind, "detail": str(exc)}))
        return 1
    fields = jsonform.record_to_json(frame)
    print(json.dumps({"type": type(frame).__name__, "verified": not args.unverified, **fields}))
    return 0


def _register_frame(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "frame",
        help="inspect wire frames",
        description="Inspect frames captured from the broker.",
    )
    parser.set_defaults(handler=None, parser=parser)
    actions = parser.add_subparsers(title="actions", metavar="ACTION")
    decode = actions.add_parser(
        "decode",
        help="verify and decode one frame given in hex; print it as JSON",
        description="Verify a frame's MAC with the machine's key (derived from "
        "security.master_secret) and print its fields as JSON; exit 1 if it is refused.",
    )
    decode.add_argument("hex", help="the frame, as hex")
    decode.add_argument("--machine-id", default="", help="the machine the frame belongs to")
    decode.add_argument(
        "--unverified", action="store_true", help="skip the MAC check (diagnostics only)"
    )
    decode.set_defaults(handler=_frame_decode)


_COMMANDS: Final[tuple[Callable[[Subcommands], None], ...]] = (
    _register_config,
    _register_demo,
    _register_frame,
)


# ---------------------------------------------------------------------------------------------
# Entry point


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Gateway between mobile-payment backends and smart vending machines.",
        epilog="Settings come from defaults < --config file < VENDGATE_<SECTION>_<KEY> "
        "environment variables < --set.",
    )
    parser.add_argument(
        "--version", action="version", version=f"{PROG} {__version__}", help="print the version"
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="TOML settings file (default: $VENDGATE_CONFIG)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="SECTION.KEY=VALUE",
        help="override one setting (repeatable), e.g. http.port=0",
    )
    parser.add_argument(
        "--log-level",
        choices=typing.get_args(LogLevel),
        help="shorthand for --set log.level=..., applied last",
    )
    parser.add_argument(
        "--log-format",
        choices=typing.get_args(LogFormat),
        help="shorthand for --set log.format=..., applied last",
    )
    parser.set_defaults(handler=None, parser=parser)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for register in _COMMANDS:
        register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``vendgate`` command line and return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits for --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else USAGE_ERROR if exc.code else 0
    handler: Handler | None = args.handler
    if handler is None:  # a command that needs an action, or no command at all
        args.parser.print_help(sys.stderr)
        return USAGE_ERROR

    overrides = list(args.overrides)
    if args.log_level is not None:
        overrides.append(f"log.level={args.log_level}")
    if args.log_format is not None:
        overrides.append(f"log.format={args.log_format}")
    try:
        config = load_config(path=args.config, environ=os.environ, overrides=overrides)
        configure_logging(config.log.level, config.log.format)
        return handler(args, config)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
