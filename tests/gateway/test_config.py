import dataclasses
from pathlib import Path

import pytest

from gateway import config as config_module
from gateway.config import (
    REDACTED,
    Config,
    DatabaseConfig,
    MqttConfig,
    SecurityConfig,
    WebhookConfig,
    load_config,
)
from gateway.errors import ConfigError

SECRET = "0123456789abcdef" * 4  # 32 bytes in hex, the shortest accepted
OTHER_SECRET = "fedcba9876543210" * 4
HUNTER = "hunter2"


def load(
    tmp_path: Path,
    toml: str | None = None,
    env: dict[str, str] | None = None,
    sets: tuple[str, ...] = (),
) -> Config:
    path = None
    if toml is not None:
        path = tmp_path / "vendgate.toml"
        path.write_text(toml, encoding="utf-8")
    return load_config(path=path, environ=env or {}, overrides=sets)


def load_error(
    tmp_path: Path,
    toml: str | None = None,
    env: dict[str, str] | None = None,
    sets: tuple[str, ...] = (),
) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, toml, env, sets)
    return info.value


# --- layers and precedence ----------------------------------------------------------------


def test_no_layers_gives_defaults(tmp_path: Path) -> None:
    """With no file, environment or overrides the result is the all-defaults tree."""
    config = load(tmp_path)
    assert config == Config()
    assert config.mqtt.topic_prefix == "vg"
    assert config.database.data_dir == Path(".vendgate/pgdata")
    assert config.vend.retry_cap_s == 8.0


@pytest.mark.parametrize(
    ("file", "env", "cli", "expected"),
    [
        (False, False, False, "vg"),
        (True, False, False, "from-file"),
        (True, True, False, "from-env"),
        (True, True, True, "from-cli"),
        (False, True, False, "from-env"),
        (True, False, True, "from-cli"),
        (False, False, True, "from-cli"),
    ],
)
def test_precedence(tmp_path: Path, file: bool, env: bool, cli: bool, expected: str) -> None:
    """For one key, defaults < file < environment < command line."""
    config = load(
        tmp_path,
        toml='[mqtt]\ntopic_prefix = "from-file"\n' if file else None,
        env={"VENDGATE_MQTT_TOPIC_PREFIX": "from-env"} if env else None,
        sets=("mqtt.topic_prefix=from-cli",) if cli else (),
    )
    assert config.mqtt.topic_prefix == expected


def test_later_override_wins(tmp_path: Path) -> None:
    """Of two overrides for the same key, the later one wins."""
    config = load(tmp_path, sets=("http.port=1", "http.port=2"))
    assert config.http.port == 2


def test_environment_names_the_file(tmp_path: Path) -> None:
    """VENDGATE_CONFIG names the file when no path is given; an explicit path takes precedence."""
    named = tmp_path / "named.toml"
    named.write_text("[http]\nport = 1111\n", encoding="utf-8")
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("[http]\nport = 2222\n", encoding="utf-8")
    env = {"VENDGATE_CONFIG": str(named)}
    assert load_config(path=None, environ=env, overrides=()).http.port == 1111
    assert load_config(path=explicit, environ=env, overrides=()).http.port == 2222


def test_missing_or_broken_file(tmp_path: Path) -> None:
    """A missing file or invalid TOML is a ConfigError naming the file."""
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_config(path=missing, environ={}, overrides=())
    assert info.value.source == f"file {missing}"
    error = load_error(tmp_path, toml="[mqtt\n")
    assert "not valid TOML" in str(error)
    assert error.source.startswith("file ")


# --- unknown sections and keys --------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "source", "suggestion"),
    [
        ("file", "file ", "'mqtt.shared_group'"),
        ("env", "environment VENDGATE_MQTT_SHARD_GROUP", "VENDGATE_MQTT_SHARED_GROUP"),
        ("cli", "command line --set mqtt.shard_group=", "'mqtt.shared_group'"),
    ],
)
def test_unknown_key(tmp_path: Path, layer: str, source: str, suggestion: str) -> None:
    """An unknown key is an error naming its source and key and suggesting the closest key."""
    error = load_error(
        tmp_path,
        toml='[mqtt]\nshard_group = "g"\n' if layer == "file" else None,
        env={"VENDGATE_MQTT_SHARD_GROUP": "g"} if layer == "env" else None,
        sets=("mqtt.shard_group=g",) if layer == "cli" else (),
    )
    assert error.key == "mqtt.shard_group"
    assert error.source.startswith(source)
    assert str(error).startswith(source)
    assert "unknown key 'mqtt.shard_group'" in str(error)
    assert f"did you mean {suggestion}?" in str(error)


@pytest.mark.parametrize(
    ("layer", "source", "suggestion"),
    [
        ("file", "file ", "[mqtt]"),
        ("env", "environment VENDGATE_MQT_URL", "VENDGATE_MQTT_URL"),
        ("cli", "command line --set mqt.url=", "'mqtt.url'"),
    ],
)
def test_unknown_section(tmp_path: Path, layer: str, source: str, suggestion: str) -> None:
    """An unknown section is an error naming its source and suggesting the closest section."""
    error = load_error(
        tmp_path,
        toml='[mqt]\nurl = "mqtt://h:1"\n' if layer == "file" else None,
        env={"VENDGATE_MQT_URL": "mqtt://h:1"} if layer == "env" else None,
        sets=("mqt.url=mqtt://h:1",) if layer == "cli" else (),
    )
    assert error.source.startswith(source)
    assert "unknown section" in str(error)
    assert f"did you mean {suggestion}?" in str(error)


def test_unknown_without_close_match_lists_known(tmp_path: Path) -> None:
    """With nothing close to suggest, the error lists what is known instead."""
    error = load_error(tmp_path, env={"VENDGATE_ZZZ_QQQ": "1"})
    assert "known sections: log, mqtt, database, http, security, vend, webhook" in str(error)
    error = load_error(tmp_path, sets=("http.zzzzzz=1",))
    assert "known keys in http: host, port" in str(error)


@pytest.mark.parametrize("item", ["mqtt.url", "url=mqtt://h:1", ".url=x", "mqtt.=x"])
def test_malformed_override(tmp_path: Path, item: str) -> None:
    """An override that is not section.key=value is an error from the command line."""
    error = load_error(tmp_path, sets=(item,))
    assert error.source.startswith("command line --set")


@pytest.mark.parametrize("name", ["VENDGATE_MQTT", "VENDGATE_MQTT_", "VENDGATE__URL"])
def test_malformed_environment_name(tmp_path: Path, name: str) -> None:
    """A VENDGATE_ variable without both a section and a key is an error naming it."""
    error = load_error(tmp_path, env={name: "x"})
    assert error.source == f"environment {name}"
    assert "VENDGATE_<SECTION>_<KEY>" in str(error)


def test_other_environment_is_ignored(tmp_path: Path) -> None:
    """Variables without the VENDGATE_ prefix play no part."""
    assert load(tmp_path, env={"HOME": "/root", "MQTT_URL": "nonsense"}) == Config()


def test_file_section_must_be_a_table(tmp_path: Path) -> None:
    """A section given as a plain value in the file is an error."""
    error = load_error(tmp_path, toml="mqtt = 3\n")
    assert "must be a table" in str(error)


# --- types -----------------------------------------------------------------------------------


def test_environment_strings_are_coerced(tmp_path: Path) -> None:
    """Environment strings become ints, floats, paths and literals by the field's type."""
    config = load(
        tmp_path,
        env={
            "VENDGATE_MQTT_KEEPALIVE_S": "45",
            "VENDGATE_VEND_RETRY_BASE_S": "0.25",
            "VENDGATE_VEND_RETRY_CAP_S": "3",
            "VENDGATE_DATABASE_DATA_DIR": "/var/lib/vendgate",
            "VENDGATE_SECURITY_MASTER_SECRET_FILE": "/run/secrets/master",
            "VENDGATE_LOG_LEVEL": "WARNING",
        },
    )
    assert config.mqtt.keepalive_s == 45
    assert config.vend.retry_base_s == 0.25
    assert config.vend.retry_cap_s == 3.0
    assert isinstance(config.vend.retry_cap_s, float)
    assert config.database.data_dir == Path("/var/lib/vendgate")
    assert config.security.master_secret_file == Path("/run/secrets/master")
    assert config.log.level == "warning"


def test_empty_string_means_none(tmp_path: Path) -> None:
    """An empty environment value sets an optional key to None, even over the file's value."""
    config = load(
        tmp_path,
        toml='[mqtt]\nurl = "mqtt://broker:1883"\nusername = "gw"\n',
        env={"VENDGATE_MQTT_URL": ""},
        sets=("mqtt.username=",),
    )
    assert config.mqtt.url is None
    assert config.mqtt.username is None


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("True", True),
        ("1", True),
        ("yes", True),
        ("false", False),
        ("FALSE", False),
        ("0", False),
        ("no", False),
    ],
)
def test_bool_from_text(text: str, value: bool) -> None:
    """Boolean settings accept true/false, 1/0 and yes/no in any case."""
    # No setting is a bool yet, so this checks the converter the loader uses for them.
    assert config_module._FROM_TEXT[bool](text) is value


def test_bool_from_text_rejects_other_words() -> None:
    """Anything but the six boolean spellings is rejected."""
    with pytest.raises(ValueError, match="expected a boolean"):
        config_module._FROM_TEXT[bool]("maybe")


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"VENDGATE_HTTP_PORT": "eighty"}, "http.port='eighty': expected an integer"),
        ({"VENDGATE_VEND_RETRY_BASE_S": "fast"}, "vend.retry_base_s='fast': expected a number"),
        ({"VENDGATE_VEND_RETRY_CAP_S": "inf"}, "expected a finite number"),
        ({"VENDGATE_LOG_LEVEL": "loud"}, "expected one of debug, info, warning, error"),
        ({"VENDGATE_DATABASE_DATA_DIR": ""}, "expected a path"),
    ],
)
def test_bad_strings(tmp_path: Path, env: dict[str, str], problem: str) -> None:
    """A string that does not fit the field's type is an error naming variable, key and value."""
    error = load_error(tmp_path, env=env)
    assert problem in str(error)
    assert error.source == f"environment {next(iter(env))}"


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        (
            '[mqtt]\nkeepalive_s = "30"\n',
            "mqtt.keepalive_s='30': expected an integer, got a string",
        ),
        ("[http]\nport = true\n", "http.port=True: expected an integer, got a boolean"),
        ("[http]\nport = 80.0\n", "expected an integer, got a float"),
        ('[vend]\nretry_base_s = "0.5"\n', "expected a float, got a string"),
        ("[vend]\nretry_base_s = false\n", "expected a float, got a boolean"),
        ("[mqtt]\nurl = 1883\n", "expected a string, got an integer"),
        ("[database]\ndata_dir = [1]\n", "expected a string, got an array"),
        ("[mqtt]\nurl = {}\n", "expected a string, got a table"),
    ],
)
def test_toml_type_mismatch(tmp_path: Path, toml: str, problem: str) -> None:
    """TOML values must already have the field's type; a bool is not an int."""
    error = load_error(tmp_path, toml=toml)
    assert problem in str(error)
    assert error.source.startswith("file ")


def test_toml_int_is_accepted_as_float(tmp_path: Path) -> None:
    """An integer in the file is fine where a float is expected."""
    config = load(tmp_path, toml="[vend]\nretry_cap_s = 9\n")
    assert config.vend.retry_cap_s == 9.0
    assert isinstance(config.vend.retry_cap_s, float)


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sets", "key", "fragment"),
    [
        (("mqtt.url=http://broker:1883",), "mqtt.url", "must start with mqtt:// or mqtts://"),
        (("mqtt.url=mqtt://",), "mqtt.url", "must name a host"),
        (("mqtt.url=mqtt://u:p@broker:1883",), "mqtt.url", "must not carry credentials"),
        (("mqtt.url=mqtt://broker:1883/x",), "mqtt.url", "no path"),
        (("mqtt.url=mqtt://broker:99999",), "mqtt.url", "not a valid URL"),
        (("mqtt.topic_prefix=a/b",), "mqtt.topic_prefix", "without '/'"),
        (("mqtt.topic_prefix=a+",), "mqtt.topic_prefix", "without '+'"),
        (("mqtt.shared_group=g#",), "mqtt.shared_group", "without '#'"),
        (("mqtt.shared_group=$g",), "mqtt.shared_group", "must not start with '$'"),
        (("mqtt.keepalive_s=4",), "mqtt.keepalive_s", "between 5 and 3600"),
        (("database.dsn=mysql://db/x",), "database.dsn", "postgresql://"),
        (("database.pool_min=0",), "database.pool_min", "at least 1"),
        (("database.pool_min=20",), "database.pool_min", "pool_min must not exceed pool_max"),
        (("http.port=65536",), "http.port", "between 0 and 65535"),
        (("vend.clock_skew_s=61",), "vend.clock_skew_s", "between 0 and 60"),
        (("vend.retry_base_s=0",), "vend.retry_base_s", "greater than 0"),
        (
            ("vend.default_deadline_s=700",),
            "vend.default_deadline_s",
            "default_deadline_s must not exceed max_deadline_s",
        ),
        (("vend.retry_cap_s=0.1",), "vend.retry_base_s", "retry_base_s must not exceed"),
        (("security.master_secret=abcd",), "security.master_secret", "at least 64 hex digits"),
        (("security.master_secret=" + "zz" * 32,), "security.master_secret", "hexadecimal"),
        (
            ("security.master_secret=" + SECRET, "security.master_secret_file=/run/secret"),
            "security.master_secret",
            "not both",
        ),
        (("webhook.url=ftp://backend/hook",), "webhook.url", "must start with http://"),
        (("webhook.url=https://",), "webhook.url", "must name a host"),
        (("webhook.url=https://backend/hook",), "webhook.secret", "secret is required when url"),
        (
            ("webhook.url=https://backend/hook", "webhook.secret=short"),
            "webhook.secret",
            "at least 16 characters",
        ),
        (("webhook.concurrency=0",), "webhook.concurrency", "between 1 and 1024"),
        (("webhook.timeout_s=0",), "webhook.timeout_s", "between 0.1 and 300"),
        (("webhook.retry_cap_s=0.5",), "webhook.retry_base_s", "retry_base_s must not exceed"),
    ],
)
def test_invalid_values(tmp_path: Path, sets: tuple[str, ...], key: str, fragment: str) -> None:
    """Invalid values are errors naming the dotted key, its source and the problem."""
    error = load_error(tmp_path, sets=sets)
    assert error.key == key
    assert f"{key}=" in str(error)
    assert fragment in str(error)
    assert "command line --set" in error.source


def test_cross_key_error_names_both_values_and_sources(tmp_path: Path) -> None:
    """A rule over two keys shows both values and where each came from."""
    error = load_error(tmp_path, env={"VENDGATE_DATABASE_POOL_MIN": "20"})
    assert "database.pool_min=20, database.pool_max=10" in str(error)
    assert error.source == "environment VENDGATE_DATABASE_POOL_MIN and defaults"


@pytest.mark.parametrize(
    "url", ["mqtt://broker:1883", "mqtts://broker.example:8883", "mqtt://[::1]:1883", "mqtt://h"]
)
def test_valid_broker_urls(tmp_path: Path, url: str) -> None:
    """Broker URLs of the form mqtt[s]://host[:port] are accepted."""
    assert load(tmp_path, env={"VENDGATE_MQTT_URL": url}).mqtt.url == url


def test_direct_construction_validates() -> None:
    """A section built in code is checked like a loaded one."""
    with pytest.raises(ConfigError, match=r"mqtt\.keepalive_s=1: must be between") as info:
        MqttConfig(keepalive_s=1)
    assert info.value.source == "MqttConfig()"
    with pytest.raises(ConfigError, match="pool_min must not exceed pool_max"):
        DatabaseConfig(pool_min=3, pool_max=2)


def test_sections_match_config_fields() -> None:
    """Every section class is a field of Config under its own section name."""
    names = [f.name for f in dataclasses.fields(Config)]
    assert names == list(config_module._SECTIONS)
    for name, cls in config_module._SECTIONS.items():
        assert isinstance(getattr(Config(), name), cls)


def test_config_is_frozen() -> None:
    """The resolved tree cannot be changed after start-up."""
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.http.port = 1  # type: ignore[misc]  # the assignment is what is being tested


# --- secrets -------------------------------------------------------------------------------


def test_to_dict_redacts_secrets(tmp_path: Path) -> None:
    """to_dict shows set secrets and URL passwords as *** unless asked not to."""
    config = load(
        tmp_path,
        sets=(
            "security.master_secret=" + SECRET,
            f"mqtt.password={HUNTER}",
            "database.dsn=postgresql://gw:s3cret@db:5432/vend",
        ),
    )
    shown = config.to_dict()
    assert shown["security"]["master_secret"] == REDACTED
    assert shown["mqtt"]["password"] == REDACTED
    assert shown["database"]["dsn"] == "postgresql://gw:***@db:5432/vend"
    assert shown["mqtt"]["username"] is None
    assert shown["security"]["master_secret_file"] is None
    assert shown["database"]["data_dir"] == ".vendgate/pgdata"
    plain = config.to_dict(redact=False)
    assert plain["security"]["master_secret"] == SECRET
    assert plain["mqtt"]["password"] == HUNTER
    assert plain["database"]["dsn"] == "postgresql://gw:s3cret@db:5432/vend"


def test_webhook_section(tmp_path: Path) -> None:
    """The webhook section loads from the environment, and to_dict hides its secret."""
    secret = "whsec-0123456789abcdef"  # noqa: S105  (a test value, not a credential)
    config = load(
        tmp_path,
        env={
            "VENDGATE_WEBHOOK_URL": "https://hooks:pa55word@backend.example/vendgate",
            "VENDGATE_WEBHOOK_SECRET": secret,
            "VENDGATE_WEBHOOK_CONCURRENCY": "4",
        },
    )
    assert config.webhook == WebhookConfig(
        url="https://hooks:pa55word@backend.example/vendgate", secret=secret, concurrency=4
    )
    shown = config.to_dict()["webhook"]
    assert shown["secret"] == REDACTED
    assert shown["url"] == "https://hooks:***@backend.example/vendgate"
    assert shown["retry_cap_s"] == 300.0
    assert Config().webhook.url is None  # no URL: events wait in the outbox


def test_unset_secret_is_none_not_redacted() -> None:
    """An unset secret reads None, so the display shows it is missing."""
    assert Config().to_dict()["mqtt"]["password"] is None


@pytest.mark.parametrize(
    ("toml", "env", "sets", "secret"),
    [
        (None, {}, ("security.master_secret=" + SECRET[:-2],), SECRET[:-2]),
        (None, {"VENDGATE_SECURITY_MASTER_SECRET": "nothex" * 12}, (), "nothex" * 12),
        ("[mqtt]\npassword = 424242\n", {}, (), "424242"),
        (None, {}, ("security.master_secret=" + SECRET, "security.master_secret_file=/x"), SECRET),
        (None, {"VENDGATE_DATABASE_DSN": "mysql://u:pa55word@db/x"}, (), "pa55word"),
        (None, {"VENDGATE_WEBHOOK_SECRET": "too-short"}, (), "too-short"),
        (None, {"VENDGATE_WEBHOOK_URL": "ftp://u:pa55word@backend/x"}, (), "pa55word"),
    ],
)
def test_errors_never_show_secrets(
    tmp_path: Path, toml: str | None, env: dict[str, str], sets: tuple[str, ...], secret: str
) -> None:
    """Error messages and sources show *** where a secret value would be."""
    error = load_error(tmp_path, toml=toml, env=env, sets=sets)
    assert secret not in str(error)
    assert secret not in repr(error.args)
    assert REDACTED in str(error)


def test_master_secret_inline() -> None:
    """An inline master secret is returned as bytes; no secret at all gives None."""
    assert SecurityConfig(master_secret=SECRET).master_secret_bytes() == bytes.fromhex(SECRET)
    assert SecurityConfig().master_secret_bytes() is None


def test_master_secret_file(tmp_path: Path) -> None:
    """The master secret file is read, stripped of whitespace and hex-decoded."""
    secret_file = tmp_path / "master.hex"
    secret_file.write_text(f"  {OTHER_SECRET}\n", encoding="ascii")
    config = load(tmp_path, env={"VENDGATE_SECURITY_MASTER_SECRET_FILE": str(secret_file)})
    assert config.security.master_secret_bytes() == bytes.fromhex(OTHER_SECRET)


def test_master_secret_file_missing(tmp_path: Path) -> None:
    """An unreadable master secret file is a ConfigError naming the file and the key."""
    missing = tmp_path / "absent.hex"
    with pytest.raises(ConfigError, match="cannot read the master secret") as info:
        SecurityConfig(master_secret_file=missing).master_secret_bytes()
    assert info.value.source == f"file {missing}"
    assert info.value.key == "security.master_secret_file"


@pytest.mark.parametrize(
    "content",
    [b"abcd\n", b"xyz" * 30, b"\xff\xfe" * 40, b""],
    ids=["short", "nothex", "binary", "empty"],
)
def test_master_secret_file_invalid(tmp_path: Path, content: bytes) -> None:
    """A master secret file that is not long enough hex is a ConfigError that hides the contents."""
    secret_file = tmp_path / "master.hex"
    secret_file.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        SecurityConfig(master_secret_file=secret_file).master_secret_bytes()
    assert info.value.key == "security.master_secret_file"
    if content.strip():
        assert content.decode("latin-1").strip() not in str(info.value)


def test_master_secret_both_set_is_rejected_by_the_method() -> None:
    """master_secret_bytes refuses a section that somehow holds both forms of the secret."""
    section = SecurityConfig(master_secret=SECRET)
    object.__setattr__(section, "master_secret_file", Path("/x"))  # bypass the frozen check
    with pytest.raises(ConfigError, match="not both"):
        section.master_secret_bytes()
