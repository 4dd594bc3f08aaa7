import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import __version__, cli
from gateway.cli import build_parser, main
from gateway.config import REDACTED

SECRET = "0123456789abcdef" * 4
HUNTER = "hunter2"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints "vendgate <version>" and exits 0."""
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"vendgate {__version__}\n"


def test_config_show_applies_layers_and_redacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Config show prints the resolved settings as JSON, overrides applied, secrets hidden."""
    config_file = tmp_path / "vendgate.toml"
    config_file.write_text('[http]\nport = 9000\n[mqtt]\ntopic_prefix = "file"\n', encoding="utf-8")
    monkeypatch.setenv("VENDGATE_MQTT_TOPIC_PREFIX", "env")
    monkeypatch.setenv("VENDGATE_SECURITY_MASTER_SECRET", SECRET)
    code = main(
        [
            "--config",
            str(config_file),
            "--set",
            f"mqtt.password={HUNTER}",
            "--set",
            "log.level=error",
            "--log-level",
            "debug",
            "--log-format",
            "json",
            "config",
            "show",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    shown = json.loads(captured.out)
    assert shown["http"]["port"] == 9000
    assert shown["mqtt"]["topic_prefix"] == "env"
    assert shown["log"] == {"level": "debug", "format": "json"}  # shorthands beat --set
    assert shown["mqtt"]["password"] == REDACTED
    assert shown["security"]["master_secret"] == REDACTED
    assert HUNTER not in captured.out + captured.err
    assert SECRET not in captured.out + captured.err


def test_config_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    """Config check prints ok and exits 0 for a valid configuration."""
    assert main(["config", "check"]) == 0
    assert capsys.readouterr().out == "ok\n"


def test_config_check_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Config check on an invalid value exits 2 with "vendgate: error:" on stderr."""
    code = main(["--set", "mqtt.url=http://broker:1883", "config", "check"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err.startswith("vendgate: error: command line --set mqtt.url=")
    assert "must start with mqtt://" in captured.err
    assert "Traceback" not in captured.err


def test_config_check_reads_the_secret_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Config check also reads the master secret file and reports a missing one."""
    missing = tmp_path / "absent.hex"
    code = main(["--set", f"security.master_secret_file={missing}", "config", "check"])
    assert code == 2
    assert capsys.readouterr().err.startswith(f"vendgate: error: file {missing}:")


def test_environment_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown VENDGATE_ variable is reported on stderr with exit code 2."""
    monkeypatch.setenv("VENDGATE_HTTP_PROT", "1")
    assert main(["config", "show"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vendgate: error: environment VENDGATE_HTTP_PROT:")
    assert "did you mean VENDGATE_HTTP_PORT?" in err


@pytest.mark.parametrize("argv", [[], ["config"]], ids=["no-command", "no-action"])
def test_missing_subcommand(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Without a (sub)command vendgate prints help to stderr and exits 2."""
    assert main(argv) == 2
    assert "usage: vendgate" in capsys.readouterr().err


def test_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown option exits 2 with argparse's usage message."""
    assert main(["--no-such-option", "config", "show"]) == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_help_describes_each_option_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """--help exits 0 and every option has a help text of one line."""
    assert main(["--help"]) == 0
    output = capsys.readouterr().out
    parser = build_parser()
    for action in parser._actions:
        if not action.option_strings:
            continue  # the subcommand list; its entries are checked below
        assert action.help, action.option_strings
        assert "\n" not in action.help
        assert len(action.help) <= 54, action.help  # fits argparse's help column at 80 wide
    for option in ("--version", "--config", "--set", "--log-level", "--log-format"):
        assert option in output
    assert "config              show or check the resolved configuration" in output


def test_console_script() -> None:
    """The installed vendgate console script prints the version and exits 0."""
    script = Path(sys.executable).parent / "vendgate"
    if not script.exists():
        pytest.skip(f"console script not installed at {script}")
    env = {name: value for name, value in os.environ.items() if not name.startswith("VENDGATE_")}
    result = subprocess.run(  # noqa: S603 -- a fixed path to our own script, no shell
        [str(script), "--version"], capture_output=True, text=True, env=env, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"vendgate {__version__}\n"


def test_simulate_offline_windows_parse_and_refuse_nonsense() -> None:
    """--offline takes INDEX:START_S:DURATION_S and names the expected form when wrong."""
    import argparse  # noqa: PLC0415

    from gateway.cli import _offline_window  # noqa: PLC0415
    from gateway.simulator import OfflineWindow  # noqa: PLC0415

    assert _offline_window("2:10:30.5") == OfflineWindow(2, 10.0, 30.5)
    with pytest.raises(argparse.ArgumentTypeError, match="INDEX:START_S:DURATION_S"):
        _offline_window("2:10")


@pytest.mark.parametrize(("kind", "module"), [("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_run_loop_uses_the_configured_event_loop(kind: str, module: str) -> None:
    """runtime.event_loop picks the loop `vendgate run` serves on."""
    seen: list[str] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)

    cli.run_loop(main(), kind)
    assert seen[0].split(".")[0] == module
