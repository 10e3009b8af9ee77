"""``eventagg keys`` (and ``scripts/keys.py``): create CURVE certificates for eventagg.

``keys server DIR`` or ``keys client NAME DIR``.

Each command writes ``NAME.key`` (the public certificate, safe to share) and
``NAME.key_secret`` (the secret one: owner-only, never copy it off the machine that uses it)
in the ``zmq.auth`` format, into DIR (created owner-only if missing). ``server`` uses the name
``server``. With ``--authorize FOLDER``, a client's public certificate is also copied into the
daemon's ``[security] authorized_keys`` folder. Existing files are never overwritten. A command
that cannot write everything says what, where and why, exits 1 and leaves no certificate behind.

Setup: ``keys server /etc/eventagg/curve`` on the daemon's machine; on each client machine
``keys client NAME ~/.eventagg``; copy each client's ``NAME.key`` into the daemon's
authorized folder, and the daemon's ``server.key`` to the clients.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import zmq.auth

from transport.commands.client_flags import write_output

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # the whole name: fullmatch ('$' lets a newline end it)


class KeysError(Exception):
    """The certificates cannot be written where asked; the message says why."""


def cannot(doing: str, exc: OSError) -> KeysError:
    """The :class:`KeysError` for an ``OSError`` met while ``doing`` (``"write ... into FOLDER"``):
    what could not be done and where, the system's reason, and what to do about it."""
    reason = (exc.strerror or str(exc)).lower()
    if exc.errno in (errno.EACCES, errno.EPERM):
        uid = os.geteuid()
        advice = f"give a folder this user (uid {uid}) can write" + (", or run as the folder's owner" if uid else "")
    elif exc.errno == errno.EROFS:
        advice = "give a folder on a file system mounted read-write"
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "free some space, or give a folder on another file system"
    else:
        advice = "give a folder this user can write"
    return KeysError(f"cannot {doing}: {reason}; {advice}")


def make_folder(folder: Path) -> None:
    """Make ``folder`` (owner-only) unless it exists; a file in its place, or in its path, is a :class:`KeysError`,
    as is any other reason it cannot be made."""
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except (FileExistsError, NotADirectoryError):
        raise KeysError(f"{folder} is not a folder (a file is in the way); give a folder, made if missing") from None
    except OSError as exc:
        # mkdir(parents=True) fails at the first folder it cannot make: say which, if not the last.
        at = f" (at {exc.filename})" if exc.filename and Path(exc.filename) != folder else ""
        raise cannot(f"make the folder {folder}{at}", exc) from None


def create(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (mode 0644) and ``NAME.key_secret`` (mode 0600) into ``directory``.

    The pair is made in a private temporary folder inside ``directory`` and moved into place,
    so the secret is never readable by others, not even for a moment. Returns
    ``(public_path, secret_path)``; raises :class:`KeysError` if either file already exists.
    """
    if not _NAME.fullmatch(name):
        raise KeysError(f"name {name!r} must be letters, digits, '.', '_' or '-' (at most 100)")
    make_folder(directory)
    public = directory / f"{name}.key"
    secret = directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise KeysError(f"{path} already exists; remove it first or choose another name")
    placed: list[Path] = []
    try:
        staging = Path(tempfile.mkdtemp(prefix=".keys-", dir=directory))  # mkdtemp makes it 0700
        try:
            made_public, made_secret = (Path(p) for p in zmq.auth.create_certificates(staging, name))
            os.chmod(made_secret, 0o600)
            os.chmod(made_public, 0o644)
            os.replace(made_secret, secret)
            placed.append(secret)
            os.replace(made_public, public)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        # Half a pair is worse than none: it blocks the next try ("already exists") and works with nothing.
        for path in placed:
            path.unlink(missing_ok=True)
        raise cannot(f"write the certificates {public.name} and {secret.name} into {directory}", exc) from None
    return public, secret


def authorizable(name: str, directory: Path, folder: Path) -> Path:
    """Where ``NAME.key`` will be copied in the authorized keys ``folder``, checked before the pair
    is made in ``directory`` (so a refusal leaves nothing behind to block the next try)."""
    make_folder(folder)
    if folder.resolve() == directory.resolve():
        raise KeysError(
            f"--authorize {folder} is the folder the pair is written into; give the daemon's "
            "[security] authorized_keys folder, which must hold no secret certificate"
        )
    target = folder / f"{name}.key"
    if target.exists():
        raise KeysError(f"{target} already exists; a client name must be unique in the authorized folder")
    return target


def authorize(public: Path, folder: Path) -> Path:
    """Copy a client's public certificate into the daemon's authorized keys folder (mode 0644).

    Raises :class:`KeysError`, leaving no partial copy, if it cannot be written there.
    """
    target = authorizable(public.stem, public.parent, folder)
    try:
        # O_EXCL: a certificate that appeared since the check is not overwritten.
        handle = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise cannot(f"copy {public.name} into the authorized folder {folder}", exc) from None
    try:
        with open(handle, "wb") as copy:
            copy.write(public.read_bytes())
            os.fchmod(copy.fileno(), 0o644)  # whatever the umask
    except OSError as exc:
        target.unlink(missing_ok=True)
        raise cannot(f"copy {public.name} into the authorized folder {folder}", exc) from None
    return target


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Create CURVE certificates for eventagg.")
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("server", help="the daemon's certificate (server.key, server.key_secret)")
    server.add_argument("dir", type=Path, help="folder to write into (created owner-only if missing)")
    client = commands.add_parser("client", help="a publisher's or operator's certificate")
    client.add_argument("name", help="the client's name, e.g. its host (NAME.key, NAME.key_secret)")
    client.add_argument("dir", type=Path, help="folder to write into (created owner-only if missing)")
    client.add_argument(
        "--authorize",
        type=Path,
        metavar="FOLDER",
        help="also copy NAME.key into this [security] authorized_keys folder",
    )
    args = parser.parse_args(argv)
    if args.command == "client" and not _NAME.fullmatch(args.name):
        parser.error(f"name {args.name!r} must be letters, digits, '.', '_' or '-' (at most 100)")
    try:
        if args.command == "client" and args.authorize:
            authorizable(args.name, args.dir, args.authorize)
        public, secret = create(args.dir, "server" if args.command == "server" else args.name)
        lines = [f"public certificate: {public}  (give this one out)"]
        lines.append(f"secret certificate: {secret}  (owner-only; keep it where it is)")
        if args.command == "client" and args.authorize:
            try:
                lines.append(f"authorized:         {authorize(public, args.authorize)}")
            except KeysError:
                # All or nothing: a pair left behind would refuse the corrected command ("already exists").
                public.unlink(missing_ok=True)
                secret.unlink(missing_ok=True)
                raise
    except (KeysError, OSError) as exc:
        print(f"keys: {exc}", file=sys.stderr)
        return 1
    # Said once every file is in place: output that cannot be written must not stop it halfway.
    return write_output(lambda: print("\n".join(lines)), 0)


if __name__ == "__main__":
    sys.exit(main())
