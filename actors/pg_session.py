"""Sessions on the PostgreSQL server: how each connection is made, and the timeouts that bound it.

Every connection a daemon makes (the writer's, the reader's, the subscription thread's and its
LISTEN one) comes from :func:`connect`: autocommit, keepalives, a connect timeout, a statement
timeout, and ``synchronous_commit`` at least ``on``.

The statement timeout is the server's: it cancels a statement that runs too long, but a server
that stops answering altogether (a hung host, a SIGSTOPped postmaster, a proxy that keeps the
socket open) never sends that cancellation, and the kernel keeps acknowledging keepalives. So
each connection also gives up on its own: a call that has had no answer for
:data:`ANSWER_MARGIN` times its statement timeout closes the connection and raises
:class:`psycopg.OperationalError`, which every caller already takes as a lost connection (made
again on the next call). A live server always answers first, with its own cancellation.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any

from actors.store import StorageError, StorageRefused
from actors.watchdog import ping_timeout
from transport.sdnotify import NotifyError, watchdog_interval

if TYPE_CHECKING:
    import psycopg

CONNECT_TIMEOUT_S = 3  # libpq's minimum is 2
STATEMENT_TIMEOUT_MS = 30_000
MIN_STATEMENT_TIMEOUT_MS = 500
# A call waits for an answer this many times its connection's statement timeout, then gives up.
# Above 1, so a live server's own cancellation always comes first; at most 2, so under a systemd
# watchdog (statement timeout half a ping's time) a hung server costs the writer no ping.
ANSWER_MARGIN = 1.5
# Set on the server's side of each session when the server's configuration leaves them at their
# defaults (the kernel's: two hours before the first probe).
SERVER_KEEPALIVES = {
    "tcp_keepalives_idle": 5,
    "tcp_keepalives_interval": 2,
    "tcp_keepalives_count": 3,
    "tcp_user_timeout": 10_000,
    # ms (PostgreSQL 14 and later; older servers lack it and it is not set): a server waiting on
    # a lock for a killed daemon's session notices the socket closed, and ends it, within a
    # second, so the node lock that session holds is free for the daemon restarted in its place.
    "client_connection_check_interval": 1_000,
}


def load_psycopg() -> Any:
    """psycopg, imported only when the PostgreSQL backend is used (it is an optional extra)."""
    try:
        import psycopg
    except ImportError:
        raise StorageError(
            'backend = "postgresql" needs psycopg 3: pip install "eventagg[postgresql]" (or psycopg[binary])'
        ) from None
    return psycopg


# Where a dsn may hold a password: a URI's user:password@, its ?password= parameter, and a
# connection string's password = value (quoted or not).
_PASSWORDS = (
    re.compile(r"://[^:@/?#]*:(?P<secret>[^@]*)@"),
    # An unencoded "@" in a URI password: libpq cuts at the first, and quotes the rest as the host.
    re.compile(r"://[^:@/?#]*:(?P<secret>[^/?#]*)@"),
    re.compile(r"[?&]password=(?P<secret>[^&#]*)"),
    re.compile(r"(?:^|\s)password\s*=\s*(?:'(?P<quoted>(?:[^'\\]|\\.)*)'|(?P<secret>\S+))"),
)


def without_password(text: str, dsn: str) -> str:
    """``text`` (a message about ``dsn``, which libpq may quote whole or in part) with every
    password the dsn holds replaced by ``***``."""
    secrets = {
        secret
        for pattern in _PASSWORDS
        for found in pattern.finditer(dsn)
        if (secret := found.groupdict().get("quoted") or found.group("secret"))
    }
    # A URI password with an unencoded / ? # or @ is cut there by libpq, which then quotes a
    # piece as the port or the host: each piece is secret too (unless too short to tell from text).
    secrets |= {piece for secret in secrets for piece in re.split(r"[/?#@]", secret) if len(piece) >= 3}
    for secret in sorted(secrets, key=len, reverse=True):  # the longest first: one may hold another
        text = text.replace(secret, "***")
    return text


def one_line(exc: BaseException) -> str:
    """An error message on one line: libpq's lines (a failure, then a hint or detail) joined by
    "; " so they still read apart."""
    lines = (" ".join(line.split()) for line in str(exc).splitlines())
    return "; ".join(line for line in lines if line) or type(exc).__name__


def describe_dsn(dsn: str) -> str:
    """Where a dsn points, for messages: ``host:port/dbname``, never its password."""
    pg = load_psycopg()
    try:
        params = pg.conninfo.conninfo_to_dict(dsn)
    except pg.Error:
        return "PostgreSQL (unparsable dsn)"
    host = params.get("host") or params.get("hostaddr") or "local socket"
    port = params.get("port") or "5432"
    # A URI whose password holds an unencoded "/" parses with the password's pieces as port and
    # database: the dsn's own secrets are taken out of whatever the parse made.
    return without_password(f"PostgreSQL {host}:{port}/{params.get('dbname') or params.get('user') or ''}", dsn)


@functools.cache
def _bounded_connection() -> Any:
    """The connection class whose calls give up on a server that does not answer (made once psycopg is imported)."""
    pg = load_psycopg()
    # What psycopg's wait raises when its timeout passes (an OperationalError); the connection
    # is then mid-protocol and cannot be used again.
    wait_timeout = getattr(pg.errors, "_WaitTimeout", pg.OperationalError)

    class NoAnswer(pg.OperationalError):  # type: ignore[misc, name-defined]
        """The server did not answer in time; the connection is closed."""

    class BoundedConnection(pg.Connection):  # type: ignore[misc, name-defined]
        """A psycopg connection whose every call waits at most ``answer_timeout_s`` for the server."""

        answer_timeout_s: float | None = None

        def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
            # psycopg passes its own timeout where it has one (cancellation, notifies): kept.
            if kwargs.get("timeout") is None and len(args) < 2:
                kwargs["timeout"] = self.answer_timeout_s
            try:
                return super().wait(gen, *args, **kwargs)
            except wait_timeout:
                self.close()
                raise NoAnswer(
                    f"the server did not answer within {kwargs['timeout']:g} s; the connection was dropped"
                ) from None

    BoundedConnection.NoAnswer = NoAnswer
    return BoundedConnection


def no_answer_error() -> type[Exception]:
    """The error a connection from :func:`connect` raises when the server did not answer in time."""
    return _bounded_connection().NoAnswer  # type: ignore[no-any-return]


def set_statement_timeout(conn: psycopg.Connection[Any], milliseconds: int) -> None:
    """Set the session's statement timeout, and how long the connection waits for any answer."""
    conn.execute(f"SET statement_timeout = {int(milliseconds)}")
    conn.answer_timeout_s = milliseconds / 1000 * ANSWER_MARGIN  # type: ignore[attr-defined]


_PORT = re.compile(r"\+?[0-9]+")


def connect(dsn: str, node: str, purpose: str) -> psycopg.Connection[Any]:
    """An autocommit connection with timeouts and keepalives set unless the dsn sets them.

    Raises :class:`StorageRefused` when the dsn is bad and :class:`StorageError` (one line,
    naming the server) when the server cannot be reached.
    """
    pg = load_psycopg()
    where = describe_dsn(dsn)
    # A dsn that does not parse, or whose port is no port number, can never work: StorageRefused,
    # so the daemon exits 2 as for a refused config (no restart loop under systemd).
    try:
        params = pg.conninfo.conninfo_to_dict(dsn)
    except pg.Error as exc:
        reason = without_password(one_line(exc), dsn)  # libpq quotes the dsn, password and all
        raise StorageRefused(f"[storage] dsn is not a valid libpq connection string or URI: {reason}") from None
    ports = str(params.get("port", "")).split(",")
    named_hosts = params.get("host") or params.get("hostaddr")
    hosts = str(named_hosts or "").split(",")
    # Hosts from PGHOST or a service file are libpq's to count.
    if named_hosts and len(ports) > 1 and len(ports) != len(hosts):
        raise StorageRefused(
            f"[storage] dsn names {len(ports)} ports for {len(hosts)} host(s): give one port for every"
            " host, or one for all"
        )
    for port in ports:  # libpq takes a list, one per host
        # As libpq reads one (ASCII digits, a sign allowed); str.isdigit also takes "²" and "٥".
        if port.strip() and not (_PORT.fullmatch(port.strip()) and 0 < int(port) < 65536):
            # Not quoted: from a URI whose password holds a "/", libpq takes a piece of it for the port.
            raise StorageRefused(
                "[storage] dsn names a port that is no port number (1 to 65535); in a URI, percent-encode"
                " any '/', '@' or ':' in the password (%2F, %40, %3A)"
            )
    defaults = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": 10_000,  # ms: a write to a vanished server fails instead of hanging
        "application_name": f"eventagg {node} {purpose}"[:63],
    }
    for key, value in defaults.items():
        params.setdefault(key, value)
    try:
        conn: psycopg.Connection[Any] = _bounded_connection().connect(**params, autocommit=True)
    except pg.Error as exc:
        raise StorageError(
            f"cannot connect to {where} ([storage] dsn): {without_password(one_line(exc), dsn)}"
        ) from None
    conn.answer_timeout_s = STATEMENT_TIMEOUT_MS / 1000 * ANSWER_MARGIN  # type: ignore[attr-defined]
    try:
        set_statement_timeout(conn, STATEMENT_TIMEOUT_MS)
        conn.execute("SET idle_in_transaction_session_timeout = 60000")
        # At least "on": an acknowledged event is then on the primary's disk (and, with a
        # synchronous standby configured, on the standby's); a stronger server default stays.
        setting = conn.execute("SHOW synchronous_commit").fetchone()
        if setting is None or setting[0] in ("off", "local"):
            conn.execute("SET synchronous_commit = on")
        # The server's side of the keepalives, where nobody configured them: after a network
        # partition the server ends this session (and frees the node lock it holds, which the
        # writer's new session needs) within seconds, not the kernel's two hours.
        unset = conn.execute(
            "SELECT name FROM pg_settings WHERE name = ANY(%s) AND source = 'default'", (list(SERVER_KEEPALIVES),)
        ).fetchall()
        if unset:
            conn.execute("; ".join(f"SET {name} = {SERVER_KEEPALIVES[name]}" for (name,) in unset))
    except pg.Error as exc:
        conn.close()
        raise StorageError(f"cannot set up a session on {where}: {one_line(exc)}") from None
    return conn


def running_statement_timeout_ms() -> int:
    """The statement timeout of the writer's and the reader's connections once the daemon runs.

    Under a systemd watchdog, half what a liveness ping may take: an actor waiting on the
    database (a lock held by another session's ``VACUUM FULL`` or ``ALTER TABLE``, a server too
    busy to answer) must still answer its ping, or systemd restarts every daemon on the database.
    The statement is cancelled instead, rolled back and retried with the rest of the failures.
    Start-up keeps :data:`STATEMENT_TIMEOUT_MS`: migrations and a wait for another daemon's may
    take longer, and pings start only once the daemon is ready.
    """
    try:
        interval = watchdog_interval()
    except NotifyError:
        interval = None  # the daemon refuses to start over it, with the reason
    if interval is None:
        return STATEMENT_TIMEOUT_MS
    return max(MIN_STATEMENT_TIMEOUT_MS, min(STATEMENT_TIMEOUT_MS, int(ping_timeout(interval) * 500)))
