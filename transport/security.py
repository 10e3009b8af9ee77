"""CURVE security: who may publish and query, and the safe defaults around it.

Theory of operation. ZeroMQ's CURVE mechanism encrypts every connection and proves both ends'
keys. The daemon holds one secret certificate (``[security] curve_secret_key``); clients hold
their own certificate and the server's public key. Which client keys are let in is decided by
the daemon's ZAP handler (:mod:`transport.zap`) from a folder of public certificates
(``[security] authorized_keys``); the same handler gives every connection, CURVE or not, a
routing id no peer can make a ROUTER crash over. A ZAP handler must be bound in the daemon's
context *before* any server socket accepts a connection, otherwise libzmq lets every valid
CURVE client in, so :meth:`ServerSecurity.start` runs before the sockets bind. A key removed
by a reload also stops the connections it already has: the servers check each message's
``User-Id`` through :attr:`ServerSecurity.gate`. A reload takes the folder file by file: one bad
certificate (a half-written copy, say) must not hold back the revocation of another client, so
every good file's key is loaded, a removed file's key is dropped, and a bad file keeps the key
that file name held before (none if it is new), with a warning naming it.

Refused clients are counted from socket monitor events: a plain (NULL) client meets a CURVE
server with ``EVENT_HANDSHAKE_FAILED_PROTOCOL`` (mechanism mismatch) and a CURVE client whose key
is not in the folder with ``EVENT_HANDSHAKE_FAILED_AUTH`` (ZAP said 400). Every failed
handshake counts once; a client that keeps reconnecting counts once per attempt.

Without CURVE, binding anything but loopback (or ``ipc://``/``inproc://``) is refused unless
``[security] allow_insecure = true``. Key files that others could read (secret) or write
(public, authorized folder) are refused, since either lets someone else impersonate a party.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.utils.monitor import parse_monitor_message

from transport.config import Config, tcp_host_port
from transport.logs import RateLimitedLog
from transport.zap import ZAP_DOMAIN, ConnectionGate, ZapHandler, seed_libc_rand

log = logging.getLogger(__name__)

SocketHook = Callable[["zmq.Socket[Any]"], None]

MONITOR_POLL_MS = 100
REFUSAL_EVENTS: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "key not authorized",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol error (a client without CURVE, or the wrong server key)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed",
}

# The names of the ingest server's two sockets, told apart by type; the query and subscribe
# servers' ROUTER sockets are named by their owners, through ServerSecurity.hook_for.
_SOCKET_NAMES: dict[int, str] = {zmq.PULL: "ingest", zmq.ROUTER: "acknowledged ingest"}


class SecurityError(Exception):
    """The security settings or key files do not allow a safe start; the message says what to fix."""


class InsecureBindError(SecurityError):
    """An endpoint beyond loopback would be bound without CURVE."""


class BindHostError(SecurityError):
    """A bind endpoint names a host this machine cannot resolve."""


class KeyFileError(SecurityError):
    """A certificate file or folder is missing, malformed or has loose permissions."""


def is_local_endpoint(endpoint: str) -> bool:
    """Whether only this machine can reach ``endpoint``: loopback TCP, ``ipc://`` or ``inproc://``."""
    if endpoint.partition("://")[0] in ("ipc", "inproc"):
        return True
    host = _tcp_host(endpoint)
    if host is None:
        return False  # pgm, epgm, vmci, udp...: treat as reachable from elsewhere
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name, a host name: assume it is reachable


def bind_is_local(key: str, endpoint: str) -> bool:
    """Like :func:`is_local_endpoint` for an endpoint to bind, with host names resolved: a name
    whose every address is loopback is local.

    Raises :class:`BindHostError` for a name that is neither an address, an interface nor a host
    name this machine resolves: binding would fail on it, with a message naming neither.
    """
    if is_local_endpoint(endpoint):
        return True
    host = _tcp_host(endpoint)
    if host is None or host == "*" or host in {name for _index, name in socket.if_nameindex()}:
        return False
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return False  # an address that is not loopback
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindHostError(
            f"{key} = {endpoint}: {host!r} is not an address, an interface or a host name this machine resolves "
            f"({exc.strerror}); bind to an address such as 127.0.0.1, or to * for every interface"
        ) from None
    return all(ipaddress.ip_address(str(address[4][0]).split("%")[0]).is_loopback for address in found)


def _tcp_host(endpoint: str) -> str | None:
    """The host part of a tcp:// (or ws://, wss://) endpoint to bind; None for other transports."""
    place = tcp_host_port(endpoint)
    return None if place is None else place[0]


def check_secret_file(path: Path, what: str) -> None:
    """Refuse a secret certificate that is missing or that anyone but its owner may read or write."""
    info = _stat(path, what)
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{what} {path} is not a regular file")
    _check_owner(path, info, what)
    if info.st_mode & 0o077:
        raise KeyFileError(
            f"{what} {path} has loose permissions ({stat.filemode(info.st_mode)}): it holds a secret key; "
            f"run `chmod 600 {path}` (and make a new key pair if others may have read it)"
        )


def check_public_path(path: Path, what: str) -> None:
    """Refuse a public certificate or folder of them that anyone but its owner may write, or
    whose owner is neither root nor the daemon's user."""
    info = _stat(path, what)
    if info.st_mode & 0o022:
        raise KeyFileError(
            f"{what} {path} is writable by others ({stat.filemode(info.st_mode)}), so anyone could add "
            f"or swap a key; run `chmod go-w {path}`"
        )
    _check_owner(path, info, what)


def _check_owner(path: Path, info: os.stat_result, what: str) -> None:
    # An owner may chmod its file at will: a third user owning a key or the folder could let
    # any key in, whatever the mode is now (sshd's StrictModes refuses the same).
    me = os.geteuid()
    if info.st_uid not in (0, me):
        raise KeyFileError(
            f"{what} {path} is owned by uid {info.st_uid}, neither root nor the daemon's user (uid {me}), "
            f"so that user could add or swap a key; run `chown {me} {path}`"
        )


def _stat(path: Path, what: str) -> os.stat_result:
    try:
        return path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path} does not exist; create it with `eventagg keys`") from None
    except PermissionError:  # a folder on the way that this user may not enter
        me = os.geteuid()
        parents = reversed(path.absolute().parents)
        closed = next((folder for folder in parents if not os.access(folder, os.X_OK)), path.parent)
        raise KeyFileError(
            f"{what} {path} is out of this user's reach (uid {me}): it may not enter {closed}; "
            f"run `chown {me} {closed}` (or `chmod o+x {closed}`)"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_secret_certificate(path: Path, what: str = "secret certificate") -> tuple[bytes, bytes]:
    """The ``(public, secret)`` keys of a ``zmq.auth`` secret certificate, after checking its permissions."""
    public, secret = _load(path, what)
    if not secret:
        raise KeyFileError(f"{what} {path} holds no secret key; pass the '.key_secret' file, not the public '.key' one")
    check_secret_file(path, what)
    return public, secret


def load_public_key(path: Path, what: str = "public certificate") -> bytes:
    """The public key of a ``zmq.auth`` certificate (public or secret one), after checking its permissions."""
    check_public_path(path, what)
    public, _ = _load(path, what)
    return public


def _unreadable(path: Path, what: str) -> KeyFileError:
    """The refusal of a certificate or folder this user may not read, with the command that lets it."""
    me = os.geteuid()
    if path.stat().st_uid != me:
        fix = f"chown {me} {path}"  # not chmod: a secret must stay owner-only
    else:
        fix = f"chmod u+{'rx' if path.is_dir() else 'r'} {path}"
    return KeyFileError(f"{what} {path} is not readable by this user (uid {me}); run `{fix}`")


def _load(path: Path, what: str) -> tuple[bytes, bytes | None]:
    # Opening a FIFO (or a device) waits for a writer that may never come: a daemon stuck there
    # at start, or on SIGHUP, no longer even acts on SIGTERM. So only regular files are opened.
    if not stat.S_ISREG(_stat(path, what).st_mode):
        raise KeyFileError(f"{what} {path} is not a regular file; give the certificate file itself")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except PermissionError:
        raise _unreadable(path, what) from None  # a certificate, but not ours to read: keys.py is no cure
    except (OSError, ValueError) as exc:
        raise KeyFileError(
            f"{what} {path} is not a zmq.auth certificate ({exc}); make one with `eventagg keys`"
        ) from None
    # Checked here, not left to libzmq: it refuses a bad key only when a socket is bound or
    # connected, with nothing but "Invalid argument".
    for name, key in (("public-key", public), ("secret-key", secret)):
        problem = None if key is None else z85_key_problem(key)
        if problem is not None:
            raise KeyFileError(f"{what} {path}: its {name} {problem}; make a new one with `eventagg keys`")
    if secret is not None and zmq.curve_public(secret) != public:
        raise KeyFileError(
            f"{what} {path}: its public-key is not the public half of its secret-key (the file was edited "
            "or pieced together); use the certificate `eventagg keys` made, or make a new one"
        )
    return public, secret


Z85_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"


def z85_key_problem(key: bytes) -> str | None:
    """What keeps ``key`` from being a CURVE key in Z85 text (40 characters of the Z85 alphabet,
    each 5 of them at most 2**32 - 1), said as the end of a sentence; None for a good key."""
    if len(key) != 40:
        return f"is {len(key)} characters long, not the 40 of a Z85 key"
    outside = sorted(set(key.decode("latin-1")) - set(Z85_ALPHABET))
    if outside:
        return f"holds characters outside the Z85 alphabet ({' '.join(repr(char) for char in outside)})"
    text = key.decode("ascii")
    for start in range(0, 40, 5):
        value = 0
        for char in text[start : start + 5]:
            value = value * 85 + Z85_ALPHABET.index(char)
        if value > 0xFFFF_FFFF:
            return f"holds {text[start : start + 5]!r}, which is beyond Z85's range (32 bits per 5 characters)"
    return None


def authorized_key_files(folder: Path) -> list[Path]:
    """The certificates an authorized keys folder holds: its ``NAME.key`` entries, hidden ones
    (``.NAME.key``) left out, as the shell's ``*.key`` leaves them out.

    The folder is listed as named (a glob would read ``auth[1]`` as ``auth1``), and this one
    listing is both what is checked and what is loaded.
    """
    return sorted(path for path in folder.iterdir() if path.name.endswith(".key") and not path.name.startswith("."))


def load_authorized_key(path: Path) -> bytes:
    """The public key of a client certificate in the authorized folder, after checking it."""
    what = "authorized client certificate"
    check_public_path(path, what)
    public, secret = _load(path, what)
    if secret is not None:
        raise KeyFileError(
            f"{what} {path} holds a secret key: the folder is for public certificates, which others may read; "
            "move it out (and make the client a new pair if others could read it), and copy the client's "
            "public '.key' file in instead"
        )
    return public


def curve_client(server_public_key: Path, client_cert: Path) -> SocketHook:
    """A hook that makes a client socket speak CURVE to the daemon; call it before ``connect``.

    ``server_public_key`` is the server's public certificate (``server.key``), ``client_cert``
    this client's secret certificate (``NAME.key_secret``), whose public half must be in the
    daemon's ``authorized_keys`` folder. Both files are read and checked now, so a bad file
    raises :class:`KeyFileError` at once rather than at the first send.
    """
    server_key = load_public_key(Path(server_public_key), "server public certificate")
    public, secret = load_secret_certificate(Path(client_cert), "client certificate")

    def secure(sock: zmq.Socket[Any]) -> None:
        sock.curve_serverkey = server_key
        sock.curve_publickey = public
        sock.curve_secretkey = secret

    return secure


def curve_client_from_config(config: Config) -> SocketHook | None:
    """The client hook that ``[security] client_certificate`` asks for, or None when it is empty.

    The server's key is ``[security] server_public_key``, or else the public half of
    ``curve_secret_key`` (handy on the daemon's own machine, when that file is readable).
    """
    sec = config.security
    if not sec.client_certificate:
        return None
    if sec.server_public_key:
        return curve_client(
            config.resolve(sec.server_public_key, "[security] server_public_key"),
            config.resolve(sec.client_certificate, "[security] client_certificate"),
        )
    if sec.curve_secret_key:
        return curve_client(
            config.resolve(sec.curve_secret_key, "[security] curve_secret_key"),
            config.resolve(sec.client_certificate, "[security] client_certificate"),
        )
    raise SecurityError(
        "[security] client_certificate is set but server_public_key is empty; set it to the daemon's "
        "public certificate (server.key)"
    )


@dataclass
class _Watched:
    name: str
    monitor: zmq.Socket[Any]


class _RefusalMonitor:
    """One thread reading the monitor sockets of the server sockets and counting failed handshakes."""

    def __init__(self, count: Callable[[int, str, str], None]) -> None:
        self._count = count
        self._lock = threading.Lock()
        self._pending: list[_Watched] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="curve-monitor", daemon=True)

    def add(self, name: str, monitor: zmq.Socket[Any]) -> None:
        # The monitor socket is made on the caller's thread and handed over under a lock (a full
        # memory barrier), which is how ZeroMQ allows a socket to move between threads.
        with self._lock:
            self._pending.append(_Watched(name, monitor))

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._lock:
            for watched in self._pending:
                watched.monitor.close(linger=0)
            self._pending.clear()

    def _run(self) -> None:
        watched: dict[zmq.Socket[Any], str] = {}
        poller = zmq.Poller()
        try:
            while not self._stopping.is_set():
                with self._lock:
                    fresh, self._pending = self._pending, []
                for item in fresh:
                    watched[item.monitor] = item.name
                    poller.register(item.monitor, zmq.POLLIN)
                if not watched:
                    self._stopping.wait(MONITOR_POLL_MS / 1000)
                    continue
                for sock, _ in poller.poll(MONITOR_POLL_MS):
                    while True:
                        try:
                            parts = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        event = parse_monitor_message(parts)
                        reason = REFUSAL_EVENTS.get(event["event"])
                        if reason is not None:
                            peer = event["endpoint"].decode(errors="replace") if event["endpoint"] else "?"
                            self._count(1, watched[sock], f"{reason} (on {peer})")
        except Exception:
            log.exception("the CURVE refusal monitor failed; refused clients are no longer counted")
        finally:
            for sock in watched:
                sock.close(linger=0)


@dataclass
class RefusalCounts:
    """Refused handshakes since start, in total and per server socket."""

    total: int = 0
    by_socket: dict[str, int] = field(default_factory=dict)


class ServerSecurity:
    """The daemon's side: checks the settings, runs the ZAP handler, secures server sockets.

    Construct it first (it raises :class:`SecurityError` for unsafe settings or bad key files),
    call :meth:`start` before binding any socket, pass :meth:`hook` to the socket owners, and
    call :meth:`stop` after the sockets are closed and before the context is terminated.
    """

    def __init__(
        self,
        context: zmq.Context[Any],
        config: Config,
        on_refused: Callable[[int], None] | None = None,
    ) -> None:
        self._context = context
        self._config = config
        self._on_refused = on_refused
        self._zap: ZapHandler | None = None
        self._authorized: frozenset[bytes] | None = None  # Z85 client keys; None while CURVE is off
        # Which file name gave which of them: what a bad file at a reload falls back on.
        self._keys_by_file: dict[str, bytes] = {}
        self.gate = ConnectionGate(lambda: self._authorized)
        self._monitor: _RefusalMonitor | None = None
        self._warn = RateLimitedLog(log)
        self.refused = RefusalCounts()
        sec = config.security
        endpoints = config.daemon_binds
        local = {key: bind_is_local(key, endpoint) for key, endpoint in endpoints.items()}
        self.enabled = bool(sec.curve_secret_key)
        if sec.authorized_keys and not self.enabled:
            raise SecurityError(
                "[security] authorized_keys is set but curve_secret_key is empty; set curve_secret_key to the "
                "server's secret certificate (`eventagg keys server DIR` makes one) or clear authorized_keys"
            )
        if self.enabled:
            if not sec.authorized_keys:
                raise SecurityError(
                    "[security] curve_secret_key is set but authorized_keys is empty; set it to a folder of "
                    "client public certificates (`eventagg keys client NAME DIR` makes them)"
                )
            self.secret_path = config.resolve(sec.curve_secret_key, "[security] curve_secret_key")
            self.keys_dir = config.resolve(sec.authorized_keys, "[security] authorized_keys")
            self._public, self._secret = load_secret_certificate(self.secret_path, "[security] curve_secret_key")
            # At start every file must be good (a bad one stops the daemon): there is no earlier key to keep.
            self._keys_by_file = {path.name: load_authorized_key(path) for path in self._key_files()}
            self._authorized = frozenset(self._keys_by_file.values())
        else:
            exposed = {key: ep for key, ep in endpoints.items() if not local[key]}
            if exposed and not sec.allow_insecure:
                listed = ", ".join(f"{key} = {ep}" for key, ep in exposed.items())
                raise InsecureBindError(
                    f"refusing to listen beyond loopback without CURVE ({listed}): anyone who can reach "
                    "these ports could publish and read events. Set [security] curve_secret_key and "
                    "authorized_keys (see `eventagg keys`), bind to 127.0.0.1, or set "
                    "[security] allow_insecure = true to accept the risk"
                )
            if exposed:
                log.warning(
                    "listening beyond loopback WITHOUT CURVE (allow_insecure = true): %s; anyone who can "
                    "reach these ports can publish and read events",
                    ", ".join(exposed.values()),
                )

    def _key_files(self) -> list[Path]:
        """The authorized folder's certificate files, after checking the folder itself."""
        try:
            is_folder = self.keys_dir.is_dir()
        except PermissionError:  # a folder above it that this user may not enter: name that one
            _stat(self.keys_dir, "[security] authorized_keys folder")
            raise
        if not is_folder:
            raise KeyFileError(
                f"[security] authorized_keys {self.keys_dir} is not a folder; create it and copy the "
                "clients' public '.key' certificates into it"
            )
        check_public_path(self.keys_dir, "[security] authorized_keys folder")
        if not os.access(self.keys_dir, os.R_OK | os.X_OK):  # say which command lets it, not a bare PermissionError
            raise _unreadable(self.keys_dir, "[security] authorized_keys folder")
        files = authorized_key_files(self.keys_dir)
        if not files:
            log.warning(
                "[security] authorized_keys %s holds no '*.key' certificates (hidden ones are left out): "
                "every client is refused",
                self.keys_dir,
            )
        return files

    def _reload_keys(self, files: list[Path]) -> dict[str, bytes]:
        """The keys of ``files`` by file name, a bad file keeping the key its name held before (if any)."""
        keys: dict[str, bytes] = {}
        for path in files:
            try:
                keys[path.name] = load_authorized_key(path)
            except (KeyFileError, OSError) as exc:
                if not os.path.lexists(path):
                    continue  # removed while it was read: revoked, as any removed file is
                kept = self._keys_by_file.get(path.name)
                if kept is not None:
                    keys[path.name] = kept
                    log.warning(
                        "SIGHUP: %s; the key this file held before stays authorized until the file is fixed (or "
                        "removed, which revokes it) and SIGHUP is sent again",
                        exc,
                    )
                else:
                    log.warning(
                        "SIGHUP: %s; it authorizes no client until the file is fixed and SIGHUP is sent again (the "
                        "folder's other files are loaded)",
                        exc,
                    )
        return keys

    @property
    def public_key(self) -> bytes | None:
        """The server's public key (Z85), or None when CURVE is off."""
        return self._public if self.enabled else None

    def start(self) -> None:
        """Start the ZAP handler (always) and, with CURVE, the refusal monitor; before any bind."""
        seed_libc_rand()  # before the server sockets exist: each ROUTER draws its first auto id then
        self._zap = ZapHandler(self._context, lambda: self._authorized)
        self._zap.start()
        if not self.enabled:
            return
        self._monitor = _RefusalMonitor(self._count)
        self._monitor.start()
        log.info(
            "CURVE on: server key %s, %d authorized client keys in %s",
            self._public.decode(),
            len(self._authorized or ()),
            self.keys_dir,
        )

    @property
    def hook(self) -> SocketHook:
        """What the socket owners apply to each server socket before bind."""
        return self.secure

    def hook_for(self, name: str) -> SocketHook:
        """Like :attr:`hook`, with refusals on the sockets it secures logged as on the ``name`` socket."""
        return lambda sock: self.secure(sock, name)

    def secure(self, sock: zmq.Socket[Any], name: str | None = None) -> None:
        """Put ``sock`` under the ZAP handler (and make it a CURVE server when CURVE is on); call before ``bind``.

        ``name`` is what refusals on it are logged as; by default the ingest socket of its type.
        """
        if self._zap is None:
            raise SecurityError("ServerSecurity.start() must run before any socket is secured")
        # A ZAP domain makes libzmq consult the handler for NULL connections too, which is how
        # every connection gets a routing id from transport.zap rather than one of libzmq's own.
        sock.zap_domain = ZAP_DOMAIN
        if not self.enabled:
            return
        sock.curve_secretkey = self._secret
        sock.curve_publickey = self._public
        sock.curve_server = True
        if self._monitor is not None:
            name = name or _SOCKET_NAMES.get(sock.socket_type, "server")
            address = f"inproc://eventagg-curve-monitor-{id(sock):x}"
            sock.monitor(address, sum(REFUSAL_EVENTS))
            watcher = self._context.socket(zmq.PAIR)
            watcher.connect(address)
            self._monitor.add(name, watcher)

    def reload(self) -> None:
        """Re-read the authorized keys folder (SIGHUP); a bad folder keeps the keys already loaded.

        Each file is taken on its own: a good one's key is loaded, a removed one's revoked, and a
        bad one is logged and keeps the key that file name held before (a new bad file adds none).

        The secret certificate is checked again too (its mode, owner and keys), and a problem
        logged, as is a new key pair in its place (which takes a restart).
        """
        if not self.enabled or self._zap is None:
            return
        # The sockets keep the secret key they were given, so there is nothing to reload; but a
        # loose or foreign-owned file is a leak to report now, not at the next restart.
        try:
            public, _secret = load_secret_certificate(self.secret_path, "[security] curve_secret_key")
        except KeyFileError as exc:
            log.warning("SIGHUP: %s (the daemon goes on with the key it read at start)", exc)
        else:
            # A rotated server key is not taken live (the sockets hold the old one), so clients
            # already given the new public half are refused until a restart: say so now.
            if public != self._public:
                log.warning(
                    "SIGHUP: [security] curve_secret_key %s now holds another key pair: the daemon goes on with "
                    "the one it read at start until it is restarted (server public key %s, not %s); clients given "
                    "the new server.key are refused until then",
                    self.secret_path,
                    self._public.decode(),
                    public.decode(),
                )
        try:
            files = self._key_files()
        except SecurityError as exc:
            log.error("authorized keys not reloaded, the old ones stay in force: %s", exc)
            return
        self._keys_by_file = self._reload_keys(files)
        keys = frozenset(self._keys_by_file.values())
        revoked = len((self._authorized or frozenset()) - keys)
        self._authorized = keys  # one reference swap: the ZAP thread and the servers see old or new
        log.warning(
            "reloaded %d authorized client keys from %s (%d revoked: their open connections are refused)",
            len(keys),
            self.keys_dir,
            revoked,
        )

    def _count(self, count: int, socket_name: str, reason: str) -> None:
        self.refused.total += count
        self.refused.by_socket[socket_name] = self.refused.by_socket.get(socket_name, 0) + count
        if self._on_refused is not None:
            self._on_refused(count)
        self._warn.warning("refused a client on the %s socket: %s", socket_name, reason)

    def stop(self) -> None:
        """Stop the monitor and the ZAP handler; call after the server sockets are closed."""
        if self._monitor is not None:
            self._monitor.stop()
            self._monitor = None
        if self._zap is not None:
            self._zap.stop()
            self._zap = None
