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
import ipaddress
import math
import os
import re
import socket
import stat
import tomllib
from collections.abc import Callable
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

    actors: int = 1  # measured: see docs/performance.md, How many ordering actors
    window_ms: int = 50
    max_buffered: int = 10_000
    max_topics: int = 1_000_000


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """``[storage]``: the database (SQLite file, or PostgreSQL shared by several daemons) and how
    the dedup actor groups its commits."""

    backend: str = "sqlite"
    path: str = "data/events.db"
    dsn: str = ""
    node: str = ""
    synchronous: str = "NORMAL"
    commit_max_events: int = 5_000
    commit_max_ms: int = 50
    cache_mb: int = 16


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """``[retention]``: how long events are kept, and how long their keys outlive them.

    Durations and sizes stay as written (the TOML strings); the ``*_s`` and ``*_bytes``
    properties give their values, already checked by :func:`parse_config`.
    """

    max_age: str = ""
    max_events_per_topic: int = 0
    max_bytes: str = ""
    dedup_horizon: str = "forever"
    sweep_interval: str = "1min"

    @property
    def max_age_s(self) -> float | None:
        """Events older than this many seconds (by arrival) are deleted; None keeps them."""
        return parse_duration(self.max_age) if self.max_age else None

    @property
    def max_bytes_value(self) -> int | None:
        """The database's size budget in bytes; None for no budget."""
        return parse_size(self.max_bytes) if self.max_bytes else None

    @property
    def dedup_horizon_s(self) -> float | None:
        """How long after its commit a deleted event's key still rejects replays; None is for ever."""
        return None if self.dedup_horizon == "forever" else parse_duration(self.dedup_horizon)

    @property
    def sweep_interval_s(self) -> float:
        """Seconds between the starts of two expiry sweeps."""
        return parse_duration(self.sweep_interval)

    @property
    def enabled(self) -> bool:
        """Whether a sweep has anything to do: a limit deletes events, or a horizon forgets deleted
        events' keys (also those kept while an earlier configuration deleted events)."""
        return bool(self.max_age or self.max_events_per_topic or self.max_bytes) or self.dedup_horizon != "forever"


# systemd.time(7)'s time-span units, in seconds.
_DURATION_UNITS: dict[str, float] = {
    **dict.fromkeys(("us", "usec", "µs"), 1e-6),
    **dict.fromkeys(("ms", "msec"), 1e-3),
    **dict.fromkeys(("s", "sec", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86_400.0),
    **dict.fromkeys(("w", "week", "weeks"), 604_800.0),
    **dict.fromkeys(("M", "month", "months"), 2_629_800.0),  # 30.44 days, as systemd counts
    **dict.fromkeys(("y", "year", "years"), 31_557_600.0),  # 365.25 days
}
_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "k": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tib": 1024**4,
}
# The largest integer SQLite and PostgreSQL store (64-bit signed): counts and byte sizes above it
# overflow at the first statement that carries them.
MAX_INT64 = 2**63 - 1
# The longest duration taken: past it a span is surely a typo, and it stays exact in seconds.
MAX_DURATION_YEARS = 1000
MAX_DURATION_S = MAX_DURATION_YEARS * _DURATION_UNITS["y"]
_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-zµ]*)")


def _number_text(value: float) -> str:
    """A TOML number as the string it stands for, never in exponent form (``1e16`` is
    10000000000000000, ``1e-9`` is 0.000000001), which the duration and size parsers do not read."""
    if isinstance(value, int) or not math.isfinite(value):
        return str(value)
    if value.is_integer():
        return str(int(value))
    text = f"{value:.17f}".rstrip("0")
    return text + "0" if text.endswith(".") else text  # 1e-300 rounds to "0.", which reads as no number


def parse_duration(text: str) -> float:
    """Seconds in a systemd-style time span: ``"250ms"``, ``"15min"``, ``"1h 30min"``, ``"3"`` (seconds).

    Raises ValueError saying what is wrong.
    """
    total = 0.0
    position = 0
    stripped = text.strip()
    if not stripped:
        raise ValueError("is empty; write a number and a unit, like '30d'")
    while position < len(stripped):
        match = _PART.match(stripped, position)
        if match is None or match.end() == position:
            raise ValueError(f"{text!r} is not a duration; write a number and a unit, like '250ms', '12h' or '30d'")
        number, unit = match.groups()
        scale = _DURATION_UNITS.get(unit or "s")
        if scale is None:
            raise ValueError(
                f"{text!r} has an unknown unit {unit!r}; use us, ms, s, min, h, d, w, M or y (a bare number is seconds)"
            )
        total += float(number) * scale
        position = match.end()
    if not math.isfinite(total) or total > MAX_DURATION_S:
        raise ValueError(f"{text!r} is longer than the most allowed, {MAX_DURATION_YEARS} years")
    if total <= 0:
        raise ValueError(f"{text!r} must be longer than 0")
    return total


def parse_size(text: str) -> int:
    """Bytes in ``"500MB"`` (powers of 1000), ``"2GiB"`` or ``"2G"`` (powers of 1024) or ``"4096"`` (bytes).

    Raises ValueError saying what is wrong.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if match is None:
        raise ValueError(f"{text!r} is not a size; write a number and a unit, like '500MB' or '50GB'")
    number, unit = match.groups()
    scale = _SIZE_UNITS.get(unit.lower())
    if scale is None:
        raise ValueError(f"{text!r} has an unknown unit {unit!r}; use B, KB, MB, GB, TB (or KiB, MiB, GiB, TiB)")
    # Exact for whole numbers of any length (a float of 320 digits is inf, and int(inf) raises).
    size = int(number) * scale if number.isdigit() else int(float(number) * scale)
    if size > MAX_INT64:
        raise ValueError(f"{text!r} is more than the most allowed, {MAX_INT64} bytes (8 EiB)")
    if size <= 0:
        raise ValueError(f"{text!r} must be more than 0 bytes")
    return size


@dataclass(frozen=True, slots=True)
class QueryConfig:
    """``[query]``: the REQ/REP endpoint for stats, events, topics and health."""

    bind: str = "tcp://127.0.0.1:5556"
    max_limit: int = 10_000
    timeout_ms: int = 5_000
    # An events page stops once it holds this many bytes (always at least one event).
    max_page_bytes: int = 4_194_304


@dataclass(frozen=True, slots=True)
class SubscribeConfig:
    """``[subscribe]``: the ROUTER endpoint consumers follow the stored stream on (docs/subscribe.md)."""

    bind: str = "tcp://127.0.0.1:5558"
    heartbeat_ms: int = 1_000
    timeout_ms: int = 5_000
    max_credit: int = 10_000
    batch_events: int = 500
    max_consumers: int = 1_000


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
class HttpConfig:
    """``[http]``: the HTTP gateway (``scripts/gateway.py``, docs/gateway.md); the daemon reads none of it.

    ``bind`` is ``HOST:PORT`` (an IPv6 host in brackets: ``[::1]:8080``).
    """

    bind: str = "127.0.0.1:8080"
    request_timeout_ms: int = 5_000
    header_timeout_ms: int = 10_000
    write_timeout_ms: int = 30_000
    max_body_bytes: int = 10_485_760
    max_events: int = 10_000
    publishers: int = 32
    workers: int = 1
    max_streams: int = 100
    allowed_hosts: tuple[str, ...] = ()  # Host names answered besides loopback's; "*": any
    allowed_origins: tuple[str, ...] = ()  # web origins that may open event streams besides the gateway's own; "*": any

    @property
    def host(self) -> str:
        """The host part of ``bind``, without the brackets of an IPv6 address."""
        return split_host_port(self.bind)[0]

    @property
    def port(self) -> int:
        """The port part of ``bind``."""
        return split_host_port(self.bind)[1]


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration, one frozen dataclass per TOML section."""

    ingest: IngestConfig = field(default_factory=IngestConfig)
    ordering: OrderingConfig = field(default_factory=OrderingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    subscribe: SubscribeConfig = field(default_factory=SubscribeConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    log: LogConfig = field(default_factory=LogConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    source: Path | None = None
    expanded: bool = False  # the daemon's values had their environment variables replaced (once)

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

    @property
    def daemon_binds(self) -> dict[str, str]:
        """The daemon's four endpoints to bind, by the key that sets each (``"[ingest] bind"``, ...)."""
        return {
            "[ingest] bind": self.ingest.bind,
            "[ingest] ack_bind": self.ingest.ack_bind,
            "[query] bind": self.query.bind,
            "[subscribe] bind": self.subscribe.bind,
        }

    @property
    def storage_node(self) -> str:
        """This daemon's identity in a shared database: ``[storage] node``, or host name and ingest port."""
        if self.storage.node:
            return self.storage.node
        port = self.ingest.bind.rpartition(":")[2]
        return f"{socket.gethostname()}:{port}"

    def resolve(self, path: str, key: str) -> Path:
        """A path from the config (``key``, for errors), its environment variables replaced
        (:class:`ConfigError` for one that is not set), made absolute against the config file's folder."""
        # Once only: after expand_environment a "$" is a literal one ("$$" as written).
        candidate = Path(_expand(key, path) if "$" in path and not self.expanded else path)
        return candidate if candidate.is_absolute() else self._base_dir / candidate

    @property
    def _base_dir(self) -> Path:
        return self.source.parent if self.source is not None else Path.cwd()


_SECTIONS: dict[str, type] = {
    "ingest": IngestConfig,
    "ordering": OrderingConfig,
    "storage": StorageConfig,
    "query": QueryConfig,
    "subscribe": SubscribeConfig,
    "retention": RetentionConfig,
    "log": LogConfig,
    "security": SecurityConfig,
    "http": HttpConfig,
}

# Durations and sizes written as strings; a TOML number there is seconds or bytes.
_SPANS = {
    ("retention", "max_age"),
    ("retention", "max_bytes"),
    ("retention", "dedup_horizon"),
    ("retention", "sweep_interval"),
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
    ("http", "request_timeout_ms"),
    ("http", "header_timeout_ms"),
    ("http", "write_timeout_ms"),
    ("http", "max_body_bytes"),
    ("http", "max_events"),
    ("http", "publishers"),
    ("http", "workers"),
    ("http", "max_streams"),
    ("subscribe", "heartbeat_ms"),
    ("subscribe", "timeout_ms"),
    ("subscribe", "max_credit"),
    ("subscribe", "batch_events"),
    ("subscribe", "max_consumers"),
    ("query", "max_page_bytes"),
}
# Upper bounds below the 64-bit one, and why.
_MAXIMA = {
    ("ordering", "actors"): (256, "each is a thread, and more than the CPUs gains nothing: see docs/performance.md"),
    ("ordering", "window_ms"): (
        3_600_000,
        "an hour: every event waits that long before it is stored or acknowledged, and publishers give up sooner",
    ),
    ("ingest", "rcvhwm"): (2**31 - 1, "ZeroMQ takes it as a C int"),
    # The publishers (Publisher.from_config, eventagg publish, the gateway) check payloads
    # against it, and take a limit of at most this.
    ("ingest", "max_payload_bytes"): (2**31 - 1, "2 GiB: the publishers take no larger limit"),
    # Set as ZeroMQ's heartbeat options, C ints: larger stopped the daemon at start with a traceback.
    ("subscribe", "heartbeat_ms"): (2**31 - 1, "ZeroMQ takes it as a C int"),
    ("subscribe", "timeout_ms"): (2**31 - 1, "ZeroMQ takes it as a C int"),
    ("http", "workers"): (256, "each is a process"),
    ("http", "publishers"): (1024, "each holds a connection to the daemon"),
    ("http", "max_streams"): (10000, "each holds a thread and a connection to the daemon"),
}
_CHOICES = {
    ("storage", "synchronous"): ("OFF", "NORMAL", "FULL", "EXTRA"),
    ("log", "level"): ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
}
BACKENDS = ("sqlite", "postgresql")
_ENDPOINTS = {("ingest", "bind"), ("ingest", "ack_bind"), ("query", "bind"), ("subscribe", "bind")}
_PATHS = {
    ("storage", "path"),
    ("security", "curve_secret_key"),
    ("security", "authorized_keys"),
    ("security", "server_public_key"),
    ("security", "client_certificate"),
}


_VARIABLE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def _expand(key: str, value: str) -> str:
    """``value`` with its ``$NAME`` / ``${NAME}`` environment variables replaced and ``$$`` made
    one ``$``; any other ``$`` (``$9``, a ``$`` at the end) is kept as written."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name is None:
            return "$"
        if name not in os.environ:
            hint = " (systemd sets it for a unit with LoadCredential=)" if name == "CREDENTIALS_DIRECTORY" else ""
            if key == "[storage] dsn" and match.group(1) is None:
                # A bare $word in a dsn is most likely inside a password: naming it would print it.
                raise ConfigError(
                    "[storage] dsn holds a $ followed by a name that is not a set environment variable;"
                    " write $$ for a $ in a password, and ${NAME} for a variable"
                )
            shown = key if key == "[storage] dsn" else f"{key} = {value!r}"  # a dsn may hold a password
            raise ConfigError(
                f"{shown} names the environment variable {name}, which is not set{hint};"
                " write $$ for a $ that is not a variable"
            )
        return os.environ[name]

    return _VARIABLE.sub(replace, value)


# The values the daemon uses that may name environment variables (client_certificate and
# server_public_key are the clients', in a file they may share).
_DAEMON_VALUES = (
    ("storage", "dsn"),
    ("storage", "path"),
    ("security", "curve_secret_key"),
    ("security", "authorized_keys"),
)


def expand_environment(config: Config) -> Config:
    """``config`` with the environment variables in the daemon's dsn and paths replaced: the
    daemon's step (and ``eventagg migrate``'s), where an unset one is an error at once.

    The other programs that read the file (``eventagg stats``, the publisher, the gateway) run
    where systemd's ``$CREDENTIALS_DIRECTORY`` is not set, and need few of these values or none,
    so loading a config leaves them as written; a path is expanded when used
    (:meth:`Config.resolve`), and the dsn never is.
    """
    sections: dict[str, Any] = {}
    for name, key in _DAEMON_VALUES:
        section = sections.get(name) or getattr(config, name)
        value = getattr(section, key)
        if "$" in value:
            sections[name] = dataclasses.replace(section, **{key: _expand(f"[{name}] {key}", value)})
    return dataclasses.replace(config, **sections, expanded=True)


# Every setting with a comment is a few KiB; more is not a config file (a device, a log).
MAX_CONFIG_BYTES = 1_048_576


def _not_a_file(mode: int) -> str | None:
    """What a file of this ``st_mode`` is, if it is not a regular file (None if it is)."""
    if stat.S_ISREG(mode):
        return None
    kinds = {
        stat.S_ISDIR: "a folder",
        stat.S_ISFIFO: "a named pipe (FIFO)",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
    }
    return next((kind for test, kind in kinds.items() if test(mode)), "not a regular file")


def _is_devnull(status: os.stat_result) -> bool:
    """Whether ``status`` is /dev/null's: an empty config (every default), as it always was."""
    try:
        null = os.stat(os.devnull)
    except OSError:
        return False
    return stat.S_ISCHR(status.st_mode) and status.st_rdev == null.st_rdev


def _check_regular(source: Path, status: os.stat_result) -> None:
    """Refuse a config path that is not a regular file (/dev/null aside), naming what it is."""
    kind = _not_a_file(status.st_mode)
    if kind is not None and not _is_devnull(status):
        raise ConfigError(f"config file {source} is {kind}: a config must be a regular file; give the path of one")


def _read_config_file(source: Path) -> bytes:
    """The first ``MAX_CONFIG_BYTES + 1`` bytes of the regular file at ``source``.

    Opening a named pipe waits for a writer, for ever, and a device may never end (/dev/zero)
    or wait for input (a terminal): only a regular file is read. It is checked before it is
    opened, and again on what was opened, in case the path was swapped in between; O_NONBLOCK
    makes that open return at once even then, and O_NOCTTY keeps a terminal from becoming ours.
    """
    _check_regular(source, source.stat())
    fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with open(fd, "rb") as handle:
        _check_regular(source, os.fstat(fd))
        return handle.read(MAX_CONFIG_BYTES + 1)  # bounded: a log given by mistake may be huge


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read a config file (or return the defaults when ``path`` is None) and check every value.

    The path must be a regular file (or /dev/null, every default): a named pipe, a socket, a
    device or a folder is refused, naming it, before anything waits on it.
    """
    if path is None:
        return Config()
    source = Path(path).resolve()
    try:
        text = _read_config_file(source)
        if len(text) > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"config file {source} is larger than {MAX_CONFIG_BYTES} bytes, far more than any config;"
                " give the path of the config file"
            )
        data = tomllib.loads(text.decode())
    except FileNotFoundError:
        raise ConfigError(f"config file {source} does not exist: give the path of an existing one") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {source} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {source} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            "save it as UTF-8, as TOML requires"
        ) from None
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
    if "retention" in sections:
        _check_retention(sections["retention"])
    if source is not None:
        _resolve_ipc_paths(sections, source.parent)
    config = Config(**sections, source=source)
    collision = colliding_binds(config)
    if collision is not None:
        raise ConfigError(collision)
    return config


def _resolve_ipc_paths(sections: dict[str, Any], base: Path) -> None:
    """Make each relative ``ipc://`` bind absolute against the config file's folder, ``base``, as
    every relative path in the file is: else the daemon bound it in its own working folder and a
    client given the same file looked for it in another (``@name``, Linux's abstract sockets, is no path)."""
    for name, key in sorted(_ENDPOINTS):
        section = sections.get(name)
        if section is None:
            continue
        transport, _, address = getattr(section, key).partition("://")
        if transport == "ipc" and address and not address.startswith(("/", "@")):
            sections[name] = dataclasses.replace(section, **{key: f"ipc://{base / address}"})


# What to write instead, added to a [retention] value refused.
_RETENTION_HINTS = {
    "max_age": '; "" (the default) keeps events for ever',
    "max_bytes": '; "" (the default) sets no size limit',
    "dedup_horizon": '; "forever" (the default) keeps deleted events\' keys for ever',
}


def _check_retention(retention: RetentionConfig) -> None:
    """Every [retention] value parses, and the horizon is not shorter than max_age."""
    if retention.max_events_per_topic < 0:
        raise ConfigError(
            f"[retention] max_events_per_topic must be 0 (no limit) or more, not {retention.max_events_per_topic}"
        )
    checks: list[tuple[str, str, Any]] = [
        ("max_age", retention.max_age, parse_duration),
        ("max_bytes", retention.max_bytes, parse_size),
        ("sweep_interval", retention.sweep_interval, parse_duration),
    ]
    if retention.dedup_horizon != "forever":
        checks.append(("dedup_horizon", retention.dedup_horizon, parse_duration))
    for key, value, parse in checks:
        if key in ("max_age", "max_bytes") and value == "":
            continue  # no limit
        try:
            parse(value)
        except ValueError as exc:
            raise ConfigError(f"[retention] {key} {exc}{_RETENTION_HINTS.get(key, '')}") from None
    horizon, max_age = retention.dedup_horizon_s, retention.max_age_s
    if horizon is not None and max_age is not None and horizon < max_age:
        raise ConfigError(
            f"[retention] dedup_horizon {retention.dedup_horizon!r} is shorter than max_age {retention.max_age!r}: "
            'a key must outlive its event; make it at least max_age, or "forever"'
        )


# What TOML calls each type a value can have, as the config file's author knows them.
_TOML_KINDS: dict[type, str] = {
    int: "an integer",
    str: "a string",
    bool: "true or false",
    float: "a number",
    list: "an array",
    tuple: "an array",
    dict: "a table",
}


def _toml_kind(value_type: type) -> str:
    return _TOML_KINDS.get(value_type, f"a {value_type.__name__}")


def _strings(key: str, values: list[Any]) -> tuple[str, ...]:
    """A TOML array of names (no whitespace, none empty), as a tuple."""
    for value in values:
        if not isinstance(value, str) or not value or any(c.isspace() or ord(c) < 32 for c in value):
            raise ConfigError(
                f'{key} must be an array of names without spaces, like ["events.example.com"], not {values!r}'
            )
    return tuple(values)


# A web origin as a browser's Origin header gives it: scheme://host[:port], nothing after (a
# port as browsers write it: no leading zero, at most 65535, checked apart).
_ORIGIN = re.compile(r"https?://(?:\[[0-9A-Fa-f:.]+\]|[^\s/?#@:\[\]*]+)(?::([1-9][0-9]{0,4}))?", re.IGNORECASE)


def _check_origins(origins: tuple[str, ...]) -> None:
    """Refuse an ``[http] allowed_origins`` entry that no browser sends as an ``Origin``."""
    for origin in origins:
        if origin == "*":
            continue
        if origin.lower() == "null":
            raise ConfigError(
                '[http] allowed_origins cannot list "null": browsers send it for pages of no origin (a '
                "sandboxed frame, a file:// page), which any web page can make itself; serve the page from an "
                "origin and list that"
            )
        if "*" in origin:
            raise ConfigError(
                f"[http] allowed_origins takes no patterns ({origin!r} would match no page): list each origin, "
                'like "https://app.example.com", or "*" alone for any'
            )
        matched = _ORIGIN.fullmatch(origin)
        if matched is None or int(matched.group(1) or 1) > 65535:
            raise ConfigError(
                f'[http] allowed_origins must be an array of web origins, like ["https://app.example.com"] '
                f'(http or https://host, an optional :port, no path, not even /), or ["*"] for any; not {origin!r}'
            )


def _parse_section(name: str, section_type: type, values: dict[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(section_type)}
    checked: dict[str, Any] = {}
    for key, value in values.items():
        spec = fields.get(key)
        if spec is None:
            raise ConfigError(f"unknown key [{name}] {key}; known keys: {', '.join(sorted(fields))}")
        default: Any = spec.default  # every field has one; Any, since the sections differ
        expected = type(default)
        if (name, key) in _SPANS and type(value) in (int, float):
            value = _number_text(value)  # a bare number is seconds or bytes, as in a string
        if expected is tuple and type(value) is list:  # a TOML array, kept immutable
            value = _strings(f"[{name}] {key}", value)
            if (name, key) == ("http", "allowed_origins"):
                _check_origins(value)
        # bool is a subclass of int in Python; keep them apart so `actors = true` is an error.
        if type(value) is not expected:
            raise ConfigError(
                f"[{name}] {key} must be {_toml_kind(expected)}, not {_toml_kind(type(value))} ({value!r})"
            )
        if type(value) is int and abs(value) > MAX_INT64:
            bound = f"at most {MAX_INT64}" if value > 0 else f"at least {-MAX_INT64}"
            raise ConfigError(f"[{name}] {key} must be {bound} (the database's 64-bit integers), not {value}")
        if (name, key) in _POSITIVE and value <= 0:
            raise ConfigError(f"[{name}] {key} must be greater than 0, not {value}")
        maximum = _MAXIMA.get((name, key))
        if maximum is not None and value > maximum[0]:
            raise ConfigError(f"[{name}] {key} must be at most {maximum[0]} ({maximum[1]}), not {value}")
        if (name, key) == ("ingest", "gather_at_queued") and value < 0:
            raise ConfigError(f"[ingest] gather_at_queued must be 0 (never pause) or more, not {value}")
        if (name, key) == ("ordering", "window_ms") and value < 0:
            raise ConfigError(f"[ordering] window_ms must be 0 (arrival order) or more, not {value}")
        choices = _CHOICES.get((name, key))
        if choices is not None:
            value = value.upper()
            if value not in choices:
                raise ConfigError(f"[{name}] {key} must be one of {', '.join(choices)}, not {values[key]!r}")
        if (name, key) == ("storage", "backend") and value not in BACKENDS:
            raise ConfigError(f"[storage] backend must be one of {', '.join(BACKENDS)}, not {value!r}")
        if (name, key) in _PATHS and "\x00" in value:
            raise ConfigError(f"[{name}] {key} holds a NUL character, which no file name can: {value!r}")
        if (name, key) in _ENDPOINTS:
            _check_endpoint(f"[{name}] {key}", value)
        if (name, key) == ("http", "bind"):
            try:
                split_host_port(value)
            except ValueError as exc:
                raise ConfigError(f"[http] bind {exc}") from None
        checked[key] = value
    if name == "storage" and checked.get("backend") == "postgresql" and not str(checked.get("dsn", "")).strip():
        raise ConfigError(
            '[storage] dsn must be set when backend = "postgresql", e.g. dsn = "postgresql://eventagg@db.example/eventagg"'
        )
    if name == "storage" and checked.get("backend", "sqlite") == "sqlite":
        for key in ("dsn", "node"):
            if checked.get(key):
                # Else several daemons meant to share a PostgreSQL database would each run on a
                # file of their own, and nothing would say so.
                how = "as written" if "backend" in checked else "the default"
                raise ConfigError(
                    f'[storage] {key} is set, but backend is "sqlite" ({how}): {key} is for PostgreSQL only;'
                    f' add backend = "postgresql" to use it, or remove {key} to use SQLite'
                )
    if name == "storage" and checked.get("backend", "sqlite") == "sqlite" and checked.get("path") == "":
        raise ConfigError(
            '[storage] path is empty; name the SQLite database file, e.g. path = "data/events.db" (the default)'
        )
    section = section_type(**checked)
    if name == "subscribe" and section.timeout_ms <= section.heartbeat_ms:
        raise ConfigError(
            f"[subscribe] timeout_ms ({section.timeout_ms}) must be more than heartbeat_ms ({section.heartbeat_ms}),"
            " or every consumer would be dropped between two heartbeats"
        )
    return section


def _check_endpoint(where: str, value: str) -> None:
    problem = endpoint_problem(value)
    if problem is not None:
        raise ConfigError(f"{where} {problem}")


def endpoint_problem(value: str) -> str | None:
    """What is wrong with a ZeroMQ endpoint (None: nothing), phrased to follow its name.

    It must be ``tcp://HOST:PORT`` (an IPv6 host in brackets) or ``ipc://PATH``: the only
    transports that reach another process through these socket types (``inproc://`` stays inside
    one process; ``udp://``, ``pgm://`` and the rest take other socket types). A tcp port must be
    one libzmq will not wrap (it binds or connects to port 99 999 as 34 463 without a word).
    """
    transport, separator, address = value.partition("://")
    if not separator:
        return f"must be a ZeroMQ endpoint like tcp://127.0.0.1:5555, not {value!r}"
    if "\x00" in address:
        return f"holds a NUL character, which no address or path can: {value!r}"
    if transport == "ipc":
        return None if address else f"needs a path, like ipc:///run/eventagg/ingest.sock, not {value!r}"
    if transport != "tcp":
        reach = " (inproc:// stays inside one process)" if transport == "inproc" else ""
        return (
            f"must be tcp://HOST:PORT or ipc://PATH, not {value!r}{reach}; "
            "an IPv6 host goes in brackets: tcp://[::1]:5555"
        )
    host, colon, port = address.rpartition(":")
    if not (colon and port.isdigit() and 1 <= int(port) <= 65535):
        return f"needs a port from 1 to 65535, like tcp://127.0.0.1:5555, not {value!r}"
    if not host:
        return f"needs a host (an address, or * to bind every one), like tcp://127.0.0.1:5555, not {value!r}"
    if ";" in host:  # libzmq's SOURCE;DEST form, for connecting from a given address only
        return f"takes one host, not libzmq's source;destination form: write tcp://HOST:PORT, not {value!r}"
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        return f"needs its IPv6 host in brackets, like tcp://[::1]:5555, not {value!r}"
    return None


def wants_ipv6(endpoint: str) -> bool:
    """Whether a socket needs ZeroMQ's IPv6 option to bind or connect to ``endpoint`` (a bracketed host)."""
    return endpoint.startswith("tcp://[")


def tcp_host_port(endpoint: str) -> tuple[str, str] | None:
    """``(host, port)`` of a ``tcp://`` (or ``ws://``, ``wss://``) endpoint, the host without an
    IPv6 address's brackets and, in libzmq's ``source;destination`` form, the destination's, the
    port as a number is written ("05555" is "5555"); None for other transports."""
    transport, _, address = endpoint.partition("://")
    if transport not in ("tcp", "ws", "wss"):
        return None
    host, colon, port = address.rpartition(":")
    if not colon:  # no port: all of it is the host
        host, port = address, ""
    if ";" in host:  # the bind side is the destination
        host = host.split(";", 1)[1]
    return host.strip("[]"), str(int(port)) if port.isdigit() else port


BindPlace = tuple[frozenset[str], str]
"""Where a bind would take: the hosts it may take (addresses, ``a.b.c.d/n`` networks, names as
written, or an ipc endpoint) and its port (``""`` for ipc)."""


def _bind_place(endpoint: str) -> BindPlace:
    """``({host}, port)`` of a tcp endpoint, or ``({endpoint}, "")`` of an ipc one, to find binds that collide."""
    host, port = tcp_host_port(endpoint) or (endpoint, "")
    return frozenset({host}), port


_ANY_HOST = {"*", "0.0.0.0", "::"}


def _same_host(host: str, other: str) -> bool:
    """Whether two hosts of :data:`BindPlace` may be one address: equal, or IP networks that overlap."""
    if host == other:
        return True
    try:
        mine, theirs = ipaddress.ip_network(host, strict=False), ipaddress.ip_network(other, strict=False)
    except ValueError:
        return False  # a name, a path: only the same one is the same
    return mine.version == theirs.version and mine.overlaps(theirs)


def colliding_binds(config: Config, place: Callable[[str], BindPlace | None] = _bind_place) -> str | None:
    """Two of the daemon's (and the gateway's) binds that would take the same address, said as a
    refusal. ``place`` gives a bind's hosts and port (see :data:`BindPlace`), or None when it cannot
    be told: as written by default; the daemon passes one that resolves names, interfaces and paths."""
    binds = [*config.daemon_binds.items(), ("[http] bind", f"tcp://{config.http.bind}")]
    places = [(name, endpoint, place(endpoint)) for name, endpoint in binds]
    for index, (name, endpoint, here) in enumerate(places):
        if here is None:
            continue
        hosts, port = here
        for other_name, other, there in places[index + 1 :]:
            if there is None:
                continue
            other_hosts, other_port = there
            if port != other_port:
                continue
            same = any(_same_host(host, other_host) for host in hosts for other_host in other_hosts)
            if same or (port and _ANY_HOST & (hosts | other_hosts)):
                own = "its own port" if port else "its own path"
                return (
                    f"{name} ({endpoint.removeprefix('tcp://') if name == '[http] bind' else endpoint}) and "
                    f"{other_name} ({other.removeprefix('tcp://') if other_name == '[http] bind' else other}) "
                    f"would take the same address; give each {own}"
                )
    return None


def split_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6ADDR]:PORT`` for IPv6) as ``(host, port)``, or :class:`ValueError` saying what is wrong."""
    host, colon, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    unbracketed_v6 = ":" in host and not bracketed
    # No ";": libzmq reads HOST;HOST:PORT as source;destination, which the loopback check would misread.
    bad = "/" in value or ";" in value or unbracketed_v6
    if not (colon and host and port.isdigit() and 1 <= int(port) <= 65535) or bad:
        raise ValueError(
            f"must be HOST:PORT with a port from 1 to 65535, like 127.0.0.1:8080 or [::1]:8080, not {value!r}"
        )
    return host, int(port)
