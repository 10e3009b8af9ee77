"""Configuration: defaults, partial files, relative paths, and a clear error naming each bad key."""

from __future__ import annotations

import os
import socket
import time
import tomllib
from pathlib import Path

import pytest

from transport.client import connectable
from transport.config import Config, ConfigError, expand_environment, load_config, parse_config, tcp_host_port

ROOT = Path(__file__).resolve().parents[1]


def test_repository_config_toml_holds_every_default() -> None:
    shipped = load_config(ROOT / "config.toml")
    defaults = Config()
    sections = set(Config.__dataclass_fields__) - {"source", "expanded"}
    for section in sections:
        assert getattr(shipped, section) == getattr(defaults, section), section
    # ... and every section and key is written out, so the file documents them all.
    data = tomllib.loads((ROOT / "config.toml").read_text())
    assert set(data) == sections
    for section in data:
        assert set(data[section]) == set(type(getattr(defaults, section)).__dataclass_fields__), section


def test_partial_file_takes_defaults_for_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[ordering]\nactors = 2\n")
    config = load_config(path)
    assert config.ordering.actors == 2
    assert config.ingest == Config().ingest


def test_relative_storage_path_is_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    path = tmp_path / "sub" / "c.toml"
    path.parent.mkdir()
    path.write_text('[storage]\npath = "db/events.db"\n')
    assert load_config(path).database_path == tmp_path / "sub" / "db" / "events.db"


def test_state_directory_wins_for_a_relative_storage_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    assert Config().database_path == tmp_path / "state" / "data" / "events.db"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[ingest]\nbindd = 'x'\n", r"unknown key \[ingest\] bindd"),
        ("[nope]\nx = 1\n", r"unknown section \[nope\]"),
        ("[ordering]\nactors = 0\n", r"\[ordering\] actors must be greater than 0"),
        ("[storage]\ncache_mb = 0\n", r"\[storage\] cache_mb must be greater than 0"),
        ("[ordering]\nactors = true\n", r"\[ordering\] actors must be an integer, not true or false \(True\)"),
        ("[ordering]\nactors = '4'\n", r"\[ordering\] actors must be an integer, not a string \('4'\)"),
        ("[ordering]\nwindow_ms = -1\n", r"\[ordering\] window_ms"),
        ("[ingest]\ngather_at_queued = -1\n", r"\[ingest\] gather_at_queued must be 0"),
        ("[ingest]\ndecode_process = 1\n", r"\[ingest\] decode_process must be true or false, not an integer \(1\)"),
        ("[storage]\nsynchronous = 'SOMETIMES'\n", r"\[storage\] synchronous must be one of"),
        # Without backend = "postgresql" these would be ignored, each daemon on a file of its own.
        ("[storage]\ndsn = 'postgresql://db/e'\n", r'\[storage\] dsn is set, but backend is "sqlite" \(the default\)'),
        (
            "[storage]\nbackend = 'sqlite'\nnode = 'a'\n",
            r'\[storage\] node is set, but backend is "sqlite" \(as written',
        ),
        ("[log]\nlevel = 'LOUD'\n", r"\[log\] level must be one of"),
        ("[query]\nbind = '127.0.0.1:5556'\n", r"\[query\] bind must be a ZeroMQ endpoint"),
        # libzmq would bind these without a word, on the port modulo 65 536 (99 999 -> 34 463).
        ("[query]\nbind = 'tcp://127.0.0.1:99999'\n", r"\[query\] bind needs a port from 1 to 65535"),
        ("[ingest]\nack_bind = 'tcp://127.0.0.1:-1'\n", r"\[ingest\] ack_bind needs a port from 1 to 65535"),
        ("[ingest]\nbind = 'tcp://127.0.0.1'\n", r"\[ingest\] bind needs a port from 1 to 65535"),
        ("[ingest]\nbind = [1]\n", r"\[ingest\] bind must be a string, not an array"),
        # Accepted by libzmq, but no other process can reach them through these socket types.
        ("[ingest]\nbind = 'inproc://ingest'\n", r"\[ingest\] bind must be tcp://HOST:PORT or ipc://PATH.*inproc"),
        ("[query]\nbind = 'udp://127.0.0.1:5556'\n", r"\[query\] bind must be tcp://HOST:PORT or ipc://PATH"),
        ("[subscribe]\nbind = 'tcp://::1:5558'\n", r"\[subscribe\] bind needs its IPv6 host in brackets"),
        ("[subscribe]\nbind = 'ipc://'\n", r"\[subscribe\] bind needs a path"),
        ("[ingest]\nbind = 'tcp://127.0.0.1;127.0.0.1:5555'\n", r"\[ingest\] bind takes one host, not libzmq's source"),
        ('[subscribe]\nbind = "ipc:///tmp/a\\u0000b"\n', r"\[subscribe\] bind holds a NUL character"),
        ('[storage]\npath = "/tmp/a\\u0000b.db"\n', r"\[storage\] path holds a NUL character"),
        ("[query]\nbind = 'tcp://127.0.0.1:5555'\n", r"\[ingest\] bind \(tcp://127.0.0.1:5555\) and \[query\] bind"),
        ("[subscribe]\nbind = 'tcp://*:5557'\n", r"ack_bind .* and \[subscribe\] bind \(tcp://\*:5557\) would"),
        ("[http]\nbind = '127.0.0.1:5556'\n", r"\[query\] bind .* and \[http\] bind \(127.0.0.1:5556\) would take"),
        ("ingest = 3\n", r"\[ingest\] must be a table"),
        ("not toml at all [", "not valid TOML"),
        # Each actor is a thread: 100 000 of them ended in "can't start new thread" after 600 MB.
        ("[ordering]\nactors = 100000\n", r"\[ordering\] actors must be at most 256 \(each is a thread"),
        ("[ordering]\nwindow_ms = 99999999999999\n", r"\[ordering\] window_ms must be at most 3600000 \(an hour"),
        ("[ingest]\nrcvhwm = 2147483648\n", r"\[ingest\] rcvhwm must be at most 2147483647 \(ZeroMQ takes it"),
        # Rounded to "0.", it was called "not a duration; write a number and a unit" though it was one.
        ("[retention]\nsweep_interval = 1e-300\n", r"\[retention\] sweep_interval '0.0' must be longer than 0"),
        # Taken, these stopped the daemon at start with a traceback (exit 1: restarted in a loop).
        ("[subscribe]\nheartbeat_ms = 2147483648\ntimeout_ms = 2147483649\n", r"\[subscribe\] heartbeat_ms must be at"),
        ("[subscribe]\ntimeout_ms = 2147483648\n", r"\[subscribe\] timeout_ms must be at most 2147483647 \(ZeroMQ"),
        # Taken, the daemon ran, but `eventagg publish --config` and Publisher.from_config failed with a ValueError.
        ("[ingest]\nmax_payload_bytes = 2147483648\n", r"\[ingest\] max_payload_bytes must be at most 2147483647"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_max_bytes_is_taken_on_either_backend(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    for backend in ("sqlite", "postgresql"):
        dsn = "dsn = 'postgresql://x/y'\n" if backend == "postgresql" else ""
        path.write_text(f"[storage]\nbackend = '{backend}'\n{dsn}[retention]\nmax_bytes = '1GB'\n")
        assert load_config(path).retention.max_bytes_value == 1_000_000_000


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")


def test_lowercase_choices_are_accepted() -> None:
    assert parse_config({"storage": {"synchronous": "full"}}).storage.synchronous == "FULL"


def test_paths_may_name_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    written = {"security": {"curve_secret_key": "${CREDENTIALS_DIRECTORY}/curve-secret"}}
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/eventagg.service")
    config = parse_config(written)
    assert config.security.curve_secret_key == "${CREDENTIALS_DIRECTORY}/curve-secret"  # as written, until used
    assert config.resolve(config.security.curve_secret_key, "[security] curve_secret_key") == Path(
        "/run/credentials/eventagg.service/curve-secret"
    )
    expanded = expand_environment(config).security.curve_secret_key
    assert expanded == "/run/credentials/eventagg.service/curve-secret"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    config = parse_config(written)  # a client's load: no error for what it may never use
    with pytest.raises(ConfigError, match=r"\[security\] curve_secret_key = .* not set \(systemd sets it"):
        expand_environment(config)  # the daemon's: an error at once
    with pytest.raises(ConfigError, match=r"\[security\] curve_secret_key = .* not set"):
        config.resolve(config.security.curve_secret_key, "[security] curve_secret_key")  # a client using it


def test_a_config_file_not_in_utf8_is_refused_naming_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b"# caf\xe9\n[ingest]\nrcvhwm = 100\n")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 0xe9 at offset 5\); save it as UTF-8"):
        load_config(path)


def test_binds_on_distinct_addresses_or_ipc_paths_are_taken() -> None:
    config = parse_config(
        {
            "ingest": {"bind": "tcp://[::1]:5555", "ack_bind": "ipc:///run/eventagg/ack"},
            "query": {"bind": "tcp://127.0.0.2:5555"},  # the same port on another address
            "subscribe": {"bind": "ipc:///run/eventagg/subscribe"},
        }
    )
    assert (config.ingest.bind, config.subscribe.bind) == ("tcp://[::1]:5555", "ipc:///run/eventagg/subscribe")


def test_a_wildcard_bind_is_connected_to_on_loopback() -> None:
    assert [connectable(f"tcp://{host}:5555") for host in ("*", "0.0.0.0", "[::]", "[::1]", "10.0.0.1")] == [
        "tcp://127.0.0.1:5555",
        "tcp://127.0.0.1:5555",
        "tcp://[::1]:5555",
        "tcp://[::1]:5555",
        "tcp://10.0.0.1:5555",
    ]


@pytest.mark.parametrize(
    ("sections", "named"),
    [
        ({"ingest": {"bind": "tcp://127.0.0.1:7001", "ack_bind": "tcp://127.0.0.1:7001"}}, "[ingest] bind"),
        ({"ingest": {"bind": "tcp://*:7001", "ack_bind": "tcp://127.0.0.1:7001"}}, "[ingest] bind (tcp://*:7001)"),
        ({"ingest": {"bind": "tcp://[::]:7001", "ack_bind": "tcp://[::1]:7001"}}, "[ingest] bind (tcp://[::]:7001)"),
        ({"ingest": {"bind": "ipc:///tmp/e.sock"}, "query": {"bind": "ipc:///tmp/e.sock"}}, "[query] bind"),
        ({"ingest": {"bind": "tcp://127.0.0.1:8080"}}, "[http] bind (127.0.0.1:8080)"),
    ],
)
def test_two_binds_that_would_take_the_same_address_are_refused_naming_both(
    sections: dict[str, dict[str, str]], named: str
) -> None:
    with pytest.raises(ConfigError, match="would take the same address; give each its own") as caught:
        parse_config(sections)
    assert named in str(caught.value)


def test_two_ipc_binds_on_one_path_are_told_to_take_a_path_each() -> None:
    # A port would not part them: an ipc endpoint has a path, no port.
    with pytest.raises(ConfigError, match="give each its own path$"):
        parse_config({"ingest": {"bind": "ipc:///tmp/e.sock"}, "query": {"bind": "ipc:///tmp/e.sock"}})
    with pytest.raises(ConfigError, match="give each its own port$"):
        parse_config({"ingest": {"bind": "tcp://127.0.0.1:7001", "ack_bind": "tcp://127.0.0.1:7001"}})


def test_binds_on_other_ports_or_hosts_do_not_collide() -> None:
    parse_config({"ingest": {"bind": "tcp://127.0.0.1:7001", "ack_bind": "tcp://127.0.0.2:7001"}})
    parse_config({"ingest": {"bind": "tcp://[::1]:7001", "ack_bind": "tcp://[::1]:7002"}})


@pytest.mark.parametrize(
    ("endpoint", "place"),
    [
        ("tcp://127.0.0.1:5555", ("127.0.0.1", "5555")),
        ("tcp://[::1]:5555", ("::1", "5555")),
        ("tcp://*:5555", ("*", "5555")),
        ("tcp://eth0;192.0.2.1:5555", ("192.0.2.1", "5555")),
        ("tcp://localhost", ("localhost", "")),
        ("ipc:///run/eventagg.sock", None),
    ],
)
def test_tcp_host_port_splits_an_endpoint_as_libzmq_binds_it(endpoint: str, place: tuple[str, str] | None) -> None:
    assert tcp_host_port(endpoint) == place


def test_allowed_hosts_is_an_array_of_names() -> None:
    assert parse_config({"http": {"allowed_hosts": ["a.example", "b"]}}).http.allowed_hosts == ("a.example", "b")
    for bad in ("a.example", ["a b"], [""], [3]):
        with pytest.raises(ConfigError, match=r"\[http\] allowed_hosts must be an array"):
            parse_config({"http": {"allowed_hosts": bad}})


def test_allowed_origins_is_an_array_of_web_origins_without_null() -> None:
    origins = ["https://app.example.com", "http://localhost:3000", "http://[::1]:8080", "*"]
    assert parse_config({"http": {"allowed_origins": origins}}).http.allowed_origins == tuple(origins)
    for bad in (["https://app.example.com/"], ["app.example.com"], ["ftp://a.example"], ["https://u@a.example"]):
        with pytest.raises(ConfigError, match=r"\[http\] allowed_origins must be an array of web origins"):
            parse_config({"http": {"allowed_origins": bad}})
    # Each of these was taken and then matched no Origin a browser sends.
    for bad in (["http://x.example:99999"], ["http://localhost:0080"]):
        with pytest.raises(ConfigError, match=r"\[http\] allowed_origins must be an array of web origins"):
            parse_config({"http": {"allowed_origins": bad}})
    with pytest.raises(ConfigError, match=r"allowed_origins takes no patterns \('https://\*\.example\.com'"):
        parse_config({"http": {"allowed_origins": ["https://*.example.com"]}})
    with pytest.raises(ConfigError, match=r'\[http\] allowed_origins cannot list "null"'):
        parse_config({"http": {"allowed_origins": ["null"]}})
    with pytest.raises(ConfigError, match=r"\[http\] allowed_origins must be an array"):
        parse_config({"http": {"allowed_origins": "https://app.example.com"}})


def test_a_dollar_dollar_in_a_daemon_path_is_one_dollar_once_expanded() -> None:
    """The daemon expanded its paths at start, then again when it resolved them: "k$$dir" became
    "k$dir", then the variable dir (a traceback when unset, another file when set)."""
    config = expand_environment(parse_config({"security": {"curve_secret_key": "/keys/k$$dir/server.key_secret"}}))
    assert config.resolve(config.security.curve_secret_key, "[security] curve_secret_key") == Path(
        "/keys/k$dir/server.key_secret"
    )
    client = parse_config({"security": {"client_certificate": "/keys/k$$dir/c.key_secret"}})
    assert client.resolve(client.security.client_certificate, "[security] client_certificate") == Path(
        "/keys/k$dir/c.key_secret"
    )


def test_binds_whose_ports_differ_only_by_leading_zeros_collide() -> None:
    with pytest.raises(ConfigError, match="would take the same address"):
        parse_config({"ingest": {"bind": "tcp://127.0.0.1:05555", "ack_bind": "tcp://127.0.0.1:5555"}})


def test_a_relative_ipc_bind_is_made_absolute_against_the_config_files_folder(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[query]\nbind = "ipc://q.sock"\n[subscribe]\nbind = "ipc://@eventagg-sub"\n')
    config = load_config(path)
    assert config.query.bind == f"ipc://{tmp_path}/q.sock"
    assert config.subscribe.bind == "ipc://@eventagg-sub"  # an abstract socket's name, no path


def test_a_config_path_that_never_ends_is_refused_not_read_for_ever(tmp_path: Path) -> None:
    # tomllib.load read all of it: `--config /dev/zero` (or a log given by mistake) grew until
    # the machine ran out of memory, every command and the daemon alike.
    big = tmp_path / "big.toml"
    big.write_text("# x\n" * 300_000)
    with pytest.raises(ConfigError, match="larger than 1048576 bytes"):
        load_config(big)
    with pytest.raises(ConfigError, match=r"config file /dev/zero is a character device: a config must be a regular"):
        load_config("/dev/zero")  # not read at all now: a device is no config file
    assert load_config("/dev/null") == Config(source=Path("/dev/null"))  # empty: every default


@pytest.mark.timeout(30)
def test_a_config_path_that_is_not_a_regular_file_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    """A named pipe given as --config blocked every command, and the daemon, in open() for ever
    (waiting for a writer); a socket said "No such device or address", a folder "Is a directory"."""
    pipe = tmp_path / "config.toml"
    os.mkfifo(pipe)
    listening = tmp_path / "config.sock"
    folder = tmp_path / "conf.d"
    folder.mkdir()
    link = tmp_path / "link.toml"
    link.symlink_to(pipe)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(listening))
        cases = {pipe: "a named pipe (FIFO)", link: "a named pipe (FIFO)", listening: "a socket", folder: "a folder"}
        for path, kind in cases.items():
            started = time.monotonic()
            with pytest.raises(ConfigError) as refused:
                load_config(path)
            assert str(refused.value) == (
                f"config file {path.resolve()} is {kind}: a config must be a regular file; give the path of one"
            )
            assert time.monotonic() - started < 5
    regular = tmp_path / "regular.toml"
    regular.write_text('[log]\nlevel = "DEBUG"\n')
    assert load_config(regular).log.level == "DEBUG"
