"""The restart budget of the embedded servers' supervisor, and its settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from flashsale.config import ConfigError, Settings
from flashsale.run.embedded.supervisor import RestartBudget, RestartPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_delays_double_up_to_the_cap_and_the_budget_ends() -> None:
    clock = Clock()
    budget = RestartBudget(
        RestartPolicy(max_restarts=6, window_s=60, backoff_base_s=0.25, backoff_max_s=2.0), clock
    )
    delays = []
    while (delay := budget.next_delay_s()) is not None:
        delays.append(delay)
        budget.record()
    assert delays == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]


def test_attempts_older_than_the_window_no_longer_count() -> None:
    clock = Clock()
    budget = RestartBudget(RestartPolicy(max_restarts=2, window_s=60), clock)
    budget.record()
    budget.record()
    assert budget.next_delay_s() is None
    clock.now += 60.5  # a server that stayed up for a window is forgiven
    assert budget.next_delay_s() == RestartPolicy().backoff_base_s


def test_no_restarts_at_all() -> None:
    assert RestartBudget(RestartPolicy(max_restarts=0)).next_delay_s() is None


@pytest.mark.parametrize("kw", [{"max_restarts": -1}, {"max_restarts": 101}, {"window_s": 0}])
def test_policy_is_bounded(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RestartPolicy(**kw)  # type: ignore[arg-type]


def test_embedded_settings_from_env() -> None:
    s = Settings.from_env(
        {
            "FLASHSALE_EMBEDDED_RESTART_MAX": "0",
            "FLASHSALE_EMBEDDED_RESTART_WINDOW_S": "5",
            "FLASHSALE_EMBEDDED_USER": "postgres",
            "FLASHSALE_REDIS_SERVER": "/opt/redis/bin/redis-server",
            "FLASHSALE_PG_BIN_DIR": "/opt/pg/bin",
            "FLASHSALE_LOG_LEVEL": "warning",
        }
    )
    assert (s.embedded_restart_max, s.embedded_restart_window_s) == (0, 5)
    assert s.embedded_user == "postgres" and s.log_level == "WARNING"
    assert s.embedded_redis_server == Path("/opt/redis/bin/redis-server")
    assert s.embedded_pg_bin_dir == Path("/opt/pg/bin")
    d = Settings.from_env({})
    assert (d.embedded_restart_max, d.embedded_restart_window_s, d.log_level) == (5, 60, "INFO")
    assert d.embedded_user is None and d.embedded_redis_server is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FLASHSALE_EMBEDDED_RESTART_MAX", "101"),
        ("FLASHSALE_EMBEDDED_RESTART_MAX", "x"),
        ("FLASHSALE_EMBEDDED_RESTART_WINDOW_S", "0"),
        ("FLASHSALE_LOG_LEVEL", "LOUD"),
    ],
)
def test_bad_embedded_settings_are_one_line_errors(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({name: value})
    assert name in str(err.value) and "\n" not in str(err.value)
