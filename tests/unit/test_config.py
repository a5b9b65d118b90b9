"""Settings.from_env: every value validated, secrets generated and listed when absent,
a clear ConfigError (never another exception) for anything invalid."""

from __future__ import annotations

from pathlib import Path

import pytest

from flashsale.config import SECRET_MAX_CHARS, SECRET_MIN_CHARS, ConfigError, Settings

SECRET_VARS = (
    "FLASHSALE_ADMIN_TOKEN", "FLASHSALE_JWT_SECRET", "FLASHSALE_WEBHOOK_SECRET",
    "FLASHSALE_PASS_SECRET",
)
GOOD_SECRET = "s" * SECRET_MIN_CHARS


def from_env(**env: str) -> Settings:
    return Settings.from_env(env)


def config_error(**env: str) -> str:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    return str(info.value)


# -- defaults ---------------------------------------------------------------------


def test_empty_environment_gives_the_contract_defaults() -> None:
    s = from_env()
    assert s.redis_url is None and s.database_url is None  # embedded servers
    assert (s.host, s.port) == ("127.0.0.1", 8080)
    assert s.data_dir == Path(".flashsale")
    assert s.body_max_bytes == 16 * 1024
    assert s.redis_appendfsync == "everysec"
    assert s.generated == SECRET_VARS


def test_empty_strings_mean_unset() -> None:
    s = from_env(
        FLASHSALE_REDIS_URL="", FLASHSALE_DATABASE_URL="", FLASHSALE_HOST="",
        FLASHSALE_PORT="", FLASHSALE_DATA_DIR="", FLASHSALE_JWT_SECRET="",
    )
    assert s.redis_url is None and s.database_url is None
    assert (s.host, s.port, s.data_dir) == ("127.0.0.1", 8080, Path(".flashsale"))
    assert "FLASHSALE_JWT_SECRET" in s.generated


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHSALE_PORT", "9123")
    monkeypatch.setenv("FLASHSALE_JWT_SECRET", GOOD_SECRET)
    s = Settings.from_env()
    assert s.port == 9123 and s.jwt_secret == GOOD_SECRET


def test_given_values_are_used_as_is() -> None:
    s = from_env(
        FLASHSALE_REDIS_URL="redis://10.0.0.5:6380/2",
        FLASHSALE_DATABASE_URL="postgresql://app:pw@db.internal:5433/flash",
        FLASHSALE_HOST="0.0.0.0",
        FLASHSALE_PORT="9000",
        FLASHSALE_DATA_DIR="/var/lib/flashsale",
        FLASHSALE_ADMIN_TOKEN="admin-token-0123456789",
        FLASHSALE_JWT_SECRET="jwt-secret-0123456789",
        FLASHSALE_WEBHOOK_SECRET="whsec_0123456789abcdef",
        FLASHSALE_PASS_SECRET="pass-secret-0123456789",
        FLASHSALE_REDIS_APPENDFSYNC="always",
    )
    assert s.redis_url == "redis://10.0.0.5:6380/2"
    assert s.database_url == "postgresql://app:pw@db.internal:5433/flash"
    assert (s.host, s.port, s.data_dir) == ("0.0.0.0", 9000, Path("/var/lib/flashsale"))
    assert s.admin_token == "admin-token-0123456789"
    assert s.jwt_secret == "jwt-secret-0123456789"
    assert s.webhook_secret == "whsec_0123456789abcdef"
    assert s.pass_secret == "pass-secret-0123456789"
    assert s.redis_appendfsync == "always"
    assert s.generated == ()


# -- secrets ------------------------------------------------------------------------


def test_generated_secrets_are_listed_strong_and_distinct() -> None:
    s = from_env(FLASHSALE_JWT_SECRET=GOOD_SECRET)
    assert s.generated == (
        "FLASHSALE_ADMIN_TOKEN", "FLASHSALE_WEBHOOK_SECRET", "FLASHSALE_PASS_SECRET"
    )
    assert s.jwt_secret == GOOD_SECRET
    generated = [s.admin_token, s.webhook_secret, s.pass_secret]
    for value in generated:
        assert len(value) >= 32
        assert all("\x21" <= ch <= "\x7e" for ch in value)
        # a generated secret would itself be accepted if given back
        assert from_env(FLASHSALE_ADMIN_TOKEN=value).admin_token == value
    assert len(set(generated)) == 3
    again = from_env()
    assert again.admin_token not in generated and again.jwt_secret != s.jwt_secret


@pytest.mark.parametrize("var", SECRET_VARS)
@pytest.mark.parametrize(
    "value",
    [
        "short",
        "s" * (SECRET_MIN_CHARS - 1),
        "s" * (SECRET_MAX_CHARS + 1),
        "has a space in it 0123456789",
        "tab\tinside-0123456789",
        "newline-0123456789\n",
        "non-ascii-sécret-0123456789",
        "nul\x00-0123456789abcdef",
    ],
    ids=["short", "min-1", "max+1", "space", "tab", "newline", "non-ascii", "nul"],
)
def test_invalid_secret_is_a_config_error_naming_the_variable(var: str, value: str) -> None:
    message = config_error(**{var: value})
    assert var in message
    assert value.strip() not in message, "the message must not echo the secret"


@pytest.mark.parametrize("length", [SECRET_MIN_CHARS, SECRET_MAX_CHARS])
def test_secret_length_bounds_are_inclusive(length: int) -> None:
    assert from_env(FLASHSALE_JWT_SECRET="x" * length).jwt_secret == "x" * length


# -- port and other integers ---------------------------------------------------------


@pytest.mark.parametrize("raw", ["0", "1", "8080", "65535", " 8081 "])
def test_valid_port(raw: str) -> None:
    assert from_env(FLASHSALE_PORT=raw).port == int(raw)


@pytest.mark.parametrize("raw", ["eighty", "-1", "65536", "99999999999999999999", "80.0", "0x50",
                                 "80 80", "1e3"])
def test_bad_port(raw: str) -> None:
    assert "FLASHSALE_PORT" in config_error(FLASHSALE_PORT=raw)


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("FLASHSALE_IDEMPOTENCY_TTL_S", "59"),
        ("FLASHSALE_IDEMPOTENCY_TTL_S", "forever"),
        ("FLASHSALE_CONSUMER_BATCH_MAX", "0"),
        ("FLASHSALE_CONSUMER_CLAIM_IDLE_MS", "10"),
        ("FLASHSALE_CONSUMER_MAX_DELIVERIES", "101"),
        ("FLASHSALE_ROOM_TICKETS_MAX", "0"),
        ("FLASHSALE_ROOM_TICKETS_MAX", "many"),
        ("FLASHSALE_ROOM_ADMIT_INTERVAL_MS", "9"),
        ("FLASHSALE_ROOM_ADMIT_INTERVAL_MS", "1001"),
        ("FLASHSALE_PASS_SECRET", "short"),
        ("FLASHSALE_REDIS_APPENDFSYNC", "sometimes"),
        ("FLASHSALE_KEY_PREFIX", "a:b"),
        ("FLASHSALE_KEY_PREFIX", "{tag}"),
        ("FLASHSALE_HTTP_HEADER_TIMEOUT_S", "0"),
        ("FLASHSALE_HTTP_HEADER_TIMEOUT_S", "301"),
        ("FLASHSALE_HTTP_HEADER_TIMEOUT_S", "2.5"),
        ("FLASHSALE_HTTP_BODY_TIMEOUT_S", "0"),
        ("FLASHSALE_HTTP_BODY_TIMEOUT_S", "ten"),
        ("FLASHSALE_HTTP_KEEPALIVE_IDLE_S", "0"),
        ("FLASHSALE_HTTP_KEEPALIVE_IDLE_S", "3601"),
        ("FLASHSALE_HTTP_MAX_CONNECTIONS", "0"),
        ("FLASHSALE_HTTP_MAX_CONNECTIONS", "-5"),
    ],
)
def test_other_invalid_values(var: str, raw: str) -> None:
    assert var in config_error(**{var: raw})


def test_http_connection_bounds_default_and_given() -> None:
    s = from_env()
    assert (s.http_header_timeout_s, s.http_body_timeout_s, s.http_keepalive_idle_s) == (
        10, 10, 15
    )
    assert s.http_max_connections == 4096
    given = from_env(
        FLASHSALE_HTTP_HEADER_TIMEOUT_S="5", FLASHSALE_HTTP_BODY_TIMEOUT_S="20",
        FLASHSALE_HTTP_KEEPALIVE_IDLE_S="75", FLASHSALE_HTTP_MAX_CONNECTIONS="1000",
    )
    assert (given.http_header_timeout_s, given.http_body_timeout_s) == (5, 20)
    assert (given.http_keepalive_idle_s, given.http_max_connections) == (75, 1000)


# -- URLs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379/0", "rediss://cache.example:6380", "redis://:pw@h:1/3",
     "unix:///run/redis.sock", "REDIS://H:6379"],
)
def test_valid_redis_url(url: str) -> None:
    assert from_env(FLASHSALE_REDIS_URL=url).redis_url == url


@pytest.mark.parametrize(
    "url",
    ["postgresql://postgres@127.0.0.1:5432/test", "postgres://u:p@db/x",
     "postgresql:///flash?host=/run/postgresql",
     "postgresql://u@h1:5432,h2:5433/db"],  # several hosts: asyncpg's failover DSN
)
def test_valid_database_url(url: str) -> None:
    assert from_env(FLASHSALE_DATABASE_URL=url).database_url == url


@pytest.mark.parametrize(
    ("var", "url"),
    [
        ("FLASHSALE_REDIS_URL", "http://127.0.0.1:6379"),
        ("FLASHSALE_REDIS_URL", "127.0.0.1:6379"),
        ("FLASHSALE_REDIS_URL", "localhost"),
        ("FLASHSALE_REDIS_URL", "postgresql://127.0.0.1/x"),
        ("FLASHSALE_REDIS_URL", "redis://[::1"),
        ("FLASHSALE_REDIS_URL", "redis://h:99999999/0"),
        ("FLASHSALE_REDIS_URL", "redis://h:port/0"),
        ("FLASHSALE_DATABASE_URL", "mysql://u@h/db"),
        ("FLASHSALE_DATABASE_URL", "postgresql+asyncpg://u@h/db"),
        ("FLASHSALE_DATABASE_URL", "redis://127.0.0.1:6379"),
        ("FLASHSALE_DATABASE_URL", "postgresql://[::1"),
    ],
)
def test_bad_url_is_a_config_error(var: str, url: str) -> None:
    """Bad scheme, or a URL that does not parse: ConfigError, never ValueError
    (the CLI turns only ConfigError into a message without a traceback)."""
    assert var in config_error(**{var: url})


@pytest.mark.parametrize(
    ("var", "url"),
    [
        ("FLASHSALE_DATABASE_URL", "mysql://app:s3cret-pw@db/x"),
        ("FLASHSALE_REDIS_URL", "http://:s3cret-pw@cache:6379"),
        ("FLASHSALE_DATABASE_URL", "postgresql://app:s3cret-pw@[::1/x"),
    ],
)
def test_url_errors_do_not_echo_passwords(var: str, url: str) -> None:
    message = config_error(**{var: url})
    assert "s3cret-pw" not in message


def test_with_urls_fills_only_what_is_missing() -> None:
    given = from_env(FLASHSALE_REDIS_URL="redis://given:6379/0")
    filled = given.with_urls("redis://embedded:1/0", "postgresql://embedded:2/flashsale")
    assert filled.redis_url == "redis://given:6379/0"
    assert filled.database_url == "postgresql://embedded:2/flashsale"
    assert filled.jwt_secret == given.jwt_secret and filled.generated == given.generated
    assert given.database_url is None  # frozen: a copy, not a mutation
