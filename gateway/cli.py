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
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from gateway import __version__
from gateway.config import Config, LogFormat, LogLevel, load_config
from gateway.errors import BrokerUnavailableError, ConfigError
from gateway.logs import configure_logging, get_logger

if TYPE_CHECKING:
    from gateway import simulator as simulator_types

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


def _demo(args: argparse.Namespace, config: Config) -> int:
    # The demo prints its own progress; logs would drown it, so only warnings show.
    configure_logging("warning", config.log.format)
    if args.walkthrough:
        from gateway import walkthrough  # noqa: PLC0415  (only this command needs it)

        return walkthrough.run(sys.stdout)
    import asyncio  # noqa: PLC0415

    from gateway import demo  # noqa: PLC0415  (only this command needs it)

    settings = demo.DemoSettings(duration_s=args.duration)
    return asyncio.run(demo.run(sys.stdout, settings))


def _register_demo(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "demo",
        help="the whole pipeline on embedded defaults, with faults, in about a minute",
        description="Start the gateway on embedded PostgreSQL and Mosquitto, a simulated "
        "fleet with jams, sensor misses, power losses and an offline machine, a webhook "
        "receiver and a payment load; print progress and a summary; exit 0 only if every "
        "vend was dispensed at most once and ended dispensed, refunded or visibly unknown.",
    )
    parser.add_argument(
        "--duration", type=float, default=60.0, metavar="S", help="seconds of load (default 60)"
    )
    parser.add_argument(
        "--walkthrough",
        action="store_true",
        help="instead, play the wire protocol frame by frame against one reference machine",
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


# ---------------------------------------------------------------------------------------------
# simulate


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text}")
        return value

    return parse


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, got {text}")
    return value


def _broker_address(url: str, source: str) -> tuple[str, int]:
    from urllib.parse import urlsplit  # noqa: PLC0415  (only this command needs it)

    try:
        parts = urlsplit(url)
        port = parts.port or 1883
    except ValueError:
        port = 0
        parts = urlsplit("")
    if parts.scheme != "mqtt" or not parts.hostname or not 0 < port < 65536:
        raise ConfigError(
            f"broker {url!r} is not mqtt://host:port (the simulator speaks plain MQTT only)",
            source=source,
            key="mqtt.url",
        )
    return parts.hostname, port


def _simulate(args: argparse.Namespace, config: Config) -> int:
    import asyncio  # noqa: PLC0415  (only this command needs it)

    from gateway import simulator  # noqa: PLC0415

    if args.broker is not None:
        host, port = _broker_address(args.broker, "--broker")
    elif config.mqtt.url is not None:
        host, port = _broker_address(config.mqtt.url, "configuration")
    else:
        raise ConfigError(
            "no broker to connect to: pass --broker mqtt://host:port or set mqtt.url",
            source="command line",
            key="mqtt.url",
        )
    secret = config.security.master_secret_bytes()
    if secret is None:
        raise ConfigError(
            "security.master_secret (or master_secret_file) is not set; the simulated "
            "machines derive their keys from it",
            source="configuration",
            key="security.master_secret",
        )
    try:
        settings = simulator.FleetSettings(
            broker_host=host,
            broker_port=port,
            master_secret=secret,
            machines=args.machines,
            topic_prefix=config.mqtt.topic_prefix,
            dispense_ms=args.dispense_ms,
            # The default turn is 1.5 s +- 0.5 s; shorter turns keep the same proportion.
            dispense_jitter_ms=min(args.dispense_ms // 3, 500),
            jam_rate=args.jam_rate,
            no_drop_rate=args.no_drop_rate,
            reboot_rate=args.reboot_rate,
            offline=tuple(args.offline),
            seed=args.seed,
            dispense_log=args.dispense_log,
        )
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    try:
        summary = asyncio.run(_run_fleet(settings, args.duration))
    except BrokerUnavailableError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(f"simulate: {summary}")
    return 0


async def _run_fleet(settings: simulator_types.FleetSettings, duration_s: float) -> str:
    import asyncio  # noqa: PLC0415  (only this command needs it)
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    from gateway.simulator import Fleet  # noqa: PLC0415

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Ctrl-C and SIGTERM end the run cleanly (offline presence, summary); signal handlers
    # can only be installed from the main thread.
    handled = (
        (signal.SIGINT, signal.SIGTERM)
        if threading.current_thread() is threading.main_thread()
        else ()
    )
    for signum in handled:
        loop.add_signal_handler(signum, stop.set)
    try:
        async with Fleet(settings) as fleet:
            if duration_s > 0:
                loop.call_later(duration_s, stop.set)
            await fleet.run_until(stop)
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
    return fleet.summary()


def _register_simulate(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "simulate",
        help="run a fleet of simulated vending machines against a broker",
        description="Connect N reference machines (protocols.device), each on its own MQTT "
        "connection, serve the gateway's vends with simulated motors and faults, and print "
        "a one-line summary (motor turns by outcome, vend ids turned more than once).",
    )
    parser.add_argument("--machines", type=_int_at_least(1), default=10, metavar="N")
    parser.add_argument(
        "--duration",
        type=_non_negative,
        default=0.0,
        metavar="S",
        help="seconds to run; 0 (the default) runs until Ctrl-C",
    )
    parser.add_argument(
        "--broker", metavar="mqtt://HOST:PORT", help="the broker (default: mqtt.url)"
    )
    parser.add_argument(
        "--dispense-ms",
        type=_int_at_least(0),
        default=1500,
        metavar="MS",
        help="motor run time per vend",
    )
    parser.add_argument("--jam-rate", type=_rate, default=0.0, help="share of vends that jam")
    parser.add_argument(
        "--no-drop-rate",
        type=_rate,
        default=0.0,
        help="share of vends where the sensor sees no drop",
    )
    parser.add_argument(
        "--reboot-rate",
        type=_rate,
        default=0.0,
        help="share of vends cut short by a power loss (the machine reboots)",
    )
    parser.add_argument(
        "--dispense-log",
        type=Path,
        metavar="PATH",
        help="append every motor turn to this JSON-lines file",
    )
    parser.add_argument(
        "--offline",
        type=_offline_window,
        action="append",
        default=[],
        metavar="INDEX:START_S:DURATION_S",
        help="take machine INDEX (0-based) offline START_S seconds in, for DURATION_S "
        "seconds, abruptly (its will fires); repeatable",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the simulated faults")
    parser.set_defaults(handler=_simulate)


def _offline_window(text: str) -> object:
    from gateway.simulator import OfflineWindow  # noqa: PLC0415

    try:
        index, start, duration = text.split(":")
        return OfflineWindow(int(index), float(start), float(duration))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not INDEX:START_S:DURATION_S (for example 2:10:30)"
        ) from None


# ---------------------------------------------------------------------------------------------
# run, migrate


def _run_gateway(_args: argparse.Namespace, config: Config) -> int:
    import asyncio  # noqa: PLC0415
    import signal  # noqa: PLC0415

    from gateway.app import Gateway  # noqa: PLC0415  (only this command needs the service)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await Gateway(config).run(stop)

    run_loop(serve(), config.runtime.event_loop)
    return 0


def run_loop(main: Coroutine[Any, Any, None], event_loop: str) -> None:
    """Run ``main`` to completion on a new event loop of the kind configured."""
    import asyncio  # noqa: PLC0415  (only the commands that run a loop need it)

    if event_loop == "uvloop":
        try:
            import uvloop  # noqa: PLC0415  (optional at import time)
        except ImportError:
            get_logger("gateway.cli").warning("uvloop_unavailable", fallback="asyncio")
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(main)
            return
    asyncio.run(main)


def _register_run(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "run",
        help="run the gateway until SIGINT or SIGTERM",
        description="Run the gateway. With no database.dsn it starts PostgreSQL from the "
        "pgserver wheel in database.data_dir; with no mqtt.url it starts a private Mosquitto.",
    )
    parser.set_defaults(handler=_run_gateway)


def _migrate(_args: argparse.Namespace, config: Config) -> int:
    import asyncio  # noqa: PLC0415

    from gateway.embedded import EmbeddedPostgres  # noqa: PLC0415
    from gateway.store import db  # noqa: PLC0415

    async def migrate() -> list[int]:
        server = None
        dsn = config.database.dsn
        if dsn is None:
            server = EmbeddedPostgres(config.database.data_dir)
            dsn = await server.start()
        try:
            pool = await db.create_pool(dsn, min_size=1, max_size=1)
            try:
                async with pool.acquire() as conn:
                    return await db.migrate(conn)
            finally:
                await pool.close()
        finally:
            if server is not None:
                await server.stop()

    applied = asyncio.run(migrate())
    print(f"applied migrations: {applied}" if applied else "database schema is up to date")
    return 0


def _register_migrate(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "migrate",
        help="apply pending database migrations and exit",
        description="Apply the versioned SQL migrations (the gateway also does at start-up).",
    )
    parser.set_defaults(handler=_migrate)


# ---------------------------------------------------------------------------------------------
# bench


# Telemetry frames/s the fleet publishes in the mixed profile unless --telemetry-rate says.
MIXED_TELEMETRY_RATE: Final = 1000.0


def _bench(args: argparse.Namespace, config: Config) -> int:
    if args.profile == "telemetry":
        return _bench_telemetry(args, config)
    if args.profile == "storm":
        return _bench_storm(args)
    import asyncio  # noqa: PLC0415

    from gateway import bench  # noqa: PLC0415  (only this command needs it)

    telemetry_rate = args.telemetry_rate
    if telemetry_rate is None:
        telemetry_rate = MIXED_TELEMETRY_RATE if args.profile == "mixed" else 0.0
    settings = bench.BenchSettings(
        machines=50 if args.machines is None else args.machines,
        vends=args.vends,
        rate=args.rate,
        concurrency=args.concurrency,
        dispense_ms=args.dispense_ms,
        jam_rate=args.jam_rate,
        no_drop_rate=args.no_drop_rate,
        reboot_rate=args.reboot_rate,
        deadline_s=args.deadline_s,
        gateways=args.gateways,
        limits=args.limits,
        profile=args.profile,
        telemetry_rate=telemetry_rate,
        telemetry_readings=args.readings,
        broker=config.mqtt.url,
        dsn=config.database.dsn,
        workdir=args.workdir,
        # Gateways 2..N keep their MQTT client ids beside the first one's state folder.
        state_dir=config.database.data_dir.parent,
    )
    result = asyncio.run(bench.run_bench(settings))
    print(bench.summary(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        report = args.json.with_suffix(".md")
        report.write_text(bench.markdown(result), encoding="utf-8")
        print(f"wrote {args.json} and {report}")
    ok = bench.passed(result)
    print("exactly-once: PASS" if ok else "exactly-once: FAIL")
    for problem in bench.telemetry_problems(result.get("telemetry") or {}):
        print(f"{problem}: FAIL")
    # Without power losses every vend must end with an outcome: an unknown vend means the
    # gateway or the fleet stalled (a run once passed with all 4,000 unknown). A power loss
    # mid-turn leaves its vend unknown until an operator resolves it (SPEC §7.3).
    unknown = int(result.get("vends_unknown") or 0) if settings.reboot_rate == 0 else 0
    if unknown:
        print(f"{unknown} vends ended unknown in a run without power losses: FAIL")
    return 0 if ok and not unknown else 1


def _bench_telemetry(args: argparse.Namespace, config: Config) -> int:
    import asyncio  # noqa: PLC0415
    import dataclasses  # noqa: PLC0415

    from gateway import bench_telemetry  # noqa: PLC0415  (only this profile needs it)

    # The gateway runs with this command's telemetry settings, so --set telemetry.* here
    # tunes the gateway under test, and the copy limit uses the same batch size.
    gateway_settings = [
        f"telemetry.{f.name}={getattr(config.telemetry, f.name)}"
        for f in dataclasses.fields(config.telemetry)
    ]
    gateway_settings.append(f"mqtt.topic_prefix={config.mqtt.topic_prefix}")
    settings = bench_telemetry.TelemetrySettings(
        machines=1000 if args.machines is None else args.machines,
        messages=args.messages,
        readings=args.readings,
        publishers=args.publishers,
        window=args.window,
        rate=args.rate,
        settle_timeout_s=args.settle_timeout,
        limits=args.limits,
        inject_loss=args.inject_loss,
        republish=args.republish,
        topic_prefix=config.mqtt.topic_prefix,
        batch_rows=config.telemetry.batch_rows,
        gateway_settings=gateway_settings,
        broker=config.mqtt.url,
        dsn=config.database.dsn,
        workdir=args.workdir,
    )
    if settings.rate is None and settings.messages > bench_telemetry.BROKER_QUEUE:
        print(
            f"{PROG}: warning: more than {bench_telemetry.BROKER_QUEUE} messages at full "
            "speed can overflow the embedded broker's queue for the gateway; pass --rate",
            file=sys.stderr,
        )
    result = asyncio.run(bench_telemetry.run_telemetry(settings))
    print(bench_telemetry.summary(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        report = args.json.with_suffix(".md")
        report.write_text(bench_telemetry.markdown(result), encoding="utf-8")
        print(f"wrote {args.json} and {report}")
    ok = bench_telemetry.passed(result)
    print("exactly-once: PASS" if ok else "exactly-once: FAIL")
    return 0 if ok else 1


def _bench_storm(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415

    from gateway import bench_storm  # noqa: PLC0415  (only this profile needs it)

    settings = bench_storm.StormSettings(
        machines=10_000 if args.machines is None else args.machines,
        api_rps=args.api_rps,
        recover_within_s=args.recover_within_s,
        api_p99_ms=args.api_p99_ms,
        workdir=args.workdir,
    )
    result = asyncio.run(bench_storm.run_storm(settings))
    print(bench_storm.storm_summary(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    ok = bool(result["passed"])
    limits = (
        f"all back within {settings.recover_within_s:g} s, "
        f"API p99 at most {settings.api_p99_ms:g} ms"
    )
    print(f"storm: PASS ({limits})" if ok else f"storm: FAIL ({limits})")
    return 0 if ok else 1


def _register_bench(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "bench",
        help="end-to-end benchmarks (vends, telemetry, mixed) with an exactly-once check",
        description="Run the gateway and its load as separate processes (embedded Mosquitto "
        "and PostgreSQL unless mqtt.url / database.dsn are set). Profile vends: a simulated "
        "fleet and a payment load generator, then check the dispense log against the "
        "database and the webhooks; exits 1 on any duplicate, lost vend or conflict; then the "
        "same load against a bare aiohttp handler, for the HTTP limit, and the MQTT and COPY "
        "limits for telemetry like the fleet's. Profile mixed: vends, while the fleet also "
        "publishes Telemetry frames at --telemetry-rate; every frame must be stored once "
        "(exits 1 otherwise). "
        "Profile telemetry: a generator publishing Telemetry frames for registered machines, "
        "then check every row is stored once, and measure the MQTT and COPY limits in the "
        "same run; exits 1 on any lost, duplicated or altered row. Profile storm: restart "
        "the broker under a connected fleet (10,000 machines by default) while the API is "
        "probed; exits 1 unless every machine is back online in time and the API's p99 "
        "stays within its limit.",
    )
    parser.add_argument(
        "--profile",
        choices=("vends", "mixed", "telemetry", "storm"),
        default="vends",
        help="what to run",
    )
    parser.add_argument(
        "--machines",
        type=int,
        default=None,
        metavar="N",
        help="machines (default 50 for vends and mixed, 1000 for telemetry, 10000 for storm)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        metavar="R",
        help="open loop: vends/s, or telemetry messages/s (default: closed loop for vends, "
        "as fast as possible for telemetry)",
    )
    parser.add_argument("--workdir", type=Path, help="keep logs and data here")
    parser.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="write the result as JSON (vends and telemetry: a Markdown report to PATH.md too)",
    )
    parser.add_argument(
        "--no-limits",
        dest="limits",
        action="store_false",
        help="skip measuring the limits (vends and mixed: a bare aiohttp handler under the same "
        "load, MQTT and COPY; telemetry: MQTT and COPY)",
    )
    vends = parser.add_argument_group("vends profile")
    vends.add_argument("--vends", type=int, default=500, metavar="V")
    vends.add_argument("--concurrency", type=int, default=64, help="closed-loop requests in flight")
    vends.add_argument("--dispense-ms", type=int, default=0, help="simulated motor time")
    for name, what in (
        ("jam", "a jam (not dispensed: refunded)"),
        ("no-drop", "a turn with no drop seen (not dispensed: refunded)"),
        ("reboot", "a power loss mid-turn (the vend stays unknown until resolved)"),
    ):
        vends.add_argument(
            f"--{name}-rate",
            type=_rate,
            default=0.0,
            metavar="P",
            help=f"per dispense, the chance of {what}",
        )
    vends.add_argument("--deadline-s", type=int, default=60, help="deadline of each vend")
    vends.add_argument(
        "--gateways",
        type=_int_at_least(1),
        default=1,
        metavar="N",
        help="gateway processes sharing the broker and database; requests round robin",
    )
    vends.add_argument(
        "--telemetry-rate",
        type=_non_negative,
        default=None,
        metavar="MSGS_PER_S",
        help="Telemetry frames/s the fleet publishes in all, open loop, while the vends run "
        f"(default {MIXED_TELEMETRY_RATE:g} for mixed, 0 for vends)",
    )
    storm = parser.add_argument_group("storm profile")
    storm.add_argument(
        "--api-rps", type=float, default=50.0, help="API probes per second during the storm"
    )
    storm.add_argument(
        "--recover-within-s", type=float, default=30.0, help="every machine back online by then"
    )
    storm.add_argument("--api-p99-ms", type=float, default=1000.0, help="API p99 limit")
    telemetry = parser.add_argument_group("telemetry profile")
    telemetry.add_argument(
        "--messages", type=_int_at_least(1), default=20_000, metavar="N", help="frames to send"
    )
    telemetry.add_argument(
        "--readings",
        type=_int_at_least(1),
        default=4,
        metavar="K",
        help="readings per frame (telemetry, and the fleet's frames in mixed)",
    )
    telemetry.add_argument(
        "--publishers",
        type=_int_at_least(1),
        default=4,
        metavar="P",
        help="MQTT clients in the load generator",
    )
    telemetry.add_argument(
        "--window",
        type=_int_at_least(1),
        default=500,
        metavar="W",
        help="unacknowledged publishes per generator client",
    )
    telemetry.add_argument(
        "--settle-timeout",
        type=_non_negative,
        default=120.0,
        metavar="S",
        help="how long to wait for rows after the last publish",
    )
    telemetry.add_argument(
        "--republish",
        type=_int_at_least(0),
        default=0,
        metavar="N",
        help="publish the first N frames twice (they must still be stored once)",
    )
    telemetry.add_argument(
        "--inject-loss",
        type=_int_at_least(0),
        default=0,
        metavar="N",
        help="testing: count N frames as sent without publishing them (the run must fail)",
    )
    parser.set_defaults(handler=_bench)


_COMMANDS: Final[tuple[Callable[[Subcommands], None], ...]] = (
    _register_bench,
    _register_config,
    _register_demo,
    _register_frame,
    _register_migrate,
    _register_run,
    _register_simulate,
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
