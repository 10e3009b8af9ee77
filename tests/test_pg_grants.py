"""The pure parts of actors/pg_grants.py: reading a search_path, and the GRANT for what is missing.

(tests/test_postgres_grants.py runs daemons whose roles lack privileges on a real server.)
"""

from __future__ import annotations

from actors.pg_grants import COPY_NEEDS, RUNNING_NEEDS, Missing, search_path


def test_a_search_path_is_read_as_the_server_reads_it() -> None:
    assert search_path('"$user", public', "eventagg") == ["eventagg", "public"]
    assert search_path('Events, "Odd ""Name""", $user,', "me") == ["events", 'Odd "Name"', "me"]
    assert search_path("", "me") == []


def test_what_is_missing_is_said_and_granted_per_object() -> None:
    missing = Missing("table", "public.events", ("INSERT", "DELETE"))
    assert str(missing) == "INSERT, DELETE on table public.events"
    assert missing.grant('"Run Time"') == 'GRANT INSERT, DELETE ON TABLE public.events TO "Run Time"'
    sequence = Missing("sequence", "public.consumer_claim_numbers", ("USAGE",))
    assert sequence.grant("r") == "GRANT USAGE ON SEQUENCE public.consumer_claim_numbers TO r"


def test_the_copy_from_sqlite_needs_what_a_daemon_does_and_to_empty_topics() -> None:
    copy = dict(COPY_NEEDS)
    assert copy.pop("topics") == (*dict(RUNNING_NEEDS)["topics"], "DELETE")
    assert copy == {name: privileges for name, privileges in RUNNING_NEEDS if name != "topics"}
