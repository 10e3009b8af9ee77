"""``eventagg publish`` (and ``scripts/publish.py``): send a deterministic stream of events to a daemon.

A load generator and smoke tool:
``publish [--endpoint URL | --config PATH] [--acked] --events N --duplicates F --topics K
--processes P --batch B --seed S --id-prefix STR [--slice K/P] [--rate R]
[--server-key PATH --client-cert PATH] [--json]``

Exactly ``round(N × F)`` of the N events are re-sends of earlier events of the run; the rest
are distinct. With ``--processes P`` the stream is split into P interleaved slices, each sent by
its own OS process, and the summary adds them up. ``--batch 1`` sends one event map per frame;
more sends arrays. ``--acked`` uses the acknowledged endpoint (``[ingest] ack_bind``) and
retries until every batch is acknowledged or ``--deadline`` passes. CURVE keys come from
``--server-key``/``--client-cert`` or from the config's ``[security] client_certificate``.

Progress goes to stderr when it is a terminal. The summary is one line (with ``--json``: one
JSON object on the last line of stdout). Exit status: 0 when every event was sent and, with
``--acked``, acknowledged as stored (new or duplicate); 1 otherwise; 2 for a bad config; 130
after Ctrl-C (SIGINT), which stops every process, waits up to ``INTERRUPT_WAIT_S`` for the
acknowledgements of what was sent, and still prints the summary (``"interrupted": true``);
SIGTERM and SIGHUP do the same, with 143 and 129.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import zmq

from transport.arguments import MAX_COUNT
from transport.client import FLAG_HINTS, MAX_TIMEOUT_S, connectable
from transport.commands.client_flags import (
    STOP_SIGNALS,
    curve_from_args,
    endpoint_url,
    interrupt_on_stop,
    prefix_library_logs,
    stopped_by,
    utf8_text,
    write_output,
)
from transport.config import ConfigError, IngestConfig, load_config
from transport.handshake import unreachable
from transport.publisher import (
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_WINDOW,
    DeliveryFailed,
    Publisher,
    PublisherError,
    PublishTimeout,
)
from transport.schema import DEFAULT_MAX_PAYLOAD_BYTES, InvalidEvent
from transport.security import SecurityError, SocketHook
from transport.workload import plan

DEFAULT_BATCH = 100  # events per frame when --batch is not given
PROGRESS_EVERY_S = 0.5
INTERRUPT_WAIT_S = 5.0  # after Ctrl-C, how long the acknowledgements of what was sent are awaited
PARENT_CHECK_EVERY = 1000  # events between a worker's checks that the command is still there
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
MAX_RATE = 1e9
# The stream is planned in memory before it is sent (about half a KiB an event), and each
# process is a publisher of its own: bounds that keep a typo from exhausting the machine.
MAX_EVENTS = 10_000_000
MAX_PROCESSES = 256
WAIT_SLICE_S = 0.1  # the longest a Ctrl-C waits to be heard while sending


def check_reachable(args: argparse.Namespace, endpoint: str, secure: SocketHook | None) -> str | None:
    """What stops events from reaching ``endpoint`` (None: a handshake succeeded), within --deadline.

    Fire-and-forget would otherwise report events sent that went nowhere: ZeroMQ queues them for
    a daemon that is not there, or that refuses this client's CURVE key.
    """

    def waiting() -> None:
        print(f"publish: waiting up to {args.deadline:g} s (--deadline) for {endpoint}", file=sys.stderr)

    return unreachable(endpoint, zmq.DEALER if args.acked else zmq.PUSH, secure, args.deadline, waiting)


def run_slice(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The events of this run's ``--slice K/P``, or of the whole run."""
    stream = plan(args.events, args.duplicates, args.topics, args.seed, args.id_prefix)
    if not args.slice:
        return stream
    index, count = (int(part) for part in args.slice.split("/"))
    return stream[index::count]


def send_slice(
    args: argparse.Namespace,
    endpoint: str,
    events: list[dict[str, Any]],
    count: int,
    progress: Any,
    watch_parent: bool = False,
    ctrl_c: _CtrlC | None = None,
) -> dict[str, Any]:
    """Send ``events``, one of ``count`` slices of the run's stream; returns this slice's summary.

    ``progress`` is a shared counter (``.value``) of events sent (fire-and-forget) or
    acknowledged (``--acked``), for the progress line. Ctrl-C stops the sending and is reported
    as ``interrupted``; so is, with ``watch_parent``, the end of the process that started this one.
    """
    if ctrl_c is None:
        with _CtrlC() as ctrl_c:
            return send_slice(args, endpoint, events, count, progress, watch_parent, ctrl_c)
    rate = args.rate / count if args.rate else 0.0
    # When this slice began to be sent, planning done: the summary's events/s is over the
    # sending, not over the planning too (CLOCK_MONOTONIC is one clock for every process).
    began = time.monotonic()

    def advance(count: int) -> None:
        with progress.get_lock():
            progress.value += count

    # Several --endpoint: one daemon per topic by rendezvous hashing (transport.affinity).
    several = endpoint.split(",") if "," in endpoint else None
    publisher = Publisher(
        "" if several else endpoint,
        endpoints=several,
        acked=args.acked,
        batch_size=args.batch,
        max_batch_bytes=getattr(args, "max_batch_bytes", DEFAULT_MAX_BATCH_BYTES),
        max_payload_bytes=getattr(args, "max_payload_bytes", DEFAULT_MAX_PAYLOAD_BYTES),
        window=args.window,
        ack_timeout=args.ack_timeout,
        deadline=args.deadline,
        close_timeout=args.deadline,
        on_ack=(lambda result: advance(result.size)) if args.acked else None,
        configure=curve_from_args(args),  # built here: each process reads the key files itself
        hints=FLAG_HINTS,  # a refusal met on the way (the daemon restarted with other keys) names the flags
    )
    error = None
    reported = 0
    next_at = time.monotonic()
    parent = os.getppid()
    # Deadlines of the waits below, sliced so a Ctrl-C is heard within WAIT_SLICE_S.
    room_limit = math.inf if args.acked else args.deadline  # acked: the retry deadline ends the wait
    try:
        try:
            for sent, event in enumerate(events):
                if watch_parent and sent % PARENT_CHECK_EVERY == 0 and os.getppid() != parent:
                    ctrl_c.seen = True  # the command is gone (killed): stop as after Ctrl-C
                if ctrl_c.seen:
                    break
                if rate:
                    # Pace without saving up credit: after a stall (a daemon restarting) the
                    # stream resumes at the rate, it does not burst to catch up.
                    _pause_until(publisher, next_at, ctrl_c)
                    next_at = max(next_at, time.monotonic() - 0.05) + 1 / rate
                if not _sliced(partial(publisher.publish, event, WAIT_SLICE_S), room_limit, ctrl_c, endpoint):
                    break
                if not args.acked and publisher.totals.sent - reported >= args.batch:
                    advance(publisher.totals.sent - reported)
                    reported = publisher.totals.sent
            # Bounded: DeliveryFailed once a batch goes --deadline unacknowledged.
            _sliced(partial(publisher.flush, WAIT_SLICE_S), room_limit, ctrl_c, endpoint)
            if ctrl_c.seen and args.acked:
                # What was sent gets a short wait for its acknowledgements.
                try:
                    publisher.flush(min(INTERRUPT_WAIT_S, args.deadline))
                except PublisherError:
                    pass  # counted below as unacknowledged
        finally:
            publisher.close(timeout=0 if ctrl_c.seen else args.deadline, flush=False)
    except DeliveryFailed as exc:
        if not ctrl_c.seen:
            # Not the exception's own words: a command's user has no .events to reach.
            error = f"{exc.reason} Running the same command again is safe: what was stored counts as duplicates"
    except PublisherError as exc:
        if not ctrl_c.seen:
            error = str(exc)
    except InvalidEvent as exc:  # e.g. over the config's [ingest] max_payload_bytes: the daemon would refuse it
        limit = " ([ingest] max_payload_bytes)" if str(exc).startswith("payload is") else ""
        error = f"an event was refused before it was sent: {exc}{limit}"
    totals = publisher.totals
    if not args.acked:
        advance(totals.sent - reported)
    done = totals.acked_new + totals.acked_duplicate if args.acked else totals.sent
    return {
        "sent": totals.sent,
        "acked_new": totals.acked_new,
        "acked_duplicate": totals.acked_duplicate,
        "rejected": totals.rejected,
        "unacked": len(events) - done if args.acked else 0,
        "retries": totals.retries,
        "errors": [error] if error else [],
        "interrupted": ctrl_c.seen,
        "began": began,
    }


# The signals that stop the sending as Ctrl-C does: a terminal closing (SIGHUP) and a service
# manager or `timeout` (SIGTERM) get the summary too, and no worker is left sending.
_SENDING_STOPS = (signal.SIGINT, *STOP_SIGNALS)


class _CtrlC:
    """While sending, SIGINT (or SIGTERM, SIGHUP) only sets ``seen``, which the sending loop
    checks between steps.

    A KeyboardInterrupt raised wherever the signal lands could fall inside the publisher between
    sending a batch (or taking its acknowledgement) and counting it, and the summary would then
    miss events the daemon stored. Every wait of the loop is cut into ``WAIT_SLICE_S`` slices.
    """

    def __init__(self) -> None:
        self.seen = False
        self.presses = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _CtrlC:
        for signum in _SENDING_STOPS:
            self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def _note(self, signum: int, frame: Any) -> None:
        self.seen = True
        if not stopped_by:
            stopped_by.append(signum)
        if signum == stopped_by[0]:  # SIGTERM and SIGHUP together (systemd) are one stop, not two
            self.presses += 1


def _interrupted_status() -> int:
    """The exit status after a stop signal: 128 and its number, as a shell gives it."""
    return 128 + (stopped_by[0] if stopped_by else signal.SIGINT)


def _stop_with_parent() -> None:
    """Have the kernel send this worker SIGINT when the command that started it dies (Linux), so
    a killed command leaves no worker sending; elsewhere the sending loop looks now and then."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGINT), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _pause_until(publisher: Publisher, at: float, ctrl_c: _CtrlC) -> None:
    """Wait until ``at`` (collecting acks in acknowledged mode), or until Ctrl-C."""
    while not ctrl_c.seen and (ahead := at - time.monotonic()) > 0:
        if publisher.acked:
            publisher.poll(min(ahead, WAIT_SLICE_S))
        else:
            time.sleep(min(ahead, WAIT_SLICE_S))


def _sliced(step: Callable[[], None], limit: float, ctrl_c: _CtrlC, endpoint: str) -> bool:
    """Repeat ``step`` (a wait of WAIT_SLICE_S that raises PublishTimeout) until it succeeds.

    Returns False when Ctrl-C came first; raises PublishTimeout once ``limit`` seconds pass.
    """
    give_up_at = None
    while True:
        try:
            step()
            return True
        except PublishTimeout:
            if ctrl_c.seen:
                return False
            now = time.monotonic()
            give_up_at = give_up_at or now + limit - WAIT_SLICE_S
            if now >= give_up_at:
                raise PublishTimeout(
                    f"{endpoint} took no frame for {limit:g} s (its queue is full or it is not running)"
                ) from None


def _worker(
    args: argparse.Namespace,
    endpoint: str,
    index: int,
    events: list[dict[str, Any]],
    count: int,
    progress: Any,
    results: Any,
) -> None:
    # Ctrl-C reaches a worker twice (from the terminal to the whole group, and passed on by the
    # command); from the start, each only sets the flag the sending loop checks.
    with _CtrlC() as ctrl_c:
        _stop_with_parent()
        try:
            summary = send_slice(args, endpoint, events, count, progress, watch_parent=True, ctrl_c=ctrl_c)
        except Exception as exc:
            summary = {"errors": [f"process {index}: {type(exc).__name__}: {exc}"]}
        results.put(summary)


def run_processes(args: argparse.Namespace, endpoint: str, progress: Any) -> list[dict[str, Any]]:
    """Run one process per slice and collect their summaries; a process that dies is an error."""
    results: Any = multiprocessing.Queue()
    # The stream is planned once, here; each process is handed its slice.
    stream = run_slice(args)
    workers = [
        multiprocessing.Process(
            target=_worker, args=(args, endpoint, i, stream[i :: args.processes], args.processes, progress, results)
        )
        for i in range(args.processes)
    ]
    summaries: list[dict[str, Any]] = []
    give_up_at = math.inf
    with _CtrlC() as ctrl_c:
        for worker in workers:
            worker.start()
        while len(summaries) < len(workers) and time.monotonic() < give_up_at:
            if ctrl_c.presses > 1:
                break  # a second Ctrl-C: stop waiting
            if ctrl_c.seen and give_up_at == math.inf:
                # Pass it on (a SIGINT sent to this process alone would leave them sending), then
                # collect what they sent; they stop and answer within INTERRUPT_WAIT_S.
                for worker in workers:
                    if worker.is_alive() and worker.pid is not None:
                        os.kill(worker.pid, signal.SIGINT)
                give_up_at = time.monotonic() + INTERRUPT_WAIT_S + 10
            try:
                summaries.append(results.get(timeout=WAIT_SLICE_S))
            except Exception:
                if not any(worker.is_alive() for worker in workers):
                    try:
                        while True:
                            summaries.append(results.get(timeout=0.5))
                    except Exception:
                        pass
                    break
    for worker in workers:
        worker.join(0 if ctrl_c.seen else 10)
        if worker.is_alive():
            worker.terminate()
    missing = len(workers) - len(summaries)
    if missing and ctrl_c.seen:
        summaries.append({"interrupted": True, "errors": [f"{missing} publisher processes stopped without a summary"]})
    elif missing:
        summaries.append({"errors": [f"{missing} publisher processes died without a summary"]})
    return summaries


def show_progress(progress: Any, total: int, acked: bool, stop: threading.Event) -> None:
    """Rewrite one progress line on stderr until ``stop`` is set."""
    started = time.monotonic()
    verb = "acknowledged" if acked else "sent"
    while not stop.wait(PROGRESS_EVERY_S):
        done = progress.value
        elapsed = time.monotonic() - started
        rate = done / elapsed if elapsed else 0.0
        print(
            f"\r{done:,}/{total:,} {verb} ({100 * done / max(total, 1):.0f} %, {rate:,.0f} events/s)",
            end="",
            file=sys.stderr,
            flush=True,
        )
    print("\r\033[K", end="", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Send a deterministic stream of events to eventagg.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--endpoint",
        type=endpoint_url,
        metavar="URL",
        action="append",
        help="ingest endpoint, e.g. tcp://127.0.0.1:5555 (with --acked: the ack endpoint, :5557); given several "
        "times (with --acked), each topic goes to one of the daemons, chosen by rendezvous hashing",
    )
    where.add_argument("--config", metavar="PATH", help="read the ingest endpoint from this config file")
    parser.add_argument("--events", type=int, default=1000, metavar="N", help="events to send (default 1000)")
    parser.add_argument("--duplicates", type=float, default=0.0, metavar="F", help="fraction of re-sends (default 0)")
    parser.add_argument("--topics", type=int, default=10, metavar="K", help="topics (default 10)")
    parser.add_argument("--processes", type=int, default=1, metavar="P", help="publisher processes (default 1)")
    parser.add_argument(
        "--batch",
        type=int,
        metavar="B",
        help="events per frame (default 100, or the config's [ingest] max_batch_events if lower)",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    parser.add_argument(
        "--id-prefix", type=utf8_text, default="e", metavar="STR", help="prefix of every event_id (default 'e')"
    )
    parser.add_argument("--slice", metavar="K/P", help="send only slice K (0-based) of P interleaved slices")
    parser.add_argument(
        "--acked",
        action="store_true",
        help="acknowledged mode: wait for every batch to be committed, retrying as needed",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        metavar="W",
        help=f"acknowledged batches in flight per process (default {DEFAULT_WINDOW})",
    )
    parser.add_argument(
        "--ack-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="resend a batch not acknowledged within this (default 5)",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="give up when a batch has gone this long unacknowledged (default 60)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        metavar="R",
        help=f"send at most R events/s in total (from 0.001 to {MAX_RATE:g}), never bursting to catch up "
        "(default 0: no limit)",
    )
    parser.add_argument("--server-key", metavar="PATH", help="CURVE: the daemon's public certificate (server.key)")
    parser.add_argument(
        "--client-cert", metavar="PATH", help="CURVE: this client's secret certificate (NAME.key_secret)"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = parser.parse_args(argv)
    prefix_library_logs("publish")
    try:
        if args.endpoint:
            if len(args.endpoint) > 1 and not args.acked:
                parser.error(
                    "several --endpoint need --acked: a topic moves to another daemon only while one does not ack"
                )
            endpoint = ",".join(args.endpoint)
        else:
            ingest = load_config(args.config).ingest if args.config else IngestConfig()
            endpoint = connectable(ingest.ack_bind if args.acked else ingest.bind)
            # The daemon refuses a larger message whole, as Publisher.from_config knows.
            if args.batch is not None and args.batch > ingest.max_batch_events:
                raise ConfigError(
                    f"--batch {args.batch} is more than the config's [ingest] max_batch_events"
                    f" ({ingest.max_batch_events}): the daemon would refuse every batch whole"
                )
            if args.batch is None:
                args.batch = min(DEFAULT_BATCH, ingest.max_batch_events)
            args.max_batch_bytes = min(DEFAULT_MAX_BATCH_BYTES, ingest.max_message_bytes // 2)
            args.max_payload_bytes = ingest.max_payload_bytes
        secure = curve_from_args(args)  # the key files checked once, before starting any process
    except (ConfigError, SecurityError) as exc:
        print(f"publish: {exc}", file=sys.stderr)
        return 2
    if args.batch is None:
        args.batch = DEFAULT_BATCH
    if not all(1 <= value <= MAX_COUNT for value in (args.batch, args.processes, args.window, args.topics)):
        parser.error(f"--batch, --processes, --window and --topics must be from 1 to {MAX_COUNT}")
    if args.events < 0 or not 0 <= args.duplicates < 1:
        parser.error("--events must be 0 or more and --duplicates a fraction from 0 up to (not including) 1")
    if args.events > MAX_EVENTS:
        parser.error(
            f"--events must be at most {MAX_EVENTS:,} (the stream is planned in memory); for more, run the "
            "command again with another --id-prefix"
        )
    if args.processes > MAX_PROCESSES:
        parser.error(f"--processes must be at most {MAX_PROCESSES}, not {args.processes}")
    if not all(math.isfinite(value) for value in (args.ack_timeout, args.deadline, args.rate)):
        parser.error("--ack-timeout, --deadline and --rate must be finite numbers")
    if not (0 < args.ack_timeout <= MAX_TIMEOUT_S and 0 < args.deadline <= MAX_TIMEOUT_S):
        parser.error(f"--ack-timeout and --deadline must be above 0 and at most {MAX_TIMEOUT_S} s")
    if args.rate and not 0.001 <= args.rate <= MAX_RATE:
        parser.error(f"--rate must be 0 (no limit) or from 0.001 to {MAX_RATE:g} events/s, not {args.rate:g}")
    if args.slice:  # a usage error, said before waiting up to --deadline for the daemon
        try:
            index, count = (int(part) for part in args.slice.split("/"))
        except ValueError:
            parser.error("--slice must look like K/P, e.g. 0/3")
        if not 0 <= index < count:
            parser.error("--slice K/P needs 0 <= K < P")
    # Before the sending (and its _CtrlC) begins, SIGTERM and SIGHUP end the command as Ctrl-C does.
    for signum in STOP_SIGNALS:
        signal.signal(signum, interrupt_on_stop)
    if "," not in endpoint:  # (several daemons: a topic moves on from one that is down)
        try:
            problem = check_reachable(args, endpoint, secure)
        except KeyboardInterrupt:
            return _interrupted_status()  # nothing was sent
        if problem is not None:
            print(f"publish: {problem}", file=sys.stderr)
            return 1

    progress: Any = multiprocessing.Value("q", 0)
    stop = threading.Event()
    ticker = None
    started = time.perf_counter()
    if args.slice:
        total = len(range(index, args.events, count))
    else:
        index, count = 0, 1
        total = args.events
    if sys.stderr.isatty():
        ticker = threading.Thread(target=show_progress, args=(progress, total, args.acked, stop), daemon=True)
        ticker.start()
    try:
        if args.slice:
            summaries = [send_slice(args, endpoint, run_slice(args), count, progress)]
        else:
            summaries = run_processes(args, endpoint, progress)
    except KeyboardInterrupt:  # while the stream was planned: nothing was sent
        summaries = [{"interrupted": True}]
    finally:
        stop.set()
        if ticker is not None:
            ticker.join(2)
    elapsed = time.perf_counter() - started
    # The planning of a large stream takes seconds (about 5 s a million) before anything is sent;
    # a rate over all of it understated the sending's, well below a --rate that was kept.
    began = [s["began"] for s in summaries if isinstance(s.get("began"), float)]
    sending = max(0.0, time.monotonic() - min(began)) if began else 0.0

    summary: dict[str, Any] = {
        key: sum(s.get(key, 0) for s in summaries)
        for key in ("sent", "acked_new", "acked_duplicate", "rejected", "unacked", "retries")
    }
    errors = [error for s in summaries for error in s.get("errors", [])]
    interrupted = any(s.get("interrupted") for s in summaries)
    summary.update(
        {
            "interrupted": interrupted,
            "elapsed_s": round(elapsed, 3),
            "sending_s": round(sending, 3),
            "events_per_s": round(summary["sent"] / sending) if sending else 0,
            "acked": args.acked,
            "processes": 1 if args.slice else args.processes,
            "endpoint": endpoint,
            "errors": errors,
        }
    )
    if args.acked:
        # `sent` may exceed `total`: with several --endpoint, a silent daemon's events go again to the next one.
        ok = not errors and summary["acked_new"] + summary["acked_duplicate"] == total <= summary["sent"]
    else:
        ok = not errors and summary["sent"] == total
    for error in errors:
        print(f"publish: {error}", file=sys.stderr)
    if interrupted:
        status = _interrupted_status()
    else:
        status = 0 if ok else 1

    def write() -> None:
        if args.json:
            print(json.dumps(summary))
            return
        line = (
            f"sent {summary['sent']:,} events in {sending:.2f} s ({summary['events_per_s']:,} events/s;"
            f" {elapsed:.2f} s in all, planning included)"
        )
        if args.acked:
            line += (
                f": acknowledged {summary['acked_new']:,} new, {summary['acked_duplicate']:,} duplicate, "
                f"{summary['rejected']:,} rejected; {summary['unacked']:,} unacknowledged, "
                f"{summary['retries']} retries"
            )
        print(f"interrupted: {line}" if interrupted else line)

    # The events went out whatever becomes of the summary: a reader gone (| head) keeps the status.
    return write_output(write, status)


if __name__ == "__main__":
    sys.exit(main())
