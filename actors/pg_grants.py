"""The privileges a daemon's PostgreSQL role must hold, and messages that name the missing ones.

A daemon may run as a role that does not own eventagg's tables (docs/postgresql.md,
"Privileges"). PostgreSQL's refusal says only ``permission denied for table events``: not which
role, which privilege, nor the GRANT that mends it. So the daemon checks, at start, every
privilege it uses (:data:`RUNNING_NEEDS`, with ``has_table_privilege`` and friends on the
objects' oids, which work where the schema itself is not usable) and refuses to start with one
message listing each missing one and its GRANT; and every refusal met while running (a
privilege revoked meanwhile) is worded by :func:`denied`, which looks the role's privileges up
again, so the writer's, the sweep's, the queries' and the subscriptions' errors all say the same.

The tables live in the role's default schema: the first on its ``search_path`` holding
``eventagg_schema``. A role without USAGE on that schema does not see them at all (PostgreSQL
leaves such a schema out of the search path), so it is looked for by name in the catalogs,
which every role may read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from actors.pg_session import load_psycopg, one_line
from actors.store import StorageRefused

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

DOCS = 'docs/postgresql.md, "Privileges"'

Needs = Sequence[tuple[str, tuple[str, ...]]]  # (object name, privileges) pairs

# What the running daemon does with each object (a sequence's privilege is USAGE): the write
# transaction, retention's sweep, named consumers' claims and positions, the queries, the
# subscriptions' reads. Row locks (FOR NO KEY UPDATE, FOR SHARE) need UPDATE, and
# ON CONFLICT DO UPDATE both INSERT and UPDATE.
RUNNING_NEEDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("eventagg_schema", ("SELECT",)),
    ("events", ("SELECT", "INSERT", "DELETE")),
    ("topics", ("SELECT", "INSERT", "UPDATE")),
    ("nodes", ("SELECT", "INSERT", "UPDATE")),
    ("positions", ("SELECT", "UPDATE")),
    ("deleted_keys", ("SELECT", "INSERT", "UPDATE", "DELETE")),
    ("consumers", ("SELECT", "INSERT", "UPDATE", "DELETE")),
    ("consumer_claims", ("SELECT", "INSERT", "UPDATE", "DELETE")),
    ("consumer_claim_numbers", ("USAGE",)),
)
# ``eventagg migrate --from-sqlite`` also empties ``topics`` of the rows daemons made before it.
COPY_NEEDS: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
    (name, (*privileges, "DELETE") if name == "topics" else privileges) for name, privileges in RUNNING_NEEDS
)


class PrivilegeMissing(StorageRefused):
    """The daemon's PostgreSQL role lacks a privilege it uses; the message names it and its GRANT.

    At start the daemon refuses to run (exit 2: a GRANT mends it, not a restart). While it runs,
    the part that met it keeps what it holds and tries again, so a GRANT lets it go on.
    """


@dataclass(frozen=True, slots=True)
class Missing:
    """Privileges the role lacks on one object: ``kind`` is schema, table or sequence, ``name``
    its name as SQL spells it (schema-qualified, quoted where needed)."""

    kind: str
    name: str
    privileges: tuple[str, ...]

    def __str__(self) -> str:
        return f"{', '.join(self.privileges)} on {self.kind} {self.name}"

    def grant(self, role: str) -> str:
        """The statement that gives ``role`` (as SQL spells it) what is missing."""
        return f"GRANT {', '.join(self.privileges)} ON {self.kind.upper()} {self.name} TO {role}"


@dataclass(frozen=True, slots=True)
class Role:
    """The session's role: its name, and the name as SQL spells it."""

    name: str
    quoted: str


def search_path(setting: str, user: str) -> list[str]:
    """The schema names of a ``search_path`` setting, in order (``$user`` is ``user``)."""
    names = []
    for item in setting.split(","):
        item = item.strip()
        if len(item) >= 2 and item[0] == item[-1] == '"':
            item = item[1:-1].replace('""', '"')
        else:
            item = item.lower()  # as the server reads an unquoted name
        if item == "$user":
            item = user
        if item:
            names.append(item)
    return names


def _search_path_of(conn: psycopg.Connection[Any], role: Role) -> tuple[str, list[str]]:
    """The session's ``search_path`` setting, and its schema names in order (see :func:`search_path`)."""
    (setting,) = conn.execute("SELECT current_setting('search_path')").fetchone() or ("",)
    return str(setting), search_path(str(setting), role.name)


def _home(conn: psycopg.Connection[Any], role: Role) -> tuple[int, str, bool] | None:
    """The schema holding eventagg's tables (oid, name as SQL spells it, whether the role may use
    it), or None when no schema on the search path holds them."""
    row = conn.execute(
        "SELECT n.oid, quote_ident(n.nspname) FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace"
        " WHERE c.oid = to_regclass('eventagg_schema')"
    ).fetchone()
    if row is not None:
        return int(row[0]), str(row[1]), True
    _setting, schemas = _search_path_of(conn, role)
    # The first schema on the path holding the tables, which the role may not use (so it was skipped).
    row = conn.execute(
        "SELECT n.oid, quote_ident(n.nspname) FROM unnest(%s::text[]) WITH ORDINALITY AS p(name, i)"
        " JOIN pg_namespace AS n ON n.nspname = p.name JOIN pg_class AS c ON c.relnamespace = n.oid"
        " WHERE c.relname = 'eventagg_schema' ORDER BY p.i LIMIT 1",
        (schemas,),
    ).fetchone()
    return None if row is None else (int(row[0]), str(row[1]), False)


def role_of(conn: psycopg.Connection[Any]) -> Role:
    """The session's role."""
    (name, quoted) = conn.execute("SELECT current_user, quote_ident(current_user)").fetchone() or ("?", "?")
    return Role(str(name), str(quoted))


def missing_privileges(conn: psycopg.Connection[Any], role: Role, needs: Needs = RUNNING_NEEDS) -> list[Missing]:
    """What the session's role lacks of ``needs``, on the objects that exist (none before the
    schema is made), and USAGE on their schema; in the order of ``needs``, the schema first."""
    home = _home(conn, role)
    if home is None:
        return []
    oid, schema, usable = home
    missing = [] if usable else [Missing("schema", schema, ("USAGE",))]
    names = [name for name, privileges in needs for _ in privileges]
    wanted = [privilege for _name, privileges in needs for privilege in privileges]
    # By oid: a name would have to be looked up through the schema, which may not be usable.
    rows = conn.execute(
        "SELECT v.privilege, quote_ident(v.name), c.relkind = 'S'"
        " FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS v(name, privilege, i)"
        " JOIN pg_class AS c ON c.relname = v.name AND c.relnamespace = %s"
        " WHERE NOT CASE WHEN c.relkind = 'S' THEN has_sequence_privilege(c.oid, v.privilege)"
        " ELSE has_table_privilege(c.oid, v.privilege) END ORDER BY v.i",
        (names, wanted, oid),
    ).fetchall()
    lacking: dict[tuple[str, str], list[str]] = {}
    for privilege, quoted, is_sequence in rows:
        lacking.setdefault((f"{schema}.{quoted}", "sequence" if is_sequence else "table"), []).append(privilege)
    missing += [Missing(kind, name, tuple(privileges)) for (name, kind), privileges in lacking.items()]
    return missing


def said(exc: BaseException) -> str:
    """PostgreSQL's message of ``exc`` without the statement it quotes (``LINE 1: ...``)."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    return " ".join(primary.split()) if primary else one_line(exc)


def _grants(missing: Sequence[Missing], role: Role) -> str:
    return "; ".join(item.grant(role.quoted) for item in missing)


def refusal(conn: psycopg.Connection[Any], where: str, needs: Needs = RUNNING_NEEDS) -> str | None:
    """One message naming every privilege of ``needs`` the role lacks and the GRANTs that give
    them, for a start refused; None when it lacks none."""
    role = role_of(conn)
    missing = missing_privileges(conn, role, needs)
    if not missing:
        return None
    return (
        f"PostgreSQL role {role.quoted} lacks privileges eventagg uses on {where}: {'; '.join(map(str, missing))}."
        f" As their owner, run: {_grants(missing, role)}; then start again ({DOCS}, lists every privilege)"
    )


def denied(
    conn: psycopg.Connection[Any] | None,
    exc: BaseException,
    needs: Needs = RUNNING_NEEDS,
) -> str:
    """PostgreSQL's refusal ``exc`` (SQLSTATE 42501) with the role, what it lacks of ``needs`` and
    the GRANTs, looked up on ``conn``; never raises (a lookup that fails leaves the refusal as it is).

    ``conn`` must not be inside a failed transaction: call this after the ROLLBACK.
    """
    pg = load_psycopg()
    refused = said(exc)
    try:
        if conn is None or conn.closed or conn.broken or conn.info.transaction_status != pg.pq.TransactionStatus.IDLE:
            return f"{refused} (see {DOCS})"
        role = role_of(conn)
        missing = missing_privileges(conn, role, needs)
    except pg.Error:
        return f"{refused} (see {DOCS})"
    if not missing:
        # Not one of the privileges eventagg checks (a column's, a row security policy's...).
        return f"{refused} (PostgreSQL role {role.quoted}; see {DOCS})"
    return (
        f"{refused}: PostgreSQL role {role.quoted} lacks {'; '.join(map(str, missing))}; as their owner, run:"
        f" {_grants(missing, role)} ({DOCS})"
    )


def cannot_create(conn: psycopg.Connection[Any], exc: BaseException) -> str:
    """PostgreSQL's refusal ``exc`` to create eventagg's first table in a new database, with the
    role, the schema it would go in, and what to do; never raises."""
    pg = load_psycopg()
    refused = said(exc)
    try:
        role = role_of(conn)
        setting, schemas = _search_path_of(conn, role)
        row = conn.execute(
            "SELECT quote_ident(n.nspname), pg_get_userbyid(n.nspowner), has_schema_privilege(n.oid, 'USAGE'),"
            " has_schema_privilege(n.oid, 'CREATE') FROM unnest(%s::text[]) WITH ORDINALITY AS p(name, i)"
            " JOIN pg_namespace AS n ON n.nspname = p.name ORDER BY p.i LIMIT 1",
            (schemas,),
        ).fetchone()
    except pg.Error:
        return f"{refused} (see {DOCS})"
    if row is None:
        return f"{refused}: no schema on PostgreSQL role {role.quoted}'s search_path ({setting}) exists ({DOCS})"
    schema, owner, usable, creatable = row
    lacking = "CREATE" if usable else "USAGE, CREATE"
    if creatable and usable:
        return f"{refused} (PostgreSQL role {role.quoted}; see {DOCS})"
    # PostgreSQL 15's public schema belongs to whoever owns the database.
    who = "the database's owner" if owner == "pg_database_owner" else f"role {owner}, the schema's owner"
    return (
        f"{refused}: PostgreSQL role {role.quoted} may not create eventagg's tables in schema {schema} (it lacks"
        f" {lacking} on it). Start the first daemon, or run `eventagg migrate --config PATH`, as {who}, then"
        f" run the daemons as {role.quoted} with the grants of {DOCS}; or let {role.quoted} own the tables:"
        f" GRANT {lacking} ON SCHEMA {schema} TO {role.quoted}"
    )


def cannot_migrate(conn: psycopg.Connection[Any], exc: BaseException, target: int) -> str:
    """PostgreSQL's refusal ``exc`` of migration ``target``: altering a table takes its owner, so
    the message names the tables' owner and how to migrate as it; never raises."""
    pg = load_psycopg()
    refused = said(exc)
    try:
        role = role_of(conn)
        row = conn.execute(
            "SELECT pg_get_userbyid(relowner), quote_ident(pg_get_userbyid(relowner)) FROM pg_class"
            " WHERE oid = to_regclass('eventagg_schema')"
        ).fetchone()
    except pg.Error:
        return f"migrating the schema to version {target} was refused: {refused} (see {DOCS})"
    if row is None or row[0] == role.name:
        return (
            f"migrating the schema to version {target} was refused: {refused} (PostgreSQL role {role.quoted};"
            f" see {DOCS})"
        )
    owner = str(row[1])
    return (
        f"migrating the schema to version {target} needs the owner of eventagg's tables, PostgreSQL role {owner},"
        f" and [storage] dsn connects as {role.quoted} ({refused}): run `eventagg migrate --config PATH` (or start"
        f" one daemon) as {owner}, then start the daemons as {role.quoted}, granted the privileges of {DOCS} (a"
        " migration may add tables)"
    )


def refuse_if_lacking(conn: psycopg.Connection[Any], where: str) -> None:
    """Raise :class:`PrivilegeMissing` naming every privilege the running daemon would lack.

    A server that cannot run the check (an engine speaking PostgreSQL's protocol without its
    catalogs) is let through with a warning: a missing privilege is then named where it is met.
    """
    pg = load_psycopg()
    try:
        message = refusal(conn, where)
    except pg.Error as exc:
        if conn.closed or conn.broken:
            raise
        log.warning(
            "the privileges of the PostgreSQL role on %s could not be checked (%s); a missing one is named when"
            " it is met",
            where,
            said(exc),
        )
        return
    if message is not None:
        raise PrivilegeMissing(message)
