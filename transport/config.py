"""Configuration: the TOML file that tells the daemon and its clients where everything is.

Every setting has a default (the same values as the repository's ``config.toml``), so a file
may set any subset. Unknown sections or keys, and values of the wrong type or range, raise
:class:`ConfigError` naming the key, so a typo fails at start rather than being ignored.
Relative paths are resolved against the config file's folder, except ``[storage] path``, which
is resolved against ``$STATE_DIRECTORY`` when systemd sets it. Paths may name environment
variables (``${CREDENTIALS_DIRECTORY}/curve-secret``: where systemd's ``LoadCredential=`` puts
a key the service's dynamic user may read); one that is not set is an error at load.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """The configuration file is missing, unreadable or holds a bad key or value."""


@dataclass(frozen=True, slots=True)
class IngestConfig:
    """``[ingest]``: the two ingest endpoints and the limits on what they accept."""

    bind: str = "tcp://127.0.0.1:5555"
    ack_bind: str = "tcp://127.0.0.1:5557"
    max_in_flight: int = 20_000
    max_in_flight_bytes: int = 67_108_864
    max_batch_events: int = 10_000
    max_payload_bytes: int = 1_048_576
    max_message_bytes: int = 16_777_216
    rcvhwm: int = 100
    gather_at_queued: int = 8
    decode_process: bool = True


@dataclass(frozen=True, slots=True)
class OrderingConfig:
    """``[ordering]``: the pool of per-topic ordering actors and their reorder window."""

    actors: int = 4
    window_ms: int = 50
    max_buffered: int = 10_000
    max_topics: int = 1_000_000


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """``[storage]``: the SQLite database and how the dedup actor groups its commits."""

    path: str = "data/events.db"
    synchronous: str = "NORMAL"
    commit_max_events: int = 5_000
    commit_max_ms: int = 50
    cache_mb: int = 16


@dataclass(frozen=True, slots=True)
class QueryConfig:
    """``[query]``: the REQ/REP endpoint for stats, events, topics and health."""

    bind: str = "tcp://127.0.0.1:5556"
    max_limit: int = 10_000
    timeout_ms: int = 5_000
    # An events page stops once it holds this many bytes (always at least one event).
    max_page_bytes: int = 4_194_304


@dataclass(frozen=True, slots=True)
class LogConfig:
    """``[log]``: how much the daemon says."""

    level: str = "INFO"


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """``[security]``: CURVE keys and the switch for listening beyond loopback without them.

    ``curve_secret_key``, ``authorized_keys`` and ``allow_insecure`` are the daemon's;
    ``server_public_key`` and ``client_certificate`` are read by clients given ``--config``.
    """

    curve_secret_key: str = ""
    authorized_keys: str = ""
    allow_insecure: bool = False
    server_public_key: str = ""
    client_certificate: str = ""


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration, one frozen dataclass per TOML section."""

    ingest: IngestConfig = field(default_factory=IngestConfig)
    ordering: OrderingConfig = field(default_factory=OrderingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    log: LogConfig = field(default_factory=LogConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    source: Path | None = None

    @property
    def database_path(self) -> Path:
        """The SQLite file, absolute: relative paths go under ``$STATE_DIRECTORY`` or the config's folder."""
        path = Path(self.storage.path)
        if path.is_absolute():
            return path
        state_dir = os.environ.get("STATE_DIRECTORY")
        if state_dir:
            # systemd may pass several colon-separated folders; the first is ours.
            return Path(state_dir.split(":")[0]) / path
        return self._base_dir / path

    def resolve(self, path: str) -> Path:
        """A path from the config, made absolute against the config file's folder."""
        candidate = Path(path)
        return candidate if candidate.is_absolute() else self._base_dir / candidate

    @property
    def _base_dir(self) -> Path:
        return self.source.parent if self.source is not None else Path.cwd()


_SECTIONS: dict[str, type] = {
    "ingest": IngestConfig,
    "ordering": OrderingConfig,
    "storage": StorageConfig,
    "query": QueryConfig,
    "log": LogConfig,
    "security": SecurityConfig,
}

_POSITIVE = {
    ("ingest", "max_in_flight"),
    ("ingest", "max_in_flight_bytes"),
    ("ingest", "max_batch_events"),
    ("ingest", "max_payload_bytes"),
    ("ingest", "max_message_bytes"),
    ("ingest", "rcvhwm"),
    ("ordering", "actors"),
    ("ordering", "max_buffered"),
    ("ordering", "max_topics"),
    ("storage", "commit_max_events"),
    ("storage", "commit_max_ms"),
    ("storage", "cache_mb"),
    ("query", "max_limit"),
    ("query", "timeout_ms"),
    ("query", "max_page_bytes"),
}
_CHOICES = {
    ("storage", "synchronous"): ("OFF", "NORMAL", "FULL", "EXTRA"),
    ("log", "level"): ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
}
_ENDPOINTS = {("ingest", "bind"), ("ingest", "ack_bind"), ("query", "bind")}
_PATHS = {
    ("storage", "path"),
    ("security", "curve_secret_key"),
    ("security", "authorized_keys"),
    ("security", "server_public_key"),
    ("security", "client_certificate"),
}


def _expand(key: str, value: str) -> str:
    """``value`` with its ``$NAME`` / ``${NAME}`` environment variables replaced."""
    expanded = os.path.expandvars(value)
    if "$" in expanded:
        hint = " (systemd sets it for a unit with LoadCredential=)" if "CREDENTIALS_DIRECTORY" in expanded else ""
        raise ConfigError(f"{key} = {value!r} names an environment variable that is not set{hint}")
    return expanded


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read a config file (or return the defaults when ``path`` is None) and check every value."""
    if path is None:
        return Config()
    source = Path(path).resolve()
    try:
        with source.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {source} does not exist: pass --config with an existing file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {source} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {source}: {exc.strerror}") from None
    return parse_config(data, source)


def parse_config(data: dict[str, Any], source: Path | None = None) -> Config:
    """Build a :class:`Config` from already-parsed TOML, raising :class:`ConfigError` on any bad key."""
    sections: dict[str, Any] = {}
    for name, values in data.items():
        section_type = _SECTIONS.get(name)
        if section_type is None:
            raise ConfigError(f"unknown section [{name}]; known sections: {', '.join(sorted(_SECTIONS))}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] must be a table of keys, not {type(values).__name__}")
        sections[name] = _parse_section(name, section_type, values)
    return Config(**sections, source=source)


def _parse_section(name: str, section_type: type, values: dict[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(section_type)}
    checked: dict[str, Any] = {}
    for key, value in values.items():
        spec = fields.get(key)
        if spec is None:
            raise ConfigError(f"unknown key [{name}] {key}; known keys: {', '.join(sorted(fields))}")
        default: Any = spec.default  # every field has one; Any, since the sections differ
        expected = type(default)
        # bool is a subclass of int in Python; keep them apart so `actors = true` is an error.
        if type(value) is not expected:
            raise ConfigError(f"[{name}] {key} must be a {expected.__name__}, not {type(value).__name__} ({value!r})")
        if (name, key) in _POSITIVE and value <= 0:
            raise ConfigError(f"[{name}] {key} must be greater than 0, not {value}")
        if (name, key) == ("ingest", "gather_at_queued") and value < 0:
            raise ConfigError(f"[ingest] gather_at_queued must be 0 (never pause) or more, not {value}")
        if (name, key) == ("ordering", "window_ms") and value < 0:
            raise ConfigError(f"[ordering] window_ms must be 0 (arrival order) or more, not {value}")
        choices = _CHOICES.get((name, key))
        if choices is not None:
            value = value.upper()
            if value not in choices:
                raise ConfigError(f"[{name}] {key} must be one of {', '.join(choices)}, not {values[key]!r}")
        if (name, key) in _PATHS and "$" in value:
            value = _expand(f"[{name}] {key}", value)
        if (name, key) in _ENDPOINTS:
            _check_endpoint(f"[{name}] {key}", value)
        checked[key] = value
    return section_type(**checked)


def _check_endpoint(where: str, value: str) -> None:
    """A bind endpoint: ``transport://address``, and for tcp a port that libzmq will not wrap
    (it binds port 99 999 as 34 463 without a word)."""
    transport, separator, address = value.partition("://")
    if not separator:
        raise ConfigError(f"{where} must be a ZeroMQ endpoint like tcp://127.0.0.1:5555, not {value!r}")
    if transport == "tcp":
        _, colon, port = address.rpartition(":")
        if not (colon and port.isdigit() and 1 <= int(port) <= 65535):
            raise ConfigError(f"{where} needs a port from 1 to 65535, like tcp://127.0.0.1:5555, not {value!r}")
