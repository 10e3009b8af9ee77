"""``eventagg events`` (and ``scripts/events.py``): list stored events, or follow them.

``events [TOPIC] [--after S] [--limit N] [--follow [--name NAME]] [--endpoint URL | --config PATH]``.

Without a topic, every topic in commit order. Pages through the daemon with the cursor and
prints one JSON object per line (JSON Lines), so the output pipes into jq or a file. Values JSON
has no type for (bytes, non-string map keys, NaN, ...) are tagged as docs/storage-and-queries.md says. With
``--follow [--name NAME]`` it subscribes instead (docs/subscribe.md): the stored events, then
live ones until SIGINT, reconnecting by itself when the daemon restarts. Given only ``--endpoint``,
it asks that daemon (health's ``endpoints``) where to subscribe.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import zmq

from transport.client import FLAG_HINTS, QueryClient, QueryClientError
from transport.commands.client_flags import (
    STOP_SIGNALS,
    add_endpoint_args,
    add_subscribe_endpoint_arg,
    asks_subscribe_endpoint,
    at_least,
    curve_from_args,
    endpoint_from_args,
    explain,
    interrupt_on_stop,
    prefix_library_logs,
    run_command,
    subscribe_endpoint_from_args,
    subscribe_endpoint_of,
    utf8_text,
)
from transport.config import ConfigError
from transport.handshake import probe
from transport.jsonlines import to_json_line
from transport.queries import MAX_CURSOR, QueryError, check_query_topic
from transport.security import SecurityError, SocketHook
from transport.subscriber import Subscriber, SubscriberError, name_problem

# One order for every line, listed or followed: the event's own fields, where it is stored, the payload last.
FIELD_ORDER = ("topic", "event_id", "timestamp", "source", "position", "seq", "late", "payload")


def in_field_order(event: dict[str, Any]) -> dict[str, Any]:
    """``event`` with its fields in :data:`FIELD_ORDER` (any others after them, as they came)."""
    ordered = {field: event[field] for field in FIELD_ORDER if field in event}
    ordered.update(event)  # adds the fields not in FIELD_ORDER; those already there keep their place
    return ordered


def note_expired(after: int, first: int) -> None:
    """On stderr, as ``--follow`` says it, that retention deleted what was asked for, so an empty
    or shorter output is not mistaken for no events."""
    print(f"events: events after {after} are no longer stored; continuing from {first}", file=sys.stderr)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="List a topic's stored events as JSON Lines.")
    parser.add_argument("topic", nargs="?", help="the topic (default: every topic, in commit order)")
    parser.add_argument(
        "--after",
        type=at_least(0, MAX_CURSOR),
        default=None,
        metavar="S",
        help="start after this seq (or commit position)",
    )
    parser.add_argument("--follow", action="store_true", help="then print live events until SIGINT, SIGTERM or SIGHUP")
    parser.add_argument(
        "--name", type=utf8_text, help="with --follow: a named consumer; without --after it resumes where it left"
    )
    add_subscribe_endpoint_arg(parser, "--follow")
    parser.add_argument("--limit", type=at_least(0), default=None, metavar="N", help="print at most N events")
    # Sent in the request, so bounded to what msgpack and the daemon's cursor take; --limit is only counted here.
    parser.add_argument(
        "--page", type=at_least(1, MAX_CURSOR), default=1000, metavar="N", help="events per request (default 1000)"
    )
    add_endpoint_args(parser)
    args = parser.parse_args(argv)
    prefix_library_logs("events")
    if (args.name is not None or args.subscribe_endpoint) and not args.follow:
        parser.error("--name and --subscribe-endpoint need --follow")
    if args.name is not None and (problem := name_problem(args.name)) is not None:
        parser.error(f"--name: {problem}")
    if args.topic is not None:
        try:
            check_query_topic(args.topic)
        except QueryError as exc:
            parser.error(str(exc))
    try:
        endpoint = endpoint_from_args(args)
        secure = curve_from_args(args)
        where = subscribe_endpoint_from_args(args)
    except (ConfigError, SecurityError) as exc:
        print(f"events: {exc}", file=sys.stderr)
        return 2
    page = args.page if args.limit is None else max(1, min(args.page, args.limit))
    with _stopped_as_by_ctrl_c(args.follow):
        return _print_events(args, endpoint, secure, where, page)


def _print_events(args: argparse.Namespace, endpoint: str, secure: SocketHook | None, where: str, page: int) -> int:
    printed = 0
    try:
        if args.follow and asks_subscribe_endpoint(args):
            with QueryClient(endpoint, timeout=args.timeout, configure=secure) as client:
                where = subscribe_endpoint_of(client)
        if args.follow:
            # A daemon that is down may come back (following waits for it); one that refuses
            # this client's security never will, and the subscriber alone would only see silence.
            failure = probe(where, zmq.DEALER, secure, args.timeout)
            if failure is not None and failure.refused:
                print(f"events: {where} {failure}", file=sys.stderr)
                return 1
            if failure is not None:
                print(
                    f"events: no daemon answers at {where} yet ({failure}); waiting for it (Ctrl-C ends)",
                    file=sys.stderr,
                )
        with QueryClient(endpoint, timeout=args.timeout, configure=secure) as client, contextlib.ExitStack() as stack:
            events: Iterable[dict[str, Any]]
            if args.limit == 0:
                # Nothing to print, but the daemon is still asked, as `head -n 0 FILE` still opens
                # FILE: a wrong address, key, topic or cursor fails as without --limit.
                if not args.follow:
                    next(iter(client.iter_events(args.topic, args.after or 0, page)), None)
                    return 0
                return _subscription_answered(args, where, secure)
            if args.follow:
                # A Subscriber in a with block: Ctrl-C while an event is printed leaves it
                # unacknowledged (printed or not), while --limit's last event is acknowledged.
                events = stack.enter_context(
                    Subscriber(where, args.topic, after=args.after, name=args.name, configure=secure, hints=FLAG_HINTS)
                )
            else:
                events = client.iter_events(args.topic, args.after or 0, page, on_expired=note_expired)
            for event in events:
                print(to_json_line(in_field_order(event)))  # lossless for bytes, non-string keys, NaN, any depth
                printed += 1
                if args.limit is not None and printed >= args.limit:
                    break
    except KeyboardInterrupt:
        # Following ends this way (exit 0); a listing cut short is not the whole answer: 130,
        # as a shell gives SIGINT, so `events > dump && ...` does not take a part for the whole.
        return 0 if args.follow else 130
    except QueryClientError as exc:
        print(f"events: {explain(exc, endpoint, secure)}", file=sys.stderr)
        return 1
    except SubscriberError as exc:
        print(f"events: {exc}", file=sys.stderr)
        return 1
    return 0


def _subscription_answered(args: argparse.Namespace, where: str, secure: SocketHook | None) -> int:
    """Subscribe as ``--follow`` would and leave once the daemon confirms (0), acknowledging no
    event (only past deleted ones it said are gone, should that notice come meanwhile); the
    refusal raises :class:`SubscriberError`, silence past ``--timeout`` is 1."""
    subscriber = Subscriber(where, args.topic, after=args.after, name=args.name, configure=secure, hints=FLAG_HINTS)
    try:
        deadline = time.monotonic() + args.timeout
        while not subscriber.subscribed and time.monotonic() < deadline:
            subscriber.next_event(0.05)
        confirmed = subscriber.subscribed
    finally:
        subscriber.abandon()  # an event taken meanwhile is not acknowledged: it was not printed
    if confirmed:
        return 0
    print(f"events: {where} did not confirm the subscription within {args.timeout:g} s", file=sys.stderr)
    return 1


@contextlib.contextmanager
def _stopped_as_by_ctrl_c(following: bool) -> Iterator[None]:
    """While following, SIGTERM (a service manager, `timeout`) and SIGHUP (a closing terminal)
    end it as Ctrl-C does: a named consumer's printed events are acknowledged, and it exits 0."""
    if not following:
        yield
        return

    previous = {signum: signal.signal(signum, interrupt_on_stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(run_command(main))
