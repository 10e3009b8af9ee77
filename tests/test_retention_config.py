"""[retention] values out of range are refused at load naming the key and the range; bare
integers are seconds and bytes, as the docs say."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from harness import run_script, write_config

from transport.config import ConfigError, parse_config

pytestmark = pytest.mark.timeout(60)

NINES_20 = 99999999999999999999


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"dedup_horizon": "99999999999999999999y"}, "dedup_horizon '99999999999999999999y' is longer than the most"),
        ({"max_events_per_topic": NINES_20}, "max_events_per_topic must be at most 9223372036854775807"),
        ({"max_bytes": "9" * 320}, "is more than the most allowed, 9223372036854775807 bytes"),
        ({"max_age": "9" * 400}, "is longer than the most allowed, 1000 years"),
        ({"max_age": "1001y"}, "is longer than the most allowed, 1000 years"),
        ({"max_age": "0"}, '"" (the default) keeps events for ever'),
        ({"dedup_horizon": "never"}, '"forever"'),
    ],
)
def test_out_of_range_and_zero_values_are_refused_saying_what_is_allowed(values: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError, match="^\\[retention\\] ") as refused:
        parse_config({"retention": values})
    assert says in str(refused.value)


def test_bare_integers_are_seconds_and_bytes() -> None:
    retention = parse_config({"retention": {"max_age": 3600, "max_bytes": 1000000, "sweep_interval": 5}}).retention
    assert (retention.max_age_s, retention.max_bytes_value, retention.sweep_interval_s) == (3600.0, 1000000, 5.0)
    # A fraction too: 1.5 was refused as "must be a string, not a number", where 3600 was taken.
    retention = parse_config({"retention": {"max_age": 1.5, "sweep_interval": 0.25}}).retention
    assert (retention.max_age_s, retention.sweep_interval_s) == (1.5, 0.25)
    # Numbers Python writes with an exponent were read as a number and a unit "e".
    retention = parse_config({"retention": {"max_bytes": 1e16, "sweep_interval": 1e-5}}).retention
    assert (retention.max_bytes_value, retention.sweep_interval_s) == (10**16, 1e-5)
    with pytest.raises(ConfigError, match="must be longer than 0"):
        parse_config({"retention": {"max_age": -0.0}})


def test_the_longest_values_allowed_load() -> None:
    retention = parse_config(
        {"retention": {"max_age": "1000y", "max_bytes": str(2**63 - 1), "max_events_per_topic": 2**63 - 1}}
    ).retention
    assert retention.max_bytes_value == 2**63 - 1


@pytest.mark.e2e
def test_an_out_of_range_value_stops_the_daemon_with_status_2(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", {"retention": {"max_events_per_topic": NINES_20}})
    result = run_script("aggregatord.py", "--config", str(config), timeout=60)
    assert result.returncode == 2, result.stderr + result.stdout
    assert "[retention] max_events_per_topic must be at most" in result.stderr + result.stdout
