"""``eventagg migrate``: bring a PostgreSQL database's schema to this eventagg's version, with time.

``migrate [--config PATH] [--timeout S] [--from-sqlite PATH]``.

A daemon migrates the schema as it starts, but gives that 10 s at most (its parts must start
within 30 s), and a migration that reads every event of a large database takes longer. Such a
start fails with a message naming this command: run it once, with the daemons stopped (it takes
the same advisory lock as they do, so at most one session migrates), then start the new daemons.
The migrations may take ``--timeout`` seconds in all (an hour unless told); nothing is left half
done, since each migration is one transaction. A SQLite database is migrated by its daemon as it
opens it, with no time limit, so there is nothing to do for one.

``--from-sqlite PATH`` then copies a stopped SQLite daemon's database into the PostgreSQL
database, which must hold nothing yet (:mod:`actors.sqlite_import`).
"""

from __future__ import annotations

import argparse
import math
import sqlite3
import sys
import time
from pathlib import Path

from actors.store import StorageError
from transport.config import ConfigError, expand_environment, load_config

DEFAULT_TIMEOUT_S = 3600.0
MAX_TIMEOUT_S = 2_147_483  # PostgreSQL's statement_timeout is an int of milliseconds
MIN_TIMEOUT_S = 0.001


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Migrate a PostgreSQL database's schema to this eventagg's version."
    )
    parser.add_argument("--config", metavar="PATH", help="the daemons' config file (its [storage] dsn and node)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"how long the migrations may take in all, in seconds (default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--from-sqlite",
        metavar="PATH",
        type=Path,
        help="then copy this SQLite database (its daemon stopped) into the PostgreSQL database, which must be empty",
    )
    args = parser.parse_args(argv)
    # PostgreSQL counts the timeout in whole milliseconds, and reads 0 as none at all.
    if not (math.isfinite(args.timeout) and MIN_TIMEOUT_S <= args.timeout <= MAX_TIMEOUT_S):
        parser.error(
            f"--timeout must be a number of seconds from {MIN_TIMEOUT_S:g} to {MAX_TIMEOUT_S}, not {args.timeout:g}"
        )
    try:
        config = expand_environment(load_config(args.config))
    except ConfigError as exc:
        print(f"migrate: {exc}", file=sys.stderr)
        return 2
    if config.storage.backend != "postgresql" and args.from_sqlite is not None:
        print(
            f"migrate: --from-sqlite copies into the PostgreSQL database [storage] dsn names, but this config's"
            f" [storage] backend is {config.storage.backend}: give the config of the PostgreSQL daemons",
            file=sys.stderr,
        )
        return 2
    if config.storage.backend != "postgresql":
        print(
            f"[storage] backend is {config.storage.backend}: the daemon migrates its database as it opens it,"
            " with no time limit; nothing to do"
        )
        return 0
    from actors.pg_grants import COPY_NEEDS, RUNNING_NEEDS, denied
    from actors.pg_session import connect, describe_dsn, load_psycopg, one_line, set_statement_timeout
    from actors.postgres import SCHEMA_VERSION, MigrationTooLong, migrate, schema_version
    from actors.sqlite_import import CopyRefused, check_source, copy_sqlite

    if args.from_sqlite is not None:
        try:
            check_source(args.from_sqlite)  # before anything is done to the PostgreSQL database
        except CopyRefused as exc:
            print(f"migrate: {exc}; nothing was copied", file=sys.stderr)
            return 2
    under_way = "the migration or copy under way" if args.from_sqlite else "the migration under way"
    started = time.monotonic()
    try:
        conn = connect(config.storage.dsn, config.storage_node, "migrate")
    except StorageError as exc:
        print(f"migrate: {exc}", file=sys.stderr)
        return 1
    try:
        set_statement_timeout(conn, int(args.timeout * 1000))
        before = schema_version(conn)
        migrate(
            conn,
            f"{config.storage_node} (eventagg migrate)",
            budget_s=args.timeout,
            where=describe_dsn(config.storage.dsn),
        )
        copied = None if args.from_sqlite is None else copy_sqlite(args.from_sqlite, conn, config.storage_node)
    except MigrationTooLong:
        print(
            f"migrate: the migrations took over {args.timeout:g} s and the one under way was rolled back;"
            " give them more with --timeout",
            file=sys.stderr,
        )
        return 1
    except CopyRefused as exc:
        print(f"migrate: {exc}; nothing was copied", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"migrate: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:  # reading the SQLite file, after it opened
        print(f"migrate: reading {args.from_sqlite}: {exc}; nothing was copied", file=sys.stderr)
        return 1
    except load_psycopg().errors.InsufficientPrivilege as exc:  # the copy's (the migrations' are StorageErrors)
        said = denied(conn, exc, RUNNING_NEEDS if args.from_sqlite is None else COPY_NEEDS)
        print(f"migrate: {said}; {under_way} was rolled back", file=sys.stderr)
        return 1
    except load_psycopg().Error as exc:
        print(f"migrate: {one_line(exc)}; {under_way} was rolled back", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"migrate: interrupted; {under_way} was rolled back", file=sys.stderr)
        return 130
    finally:
        conn.close()
    if before == SCHEMA_VERSION:
        print(f"the schema is at version {SCHEMA_VERSION} already; nothing to do")
    else:
        print(f"migrated the schema from version {before} to {SCHEMA_VERSION} in {time.monotonic() - started:.1f} s")
    if copied is not None:
        print(
            f"copied {args.from_sqlite} into the PostgreSQL database in {copied.seconds:.1f} s: {copied.events} events"
            f" of {copied.topics} topics (commit positions up to {copied.head}), {copied.deleted_keys} deleted"
            f" keys, {copied.consumers} consumers; its counters went to node {config.storage_node!r}"
        )
        if copied.future_arrivals or copied.future_keys:
            print(
                f"{copied.future_arrivals} arrival times and {copied.future_keys} deleted keys' commit times were"
                " ahead of the PostgreSQL server's clock (the SQLite host's clock ran ahead): they were set to the"
                " server's now, from which max_age and dedup_horizon count them"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
