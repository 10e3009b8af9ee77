"""The ``eventagg`` command and the contract's scripts are one program: same code, same flags, no path tricks.

In-process (no process started): the dispatcher's help and refusals, and each script's import.
``tests/test_console_command.py`` runs the installed command from a wheel.
"""

from __future__ import annotations

import ast
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from harness import ROOT, free_port, run_script, unprivileged, write_config

from actors.cli import COMMANDS, main
from transport.commands.stats import table
from transport.subscriber import Subscriber

SCRIPTS = {
    "aggregatord.py": "run",
    "stats.py": "stats",
    "health.py": "health",
    "events.py": "events",
    "topics.py": "topics",
    "consumers.py": "consumers",
    "publish.py": "publish",
    "keys.py": "keys",
    "migrate.py": "migrate",
    "gateway.py": "gateway",
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_script_runs_the_commands_own_main_and_patches_no_path(script: str) -> None:
    source = (ROOT / "scripts" / script).read_text()
    imports = {
        node.module: [alias.name for alias in node.names]
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imports.get(COMMANDS[SCRIPTS[script]].module) == ["main"], imports
    assert "sys.path" not in source and "_bootstrap" not in source
    assert not (ROOT / "scripts" / "_bootstrap.py").exists()


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as leaving:
        main(["--help"])
    assert leaving.value.code == 0
    shown = capsys.readouterr().out
    for name in ("run", "stats", "events", "publish", "keys"):
        assert name in COMMANDS and f"    {name} " in shown, shown


def test_version_says_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as leaving:
        main(["--version"])
    assert leaving.value.code == 0
    assert capsys.readouterr().out == f"eventagg {version('eventagg')}\n"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_command_parses_its_own_flags_under_its_own_name(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as leaving:
        main([command, "--help"])
    assert leaving.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: eventagg {command} ")


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["--stats"]])
def test_no_or_an_unknown_command_is_a_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as leaving:
        main(argv)
    assert leaving.value.code == 2
    assert "usage: eventagg" in capsys.readouterr().err


def test_a_commands_refusal_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as leaving:
        main(["events", "--limit", "-1"])
    assert leaving.value.code == 2
    assert "eventagg events: error: argument --limit" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["stats", "--endpoint", "foo"], "argument --endpoint: must be a ZeroMQ endpoint like tcp://127.0.0.1:5555"),
        (["events", "--endpoint", "tcp://127.0.0.1:99999"], "argument --endpoint: needs a port from 1 to 65535"),
        (["events", "--follow", "--subscribe-endpoint", "5558"], "argument --subscribe-endpoint: must be a ZeroMQ"),
        (["publish", "--endpoint", "localhost:5555"], "argument --endpoint: must be a ZeroMQ endpoint"),
        (["events", ""], "no event can have this topic (topic must be 1-255 characters, not 0)"),
        # Planned in memory, and forked: a typo once ran the machine out of memory or processes.
        (["publish", "--events", "10000000001"], "--events must be at most 10,000,000"),
        (["publish", "--processes", "100000"], "--processes must be at most 256, not 100000"),
    ],
)
def test_an_endpoint_or_topic_that_cannot_work_is_refused_before_connecting(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as leaving:
        main(argv)
    assert leaving.value.code == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["topics", "--after", "a\udcff"], "--after"),  # was msgpack's UnicodeEncodeError traceback
        (["events", "--follow", "--name", "a\udcff"], "--name"),  # the same, once subscribing
        (["consumers", "--forget", "a\udcff"], "--forget"),  # was "no named consumer" (exit 1)
        (["publish", "--id-prefix", "a\udcff"], "--id-prefix"),  # was msgpack's words, naming no flag
        (["stats", "--endpoint", "tcp://\udcff:1"], "--endpoint"),  # was "'utf-8' codec can't encode" (exit 1)
    ],
)
def test_an_argument_whose_bytes_are_not_utf8_is_refused_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A shell passes such bytes as they are ($'a\xff'); Python hands them over as lone surrogates.
    nowhere = ["--timeout", "1"] if argv[0] != "publish" else ["--deadline", "1"]
    if flag != "--endpoint":
        nowhere += ["--endpoint", f"tcp://127.0.0.1:{free_port()}"]
    with pytest.raises(SystemExit) as leaving:
        main([*argv, *nowhere])
    assert leaving.value.code == 2
    assert f"argument {flag}: " in (err := capsys.readouterr().err) and "holds a byte that is not UTF-8" in err, err


@pytest.mark.parametrize(("slice_", "words"), [("abc", "--slice must look like K/P"), ("3/2", "needs 0 <= K < P")])
def test_a_bad_slice_is_a_usage_error_before_the_daemon_is_waited_for(
    slice_: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # It was checked after waiting up to --deadline for the daemon: with none there, the usage
    # error was never said, only "accepted no connection" (exit 1) a minute later.
    nowhere = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(SystemExit) as leaving:
        main(["publish", "--endpoint", nowhere, "--slice", slice_, "--deadline", "20"])
    assert leaving.value.code == 2 and words in capsys.readouterr().err
    assert time.monotonic() - started < 10


def test_a_daemon_that_takes_the_connection_but_never_speaks_is_said_to_be_not_answering(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # As a stopped (SIGSTOP) or hung daemon: the kernel completes the TCP handshake for it. The
    # command said only "took the connection but completed no handshake", with nothing to do.
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):  # listening, never accepting nor speaking
        with pytest.raises(SystemExit) as leaving:
            main(["stats", "--endpoint", f"tcp://127.0.0.1:{port}", "--timeout", "1"])
    assert leaving.value.code == 1
    err = capsys.readouterr().err
    assert "completed no handshake" in err and "is not answering (stopped, hung or overloaded" in err, err


def test_stats_prints_a_nested_map_as_a_block_of_its_own() -> None:
    lines = table({"uptime_s": 1.5, "received": 12_000, "cluster": {"received": 30_000, "late": 0}})
    assert lines[0].split() == ["received", "12,000"]
    assert lines[1].split() == ["uptime_s", "1.5"]
    assert lines[2] == "  cluster:"
    assert [line.split() for line in lines[3:]] == [["received", "30,000"], ["late", "0"]]
    assert all(line.startswith("    ") for line in lines[3:])


def test_client_commands_read_a_config_whose_dsn_names_systemd_credentials(tmp_path: Path) -> None:
    """The documented PostgreSQL dsn names $CREDENTIALS_DIRECTORY, set only for the service:
    a client command never uses the dsn, so it must not refuse the file over it."""
    config = write_config(
        tmp_path / "config.toml",
        {
            "storage": {"backend": "postgresql", "dsn": "host=db passfile=${CREDENTIALS_DIRECTORY}/pgpass"},
            "query": {"bind": f"tcp://127.0.0.1:{free_port()}"},
        },
    )
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    result = run_script("stats.py", "--config", str(config), "--timeout", "1", env=env, timeout=60)
    assert result.returncode == 1, result.stderr  # no daemon there: not a config error (2)
    assert "CREDENTIALS_DIRECTORY" not in result.stderr


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_run_says_its_start_errors_under_the_name_it_was_run_by(tmp_path: Path) -> None:
    """`eventagg run` said its refusals as "aggregatord: ...", a name the operator never typed
    (the systemd unit runs `eventagg run`); the script keeps the name it is known by."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[ordering]\nactorz = 3\n")
    junk = tmp_path / "events.db"
    junk.write_bytes(b"this is not an SQLite database\n" * 200)
    binds = {name: f"tcp://127.0.0.1:{free_port()}" for name in ("bind", "ack_bind", "query", "subscribe")}
    not_a_database = write_config(
        tmp_path / "junk.toml",
        {
            "ingest": {"bind": binds["bind"], "ack_bind": binds["ack_bind"]},
            "query": {"bind": binds["query"]},
            "subscribe": {"bind": binds["subscribe"]},
            "storage": {"path": str(junk)},
        },
    )
    runs = {
        "eventagg run": [sys.executable, "-m", "actors.cli", "run"],
        "aggregatord": [sys.executable, str(ROOT / "scripts" / "aggregatord.py")],
    }
    for name, command in runs.items():
        refused = subprocess.run([*command, "--config", str(bad)], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.startswith(f"{name}: unknown key [ordering] actorz"), refused.stderr
        failed = subprocess.run([*command, "--config", str(not_a_database)], capture_output=True, text=True, timeout=60)
        assert failed.returncode == 2, failed.stderr
        assert f" {name}: cannot start: cannot open database {junk}: file is not a database" in failed.stderr
        assert "Traceback" not in failed.stderr


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_every_command_refuses_a_named_pipe_as_its_config_at_once(tmp_path: Path) -> None:
    """`--config` naming a FIFO (made by mistake, or `<(...)`) hung every command and the daemon
    in open() until a writer came: for ever, under systemd."""
    pipe = tmp_path / "config.toml"
    os.mkfifo(pipe)
    takes_config = ["run", "stats", "health", "events", "topics", "consumers", "publish", "migrate", "gateway"]
    for command in takes_config:
        try:
            result = subprocess.run(
                [sys.executable, "-m", "actors.cli", command, "--config", str(pipe)],
                capture_output=True,
                text=True,
                timeout=20,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"eventagg {command} --config FIFO still waits after 20 s")
        assert result.returncode == 2, (command, result.stderr)
        assert f"config file {pipe} is a named pipe (FIFO): a config must be a regular file" in result.stderr
        assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_script_run_by_a_python_without_eventagg_says_how_to_run_it(script: str) -> None:
    # `python -S` has no site-packages, so neither eventagg nor pyzmq: as plain python3 on a
    # fresh checkout.
    result = subprocess.run(
        [sys.executable, "-S", str(ROOT / "scripts" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"{script}: No module named ")
    assert f".venv/bin/eventagg {SCRIPTS[script]}" in result.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("where", ["file", "under-file"])
def test_keys_into_a_file_says_it_is_not_a_folder(tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "config.toml"
    blocker.write_text("")
    folder = blocker if where == "file" else blocker / "keys"
    for args in (("server", str(folder)), ("client", "alice", str(folder))):
        result = run_script("keys.py", *args, timeout=30)
        assert result.returncode == 1, result.stdout + result.stderr
        assert (
            result.stderr == f"keys: {folder} is not a folder (a file is in the way); give a folder, made if missing\n"
        )
    authorized = run_script("keys.py", "client", "bob", str(tmp_path / "ok"), "--authorize", str(blocker), timeout=30)
    assert authorized.returncode == 1
    assert authorized.stderr.endswith(
        f"keys: {blocker} is not a folder (a file is in the way); give a folder, made if missing\n"
    )
    # Refused before the pair is written: it once was, and then blocked the corrected command.
    assert not (tmp_path / "ok" / "bob.key").exists()
    again = run_script(
        "keys.py", "client", "bob", str(tmp_path / "ok"), "--authorize", str(tmp_path / "ok"), timeout=30
    )
    assert again.returncode == 1 and "is the folder the pair is written into" in again.stderr, again.stderr
    fixed = run_script(
        "keys.py", "client", "bob", str(tmp_path / "ok"), "--authorize", str(tmp_path / "auth"), timeout=30
    )
    assert fixed.returncode == 0, fixed.stderr
    assert (tmp_path / "auth" / "bob.key").read_bytes() == (tmp_path / "ok" / "bob.key").read_bytes()


@pytest.mark.e2e
def test_keys_whose_output_cannot_be_written_are_made_and_authorized_all_the_same(tmp_path: Path) -> None:
    """The authorized copy was made after the printing: with the reader gone (`| head -c 0`) the
    command ended with a traceback-like line and 1 before it, and a retry was refused (the pair
    existed), so the key had to be copied by hand."""
    keys = [sys.executable, str(ROOT / "scripts" / "keys.py")]
    pipeline = f"set -o pipefail; {' '.join(keys)} client bob {tmp_path / 'mine'} --authorize {tmp_path / 'auth'}"
    reader_gone = subprocess.run(["bash", "-c", pipeline + " | head -c 0"], capture_output=True, text=True, timeout=60)
    assert reader_gone.returncode == 0 and reader_gone.stderr == "", reader_gone
    assert (tmp_path / "auth" / "bob.key").read_bytes() == (tmp_path / "mine" / "bob.key").read_bytes()
    with open("/dev/full", "w") as full:
        no_room = subprocess.run(
            [*keys, "server", str(tmp_path / "server")], stdout=full, stderr=subprocess.PIPE, text=True, timeout=60
        )
    assert no_room.returncode == 1 and "cannot write the output: No space left on device" in no_room.stderr
    assert (tmp_path / "server" / "server.key_secret").exists()
    bad_name = run_script("keys.py", "client", "no/slash", str(tmp_path / "x"), timeout=30)
    assert bad_name.returncode == 2 and "must be letters, digits" in bad_name.stderr, bad_name  # a usage error
    assert not (tmp_path / "x").exists()


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_keys_that_cannot_be_written_say_what_where_and_what_to_do_and_leave_nothing() -> None:
    """A folder this user may not write printed "keys: [Errno 13] Permission denied: '/x/.keys-k2j'"
    (a temporary folder the user never named); and a failed --authorize copy left the pair behind,
    so the corrected command was refused ("already exists")."""
    as_user, me = unprivileged()
    if as_user and shutil.which("setpriv") is None:
        pytest.skip("as root, this needs setpriv to run keys as a user whom file modes stop")
    home = Path(tempfile.mkdtemp(prefix="eventagg-keys-"))
    locked, mine, auth = home / "locked", home / "mine", home / "auth"

    def keys(*args: str) -> subprocess.CompletedProcess[str]:
        command = [*as_user, sys.executable, str(ROOT / "scripts" / "keys.py"), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=home)

    try:
        home.chmod(0o755)
        locked.mkdir(mode=0o555)
        for writable in (mine, auth):
            writable.mkdir(mode=0o700)
            os.chown(writable, me, -1)
        denied = f"permission denied; give a folder this user (uid {me}) can write"
        cases = {
            ("server", str(locked)): f"cannot write the certificates server.key and server.key_secret into {locked}",
            (
                "client",
                "alice",
                str(locked),
            ): f"cannot write the certificates alice.key and alice.key_secret into {locked}",
            ("server", str(locked / "sub")): f"cannot make the folder {locked / 'sub'}",
            # Not only permissions: every OSError is said so (here ENOENT: /proc makes no files).
            ("server", "/proc/self"): "cannot write the certificates server.key and server.key_secret into /proc/self",
            (
                "client",
                "bob",
                str(mine),
                "--authorize",
                str(locked),
            ): f"cannot copy bob.key into the authorized folder {locked}",
        }
        for args, doing in cases.items():
            result = keys(*args)
            assert result.returncode == 1, (args, result.stdout, result.stderr)
            assert result.stderr.startswith(f"keys: {doing}: "), result.stderr
            assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
            assert (denied if args[-1] != "/proc/self" else "give a folder this user can write") in result.stderr
        assert not list(locked.iterdir()) and not list(mine.iterdir())  # no half pair, no temporary folder
        fixed = keys("client", "bob", str(mine), "--authorize", str(auth))
        assert fixed.returncode == 0, fixed.stderr
        assert (auth / "bob.key").read_bytes() == (mine / "bob.key").read_bytes()
    finally:
        shutil.rmtree(home)


@pytest.mark.parametrize("name", ["", "x" * 201])
def test_a_consumer_name_the_daemon_would_refuse_is_refused_here(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as leaving:
        main(["events", "--follow", "--name", name])
    assert leaving.value.code == 2
    assert f"--name: a consumer's name must be 1 to 200 characters, not {len(name)}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as leaving:  # an empty name once listed the consumers and exited 0
        main(["consumers", "--forget", name])
    assert leaving.value.code == 2
    assert f"--forget: a consumer's name must be 1 to 200 characters, not {len(name)}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="a consumer's name must be 1 to 200 characters"):
        Subscriber("tcp://127.0.0.1:1", name=name)


def test_a_consumer_name_with_a_nul_is_refused_by_the_subscriber_at_once() -> None:
    with pytest.raises(ValueError, match="a consumer's name must not hold a NUL character"):
        Subscriber("tcp://127.0.0.1:1", name="bad\x00name")
