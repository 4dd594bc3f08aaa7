"""Configuration: one frozen tree, resolved once at start-up and passed down.

Layers, lowest precedence first: defaults < TOML file < ``VENDGATE_*`` environment < command
line (``--set section.key=value``). Every setting is declared once, below, as a dataclass field
whose metadata says how to check it and whether to hide it; the loader, the validator, the
error messages and `Config.to_dict` all read that one declaration. Unknown sections and keys are
an error at every layer. There is no global configuration object: `load_config` returns a
`Config` and the caller passes it (or the section a component needs) down.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from gateway.errors import ConfigError

__all__ = [
    "ENV_CONFIG_FILE",
    "ENV_PREFIX",
    "REDACTED",
    "Config",
    "DatabaseConfig",
    "HttpConfig",
    "LogConfig",
    "LogFormat",
    "LogLevel",
    "MqttConfig",
    "SecurityConfig",
    "VendConfig",
    "WebhookConfig",
    "load_config",
    "mqtt_address",
]

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]
EventLoop = Literal["uvloop", "asyncio"]

ENV_PREFIX: Final = "VENDGATE_"
ENV_CONFIG_FILE: Final = "VENDGATE_CONFIG"
REDACTED: Final = "***"

_DEFAULTS: Final = "defaults"
_META: Final = "vendgate"
_T = TypeVar("_T")

# A check gets a value of the field's type (never None) and returns a problem, or None if the
# value is fine. The problem is phrased to follow "<key>=<value>: ", which the caller writes so
# that secrets are redacted in one place.
_Check = Callable[[Any], str | None]
_Redact = Callable[[str], str]


# ---------------------------------------------------------------------------------------------
# Checks and redaction, referenced from the field declarations below


def _between(low: float, high: float) -> _Check:
    def check(value: float) -> str | None:
        return None if low <= value <= high else f"must be between {low} and {high}"

    return check


def _at_least(low: float) -> _Check:
    def check(value: float) -> str | None:
        return None if value >= low else f"must be at least {low}"

    return check


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _not_empty(value: str) -> str | None:
    return None if value else "must not be empty"


def _topic_level(value: str) -> str | None:
    # One topic level, used verbatim in topic names and in $share/<group>/... filters.
    # MQTT 5 §4.7.1: '/' separates levels and '+' / '#' are wildcards; §4.8.2: a ShareName
    # must not contain any of them; §1.5.4: no U+0000; §4.7.2: '$' starts server topics.
    if not value:
        return "must not be empty"
    if bad := sorted(set(value) & set("/+#\0")):
        return f"must be a single MQTT topic level without {', '.join(map(repr, bad))}"
    if value.startswith("$"):
        return "must not start with '$' (reserved for broker topics, MQTT 5 §4.7.2)"
    return None


def _mqtt_url(value: str) -> str | None:
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return "is not a valid URL (expected mqtt://host:port or mqtts://host:port)"
    if parts.scheme not in ("mqtt", "mqtts"):
        return "must start with mqtt:// or mqtts://"
    if not parts.hostname:
        return "must name a host (mqtt://host:port)"
    if port == 0:
        return "must have a port between 1 and 65535"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials; set mqtt.username and mqtt.password instead"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "must be only mqtt://host:port (no path, query or fragment)"
    return None


def mqtt_address(url: str) -> tuple[str, int]:
    """Return (host, port) of an ``mqtt://`` or ``mqtts://`` URL; port 1883 when none is given."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 1883


def _http_url(value: str) -> str | None:
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return "is not a valid URL (expected http://host/path or https://host/path)"
    if parts.scheme not in ("http", "https"):
        return "must start with http:// or https://"
    if not parts.hostname:
        return "must name a host (https://host/path)"
    if port == 0:
        return "must have a port between 1 and 65535"
    return None


def _postgres_dsn(value: str) -> str | None:
    if value.startswith(("postgresql://", "postgres://")):
        return None
    return "must start with postgresql:// or postgres://"


_HEX: Final = re.compile(r"[0-9a-fA-F]*")
_MIN_SECRET_BYTES: Final = 32


def _hex_secret(value: str) -> str | None:
    # Never quote the value: this text ends up in error messages.
    if not _HEX.fullmatch(value):
        return "must be hexadecimal digits only"
    if len(value) % 2:
        return "must have an even number of hex digits"
    if len(value) < 2 * _MIN_SECRET_BYTES:
        return f"must be at least {2 * _MIN_SECRET_BYTES} hex digits ({_MIN_SECRET_BYTES} bytes)"
    return None


def _min_length(low: int) -> _Check:
    def check(value: str) -> str | None:
        # Never quote the value: secrets use this check and the text ends up in errors.
        return None if len(value) >= low else f"must be at least {low} characters long"

    return check


def _hide(_value: str) -> str:
    return REDACTED


def _hide_url_password(value: str) -> str:
    # DSNs and broker URLs may carry user:password@; show everything but the password.
    try:
        parts = urlsplit(value)
        password = parts.password
    except ValueError:
        return REDACTED  # cannot tell where a password would be, so hide it all
    if password is None:
        return value
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    netloc = f"{user}:{REDACTED}@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True, slots=True)
class _Meta:
    check: _Check | None = None
    redact: _Redact | None = None


def _meta(*, check: _Check | None = None, redact: _Redact | None = None) -> dict[str, _Meta]:
    """Field metadata for a setting: how to check it and how to hide it when shown."""
    return {_META: _Meta(check=check, redact=redact)}


@dataclass(frozen=True, slots=True)
class _Rule:
    """A check over several settings of one section (given in `keys` order)."""

    keys: tuple[str, ...]
    check: Callable[..., str | None]


def _not_above(low: str, high: str) -> _Rule:
    def check(low_value: float, high_value: float) -> str | None:
        return None if low_value <= high_value else f"{low} must not exceed {high}"

    return _Rule((low, high), check)


def _only_one(first: str, second: str) -> _Rule:
    def check(first_value: object, second_value: object) -> str | None:
        if first_value is not None and second_value is not None:
            return f"set {first} or {second}, not both"
        return None

    return _Rule((first, second), check)


def _needed_with(needed: str, given: str) -> _Rule:
    def check(needed_value: object, given_value: object) -> str | None:
        if given_value is not None and needed_value is None:
            return f"{needed} is required when {given} is set"
        return None

    return _Rule((needed, given), check)


_ONE_SECRET: Final = _only_one("master_secret", "master_secret_file")


# ---------------------------------------------------------------------------------------------
# The configuration tree


class _Section:
    """Base of the section dataclasses: validates every instance, however it was made."""

    __slots__ = ()
    section: ClassVar[str]
    rules: ClassVar[tuple[_Rule, ...]] = ()

    def __post_init__(self) -> None:
        values = {name: getattr(self, name) for name in _KEYS[self.section]}
        _validate(self.section, values, {}, f"{type(self).__name__}()")


@dataclass(frozen=True, slots=True)
class LogConfig(_Section):
    """Logging: the least severe level written, and the output format."""

    section: ClassVar[str] = "log"

    level: LogLevel = "info"
    # "auto" writes JSON when stderr is not a terminal, and pretty lines when it is.
    format: LogFormat = "auto"


@dataclass(frozen=True, slots=True)
class RuntimeConfig(_Section):
    """How the service process runs."""

    section: ClassVar[str] = "runtime"

    # uvloop (libuv, in C) runs the same asyncio code with cheaper transports and callbacks:
    # measured 15 % less gateway CPU per vend (benchmarks/RESULTS.md). "asyncio" is the
    # standard library's loop, for debugging or where uvloop does not install.
    event_loop: EventLoop = "uvloop"


@dataclass(frozen=True, slots=True)
class MqttConfig(_Section):
    """The MQTT broker connection; no URL means an embedded private Mosquitto."""

    section: ClassVar[str] = "mqtt"

    url: str | None = field(
        default=None, metadata=_meta(check=_mqtt_url, redact=_hide_url_password)
    )
    client_id: str | None = field(default=None, metadata=_meta(check=_not_empty))  # None: generated
    topic_prefix: str = field(default="vg", metadata=_meta(check=_topic_level))
    shared_group: str = field(default="vendgate", metadata=_meta(check=_topic_level))
    keepalive_s: int = field(default=30, metadata=_meta(check=_between(5, 3600)))
    # MQTT 5 Receive Maximum: QoS 1 messages the broker may have in flight to us, unacknowledged.
    # Each waits for its handler (telemetry: for its commit), so this bounds the throughput at
    # about receive_maximum / (telemetry.max_age_s + commit time).
    receive_maximum: int = field(default=4000, metadata=_meta(check=_between(1, 65535)))
    username: str | None = None
    password: str | None = field(default=None, metadata=_meta(redact=_hide))


@dataclass(frozen=True, slots=True)
class DatabaseConfig(_Section):
    """The PostgreSQL connection; no DSN means an embedded server from the pgserver wheel."""

    section: ClassVar[str] = "database"
    rules: ClassVar[tuple[_Rule, ...]] = (
        _not_above("pool_min", "pool_max"),
        _not_above("writers", "pool_max"),
    )

    dsn: str | None = field(
        default=None, metadata=_meta(check=_postgres_dsn, redact=_hide_url_password)
    )
    data_dir: Path = Path(".vendgate/pgdata")
    pool_min: int = field(default=2, metadata=_meta(check=_at_least(1)))
    pool_max: int = field(default=10, metadata=_meta(check=_at_least(1)))
    # Group-commit loops, each committing its own batches on its own pool connection.
    writers: int = field(default=2, metadata=_meta(check=_between(1, 16)))


@dataclass(frozen=True, slots=True)
class HttpConfig(_Section):
    """The HTTP API listener; port 0 picks a free port."""

    section: ClassVar[str] = "http"

    host: str = field(default="127.0.0.1", metadata=_meta(check=_not_empty))
    port: int = field(default=8080, metadata=_meta(check=_between(0, 65535)))


@dataclass(frozen=True, slots=True)
class SecurityConfig(_Section):
    """The master secret that machine keys derive from, inline (hex) or in a file."""

    section: ClassVar[str] = "security"
    rules: ClassVar[tuple[_Rule, ...]] = (_ONE_SECRET,)

    master_secret: str | None = field(default=None, metadata=_meta(check=_hex_secret, redact=_hide))
    master_secret_file: Path | None = None

    def master_secret_bytes(self) -> bytes | None:
        """Return the master secret, read from the file if need be; None when neither is set."""
        key = "security.master_secret_file"
        if problem := _ONE_SECRET.check(self.master_secret, self.master_secret_file):
            raise ConfigError(problem, "security settings", "security.master_secret")
        if self.master_secret is not None:
            return bytes.fromhex(self.master_secret)
        if self.master_secret_file is None:
            return None
        source = f"file {self.master_secret_file}"
        try:
            raw = self.master_secret_file.read_bytes()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConfigError(
                f"{key}: cannot read the master secret: {reason}", source, key
            ) from None
        # Non-ASCII bytes become U+FFFD, which the hex check rejects without echoing them.
        text = raw.decode("ascii", errors="replace").strip()
        if problem := _hex_secret(text):
            raise ConfigError(f"{key}: the master secret in the file {problem}", source, key)
        return bytes.fromhex(text)


@dataclass(frozen=True, slots=True)
class VendConfig(_Section):
    """Vend timing: deadlines, allowed clock skew, and the retry backoff schedule."""

    section: ClassVar[str] = "vend"
    rules: ClassVar[tuple[_Rule, ...]] = (
        _not_above("default_deadline_s", "max_deadline_s"),
        _not_above("retry_base_s", "retry_cap_s"),
    )

    default_deadline_s: int = field(default=60, metadata=_meta(check=_between(5, 3600)))
    max_deadline_s: int = field(default=600, metadata=_meta(check=_between(5, 3600)))
    clock_skew_s: int = field(default=5, metadata=_meta(check=_between(0, 60)))
    retry_base_s: float = field(default=0.5, metadata=_meta(check=_positive))
    retry_cap_s: float = field(default=8.0, metadata=_meta(check=_positive))


@dataclass(frozen=True, slots=True)
class WebhookConfig(_Section):
    """Signed webhooks to the payment backend; no URL means events wait in the outbox."""

    section: ClassVar[str] = "webhook"
    rules: ClassVar[tuple[_Rule, ...]] = (
        _needed_with("secret", "url"),
        _not_above("retry_base_s", "retry_cap_s"),
    )

    # None: deliver nowhere; events still accumulate in the outbox until a URL is set.
    url: str | None = field(
        default=None, metadata=_meta(check=_http_url, redact=_hide_url_password)
    )
    # The HMAC-SHA256 key of the Vendgate-Signature header, shared with the receiver.
    secret: str | None = field(default=None, metadata=_meta(check=_min_length(16), redact=_hide))
    timeout_s: float = field(default=5.0, metadata=_meta(check=_between(0.1, 300)))
    retry_base_s: float = field(default=1.0, metadata=_meta(check=_positive))
    retry_cap_s: float = field(default=300.0, metadata=_meta(check=_positive))
    # Deliveries in flight at once. Each claim takes up to half of them in one statement: at 8
    # the claims, marks and their round trips cost about a fifth more gateway CPU per vend
    # than at 32 (measured, 1,000 machines, 8,000 vends: 1,315 / 1,317 against 947 / 1,191 µs).
    concurrency: int = field(default=32, metadata=_meta(check=_between(1, 1024)))
    poll_interval_s: float = field(default=1.0, metadata=_meta(check=_between(0.01, 3600)))


@dataclass(frozen=True, slots=True)
class SessionsConfig(_Section):
    """Machine presence: when a silent machine counts as gone, and how often presence is saved."""

    section: ClassVar[str] = "sessions"
    rules: ClassVar[tuple[_Rule, ...]] = ()

    # No frame for this long ends the session ("heartbeat_timeout"). Machines send a heartbeat
    # every 30 s (SPEC §9), so the default tolerates two lost heartbeats before flapping.
    heartbeat_timeout_s: float = field(default=75.0, metadata=_meta(check=_between(1, 86400)))
    heartbeat_interval_s: float = field(default=30.0, metadata=_meta(check=_between(1, 3600)))
    flush_interval_s: float = field(default=1.0, metadata=_meta(check=_between(0.01, 60)))


@dataclass(frozen=True, slots=True)
class TelemetryConfig(_Section):
    """Telemetry ingest: COPY batches flushed on size or age, daily partitions, retention."""

    section: ClassVar[str] = "telemetry"
    rules: ClassVar[tuple[_Rule, ...]] = ()

    batch_rows: int = field(default=5000, metadata=_meta(check=_between(1, 1_000_000)))
    max_age_s: float = field(default=0.05, metadata=_meta(check=_between(0.001, 60)))
    # Messages waiting for a commit; beyond it the MQTT handler waits (and so does the broker).
    queue_messages: int = field(default=20_000, metadata=_meta(check=_between(1, 10_000_000)))
    retention_days: int = field(default=30, metadata=_meta(check=_between(1, 3650)))
    maintenance_interval_s: float = field(default=3600.0, metadata=_meta(check=_between(1, 86400)))


@dataclass(frozen=True, slots=True)
class PlanogramConfig(_Section):
    """Planogram sync and slot health."""

    section: ClassVar[str] = "planogram"
    rules: ClassVar[tuple[_Rule, ...]] = ()

    # An online machine whose reported version lags is sent Config again this often.
    resend_s: float = field(default=30.0, metadata=_meta(check=_between(1, 86400)))
    # This many failed dispenses in a row disable a slot until an operator enables it.
    slot_failure_limit: int = field(default=3, metadata=_meta(check=_between(1, 1000)))


@dataclass(frozen=True, slots=True)
class Config:
    """The whole resolved configuration, one frozen section per table."""

    log: LogConfig = field(default_factory=LogConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    vend: VendConfig = field(default_factory=VendConfig)
    webhook: WebhookConfig = field(default_factory=WebhookConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    planogram: PlanogramConfig = field(default_factory=PlanogramConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self, redact: bool = True) -> dict[str, dict[str, object]]:
        """Return plain JSON-ready data for display; secrets read "***" unless redact is False."""
        return {
            name: {
                key.name: key.display(getattr(getattr(self, name), key.name), redact=redact)
                for key in keys.values()
            }
            for name, keys in _KEYS.items()
        }


# ---------------------------------------------------------------------------------------------
# Field introspection: what each key accepts, derived from the declarations above

_SECTIONS: Final[dict[str, type[_Section]]] = {
    cls.section: cls
    for cls in (
        LogConfig,
        MqttConfig,
        DatabaseConfig,
        HttpConfig,
        SecurityConfig,
        VendConfig,
        WebhookConfig,
        SessionsConfig,
        TelemetryConfig,
        PlanogramConfig,
        RuntimeConfig,
    )
}

_TOML_TYPE_NAMES: Final = {
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    str: "a string",
    dict: "a table",
    list: "an array",
}
_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no"})


@dataclass(frozen=True, slots=True)
class _Key:
    section: str
    name: str
    kind: type  # bool, int, float, str or Path, once optional and Literal are unwrapped
    choices: tuple[str, ...]  # the allowed values of a Literal, else empty
    optional: bool
    default: object
    meta: _Meta

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    def display(self, value: object, *, redact: bool = True) -> object:
        if redact and self.meta.redact is not None and value is not None:
            # A secret of the wrong type (a number in TOML, say) is still hidden.
            return self.meta.redact(value) if isinstance(value, str) else REDACTED
        return str(value) if isinstance(value, Path) else value

    def shown(self, value: object) -> str:
        """Render `key=value` for an error message, secrets redacted."""
        return f"{self.dotted}={self.display(value)!r}"

    def from_text(self, text: str) -> object:
        """Coerce an environment or command-line string; raise ValueError with the problem."""
        if self.optional and not text:
            return None
        if self.choices:
            return self._choose(text)
        return _FROM_TEXT[self.kind](text)

    def from_toml(self, value: object) -> object:
        """Check a TOML value's type; raise ValueError with the problem."""
        # bool is an int subclass in Python, but `port = true` in a file is a mistake.
        expected: type = str if self.kind is Path else self.kind
        if self.kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return _finite(float(value))
        if type(value) is not expected:
            got = _TOML_TYPE_NAMES.get(type(value), f"a {type(value).__name__}")
            raise ValueError(f"expected {_TOML_TYPE_NAMES[expected]}, got {got}")
        if self.choices:
            return self._choose(typing.cast("str", value))
        return _parse_path(typing.cast("str", value)) if self.kind is Path else value

    def _choose(self, text: str) -> str:
        if text.lower() in self.choices:
            return text.lower()
        raise ValueError(f"expected one of {', '.join(self.choices)}")


def _finite(number: float) -> float:
    if not math.isfinite(number):
        raise ValueError("expected a finite number")
    return number


def _parse_path(text: str) -> Path:
    if not text:
        raise ValueError("expected a path")
    return Path(text)


def _parse_bool(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError("expected a boolean (true/false, yes/no, 1/0)")


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("expected an integer") from None


def _parse_float(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise ValueError("expected a number") from None
    return _finite(number)


_FROM_TEXT: Final[dict[type, Callable[[str], object]]] = {
    bool: _parse_bool,
    int: _parse_int,
    float: _parse_float,
    str: str,
    Path: _parse_path,
}


def _keys_of(cls: type[_Section]) -> dict[str, _Key]:
    hints = typing.get_type_hints(cls)
    keys = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]  # _Section subclasses are dataclasses
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and (
            type(None) in args
        )
        if optional:
            (hint,) = (arg for arg in args if arg is not type(None))
        choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
        kind = str if choices else hint
        keys[f.name] = _Key(
            cls.section, f.name, kind, choices, optional, f.default, f.metadata.get(_META, _Meta())
        )
    return keys


_KEYS: Final = {name: _keys_of(cls) for name, cls in _SECTIONS.items()}
_DOTTED: Final = [key.dotted for keys in _KEYS.values() for key in keys.values()]


# ---------------------------------------------------------------------------------------------
# Validation


def _validate(
    section: str, values: Mapping[str, object], sources: Mapping[str, str], fallback: str
) -> None:
    """Raise ConfigError for the first invalid value or combination in one section."""
    keys = _KEYS[section]
    problems: list[tuple[tuple[str, ...], str]] = [
        ((name,), problem)
        for name, key in keys.items()
        if (value := values[name]) is not None
        and key.meta.check is not None
        and (problem := key.meta.check(value))
    ]
    problems.extend(
        (rule.keys, problem)
        for rule in _SECTIONS[section].rules
        if (problem := rule.check(*(values[name] for name in rule.keys)))
    )
    if not problems:
        return
    names, problem = problems[0]
    shown = ", ".join(keys[name].shown(values[name]) for name in names)
    # Name where each value came from, the layers a user set before the fallback.
    origin = sorted(
        dict.fromkeys(sources.get(name, fallback) for name in names), key=fallback.__eq__
    )
    raise ConfigError(f"{shown}: {problem}", " and ".join(origin), keys[names[0]].dotted)


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass(slots=True)
class _Layers:
    """Values seen so far, and where each came from; later layers overwrite earlier ones."""

    values: dict[str, dict[str, object]] = field(default_factory=dict)
    sources: dict[str, dict[str, str]] = field(default_factory=dict)

    def put(self, key: _Key, value: object, source: str) -> None:
        self.values.setdefault(key.section, {})[key.name] = value
        self.sources.setdefault(key.section, {})[key.name] = source

    def build(self) -> Config:
        sections: dict[str, Any] = {}
        for name, keys in _KEYS.items():
            values = {key.name: key.default for key in keys.values()}
            values.update(self.values.get(name, {}))
            _validate(name, values, self.sources.get(name, {}), _DEFAULTS)
            sections[name] = _SECTIONS[name](**values)
        return Config(**sections)


def _lookup(section: str, name: str, source: str, spell: Callable[[str], str]) -> _Key:
    """Return the declared key, or raise ConfigError suggesting the closest known one."""
    if (key := _KEYS.get(section, {}).get(name)) is not None:
        return key
    if section in _KEYS:
        message = f"unknown key {f'{section}.{name}'!r}"
        known = f"known keys in {section}: {', '.join(_KEYS[section])}"
    else:
        message = f"unknown section {section!r}"
        known = f"known sections: {', '.join(_KEYS)}"
    close = difflib.get_close_matches(f"{section}.{name}", _DOTTED, n=1)
    hint = f"; did you mean {spell(close[0])}?" if close else f" ({known})"
    raise ConfigError(message + hint, source, f"{section}.{name}")


def _coerce(key: _Key, raw: _T, source: str, convert: Callable[[_T], object]) -> object:
    try:
        return convert(raw)
    except ValueError as exc:
        raise ConfigError(f"{key.shown(raw)}: {exc}", source, key.dotted) from None


def _apply_file(layers: _Layers, path: Path, source: str) -> None:
    try:
        with path.open("rb") as stream:
            data = tomllib.load(stream)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"cannot read the configuration file: {reason}", source) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source) from None
    for section, table in data.items():
        if section not in _KEYS:
            close = difflib.get_close_matches(section, list(_KEYS), n=1)
            hint = f"; did you mean [{close[0]}]?" if close else f" (known: {', '.join(_KEYS)})"
            raise ConfigError(f"unknown section [{section}]{hint}", source, section)
        if not isinstance(table, dict):
            raise ConfigError(f"{section} must be a table ([{section}])", source, section)
        for name, value in table.items():
            key = _lookup(section, name, source, repr)
            layers.put(key, _coerce(key, value, source, key.from_toml), source)


def _env_name(dotted: str) -> str:
    return ENV_PREFIX + dotted.replace(".", "_").upper()


def _apply_environ(layers: _Layers, environ: Mapping[str, str]) -> None:
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or var == ENV_CONFIG_FILE:
            continue
        source = f"environment {var}"
        # Section names contain no underscore, so the first one after the prefix splits.
        section, sep, name = var.removeprefix(ENV_PREFIX).lower().partition("_")
        if not sep or not section or not name:
            raise ConfigError(f"expected {ENV_PREFIX}<SECTION>_<KEY>", source)
        key = _lookup(section, name, source, _env_name)
        layers.put(key, _coerce(key, environ[var], source, key.from_text), source)


def _apply_overrides(layers: _Layers, overrides: Sequence[str]) -> None:
    for item in overrides:
        dotted, sep, text = item.partition("=")
        dotted = dotted.strip()
        # The value is left out of the source: the message shows it, redacted if secret.
        source = f"command line --set {dotted}=..." if sep else f"command line --set {item}"
        section, dot, name = dotted.partition(".")
        if not sep or not dot or not section or not name:
            raise ConfigError(f"expected section.key=value, got {dotted!r}", source)
        key = _lookup(section, name, source, repr)
        layers.put(key, _coerce(key, text, source, key.from_text), source)


def load_config(
    *, path: Path | None, environ: Mapping[str, str], overrides: Sequence[str]
) -> Config:
    """Resolve defaults < TOML file < VENDGATE_* environment < overrides into one Config.

    `path` falls back to the file named by VENDGATE_CONFIG; no file at all is fine. Each
    override is ``section.key=value``. Raises ConfigError naming the source and the key.
    """
    layers = _Layers()
    source = f"file {path}"
    if path is None and (named := environ.get(ENV_CONFIG_FILE)):
        path = Path(named)
        source = f"file {path} (from {ENV_CONFIG_FILE})"
    if path is not None:
        _apply_file(layers, path, source)
    _apply_environ(layers, environ)
    _apply_overrides(layers, overrides)
    return layers.build()
