"""The decoder process: ingest frames are decoded and validated in a child process, off the daemon's GIL.

CPython runs one thread at a time, and at full speed the daemon's GIL is about 90 % busy, a
fifth of it decoding and validating frames. So the ingest thread hands each frame to a child
process and gets back what :func:`decode_message` made of it: the valid events and the refusals,
in a compact msgpack form that it reads back in C (~0.6 µs an event, against ~2.4 µs for
decoding and validating). The child runs the very function the ingest thread runs when there is
no child, so what is accepted, and the reason given for each refusal, do not depend on where a
frame was decoded.

The two talk over a pair of ipc sockets in a private (0700) directory: frames one way, results
the other, in the same order (one child, first-in first-out sockets). The parent binds, the
child connects and says it is ready. If the child dies or stops answering, the ingest thread
decodes the frames it was waiting for itself (it keeps each one until its result comes) and
starts a new child on new sockets, so a late result of the old one is never taken for a new
frame's.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import zmq

from transport.codec import FrameError, Limits, batch_id_of, decode_ack_request, decode_frame
from transport.queries import debug_hooks_enabled
from transport.schema import Event

log = logging.getLogger(__name__)

FIRE_AND_FORGET = b"f"
ACKNOWLEDGED = b"a"
_STOP = b"stop"
_READY = b"ready"

READY_TIMEOUT_S = 15.0
_DIR_PREFIX = "eventagg-decoder-"
_PARENT_CHECK_MS = 1_000
# Test hook (only with $EVENTAGG_TEST_HOOKS=1): a message holding these bytes ends the decoder
# process with SIGKILL, as the kernel's OOM killer would, so tests can see such a frame refused.
KILL_HOOK = b"eventagg-test-hook:kill-decoder"
_ROOT = Path(__file__).resolve().parents[1]


class Decoded(NamedTuple):
    """What one ingest message held: its events and refusals, or why it was refused whole."""

    status: int  # OK, REFUSED (the whole message; ``error`` says why) or FAILED (a decoder bug)
    batch_id: int | str | None  # an acknowledged batch's id, where it could be read
    error: str
    events: list[Event]
    rejected: list[tuple[int, str]]


OK, REFUSED, FAILED = 0, 1, 2

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Decoded).decode


def decode_message(kind: bytes, body: bytes, limits: Limits) -> Decoded:
    """Decode one fire-and-forget frame or acknowledged request; never raises."""
    try:
        if kind == ACKNOWLEDGED:
            try:
                batch_id, batch = decode_ack_request(body, limits)
            except FrameError as exc:
                return Decoded(REFUSED, batch_id_of(body), str(exc), [], [])
            return Decoded(OK, batch_id, "", batch.events, batch.rejected)
        try:
            batch = decode_frame(body, limits)
        except FrameError as exc:
            return Decoded(REFUSED, None, str(exc), [], [])
        return Decoded(OK, None, "", batch.events, batch.rejected)
    except Exception as exc:
        return Decoded(
            FAILED, None, f"message could not be decoded ({type(exc).__name__}: {exc}); this is a bug", [], []
        )


class DecoderUnavailable(RuntimeError):
    """The decoder process could not be started; the ingest thread decodes frames itself."""


class DecoderProcess:
    """One child process that decodes frames, and the parent's ends of the sockets to it.

    Used by one thread at a time: made and started by the caller of ``IngestServer.start``,
    then used only by the ingest thread.
    """

    def __init__(self, context: zmq.Context[Any], limits: Limits) -> None:
        self._context = context
        self._limits = limits
        self._dir: Path | None = None
        self._generation = 0
        self._process: subprocess.Popen[bytes] | None = None
        self.frames: zmq.Socket[Any] | None = None
        self.results: zmq.Socket[Any] | None = None

    def start(self) -> None:
        """Start a child on new sockets and wait until it is connected.

        Raises :class:`DecoderUnavailable` if it does not connect.
        """
        self._close_sockets()
        self._generation += 1
        try:
            if self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix=_DIR_PREFIX))  # 0700: only our user connects
            frames_endpoint = f"ipc://{self._dir}/frames-{self._generation}"
            results_endpoint = f"ipc://{self._dir}/results-{self._generation}"
            self.frames = self._context.socket(zmq.PUSH)
            self.results = self._context.socket(zmq.PULL)
            for sock in (self.frames, self.results):
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDHWM, 0)  # the ingest thread bounds the frames out itself
                sock.setsockopt(zmq.RCVHWM, 0)
            self.frames.bind(frames_endpoint)
            self.results.bind(results_endpoint)
        except (OSError, zmq.ZMQError) as exc:
            # E.g. a $TMPDIR so long that an ipc path would not fit in a socket address.
            raise DecoderUnavailable(
                f"cannot make the decoder process's sockets in {tempfile.gettempdir()}: {exc}"
            ) from exc
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
        command = [
            sys.executable,
            "-m",
            "actors.decoder",
            frames_endpoint,
            results_endpoint,
            str(self._limits.max_batch_events),
            str(self._limits.max_payload_bytes),
            str(os.getpid()),
            *([] if self._limits.nul_in_text else ["--no-nul-in-text"]),
        ]
        try:
            # A session of its own: signals meant for the daemon's whole process group (Ctrl-C in
            # a terminal, timeout(1), kill -- -PGID) would otherwise end it, or on SIGHUP kill it,
            # under a daemon that is draining or only re-reading its log level. The daemon ends
            # it itself, after its last frames are decoded.
            self._process = subprocess.Popen(
                command, env=env, stdin=subprocess.DEVNULL, cwd=str(_ROOT), start_new_session=True
            )
        except OSError as exc:
            raise DecoderUnavailable(f"cannot start the decoder process: {exc}") from exc
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.results.poll(100):
            code = self._process.poll()
            if code is not None:  # e.g. it could not import: its stderr, in the daemon's log, says why
                self._process = None
                raise DecoderUnavailable(f"the decoder process exited with status {code} as it started")
            if time.monotonic() > deadline:
                self.kill()
                raise DecoderUnavailable(f"the decoder process did not start within {READY_TIMEOUT_S:.0f} s")
        if self.results.recv() != _READY:
            self.kill()
            raise DecoderUnavailable("the decoder process did not say it was ready")

    @property
    def pid(self) -> int | None:
        """The child's process id, while there is one."""
        return self._process.pid if self._process is not None else None

    def alive(self) -> bool:
        """Whether the child is running."""
        return self._process is not None and self._process.poll() is None

    def send(self, kind: bytes, body: bytes) -> bool:
        """Hand one message to the child; False when it cannot take it now."""
        assert self.frames is not None
        try:
            self.frames.send_multipart([kind, body], zmq.NOBLOCK, copy=len(body) < 65_536)
        except zmq.Again:
            return False
        return True

    def receive(self) -> Decoded | None:
        """The next result, if one has come."""
        assert self.results is not None
        try:
            return _decode(self.results.recv(zmq.NOBLOCK))
        except zmq.Again:
            return None

    def kill(self) -> None:
        """End the child at once (it holds nothing that needs saving)."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                log.error("decoder process %d did not end after SIGKILL", self._process.pid)
            self._process = None

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the child to end, wait for it (killing it after ``timeout``), and remove the sockets."""
        if self._process is not None and self.frames is not None and self._process.poll() is None:
            try:
                self.frames.send_multipart([_STOP, b""], zmq.NOBLOCK)
                self._process.wait(timeout)
            except (zmq.ZMQError, subprocess.TimeoutExpired):
                pass
        self.kill()
        self._close_sockets()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _close_sockets(self) -> None:
        for sock in (self.frames, self.results):
            if sock is not None:
                sock.close(linger=0)
        self.frames = self.results = None


def serve(frames_endpoint: str, results_endpoint: str, limits: Limits, parent_pid: int) -> None:
    """The child's loop: decode each message and send the result back, until told to stop or orphaned."""
    context = zmq.Context(1)
    frames = context.socket(zmq.PULL)
    results = context.socket(zmq.PUSH)
    for sock in (frames, results):
        sock.setsockopt(zmq.LINGER, 1_000)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
    frames.connect(frames_endpoint)
    results.connect(results_endpoint)
    results.send(_READY)
    kill_hook = debug_hooks_enabled()
    try:
        while True:
            if not frames.poll(_PARENT_CHECK_MS):
                if os.getppid() != parent_pid:
                    # The daemon is gone (killed: it could not clean up): nobody will read what we
                    # would send, and the socket directory is ours to remove.
                    _remove_socket_dir(frames_endpoint)
                    return
                continue
            kind, body = frames.recv_multipart()
            if kind == _STOP:
                return
            if kill_hook and KILL_HOOK in body:
                os.kill(os.getpid(), signal.SIGKILL)
            results.send(_encode(decode_message(kind, body, limits)))
    finally:
        frames.close(linger=0)
        results.close()
        context.term()


def _remove_socket_dir(endpoint: str) -> None:
    """Remove the private directory an ipc endpoint of ours lives in (never anything else)."""
    folder = Path(endpoint.removeprefix("ipc://")).parent
    if folder.name.startswith(_DIR_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child process (``python -m actors.decoder``), started by :class:`DecoderProcess`."""
    parser = argparse.ArgumentParser(description="eventagg's decoder process; started by the daemon, not by hand.")
    parser.add_argument("frames_endpoint")
    parser.add_argument("results_endpoint")
    parser.add_argument("max_batch_events", type=int)
    parser.add_argument("max_payload_bytes", type=int)
    parser.add_argument("parent_pid", type=int)
    parser.add_argument("--no-nul-in-text", dest="nul_in_text", action="store_false")
    args = parser.parse_args(argv)
    # What a message makes lives only until its result is sent, and holds no cycles: the cyclic
    # GC would scan those objects for nothing every 700 allocations (several times a frame).
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    logging.basicConfig(level=logging.INFO, format="eventagg decoder: %(levelname)s %(message)s")
    serve(
        args.frames_endpoint,
        args.results_endpoint,
        Limits(args.max_batch_events, args.max_payload_bytes, args.nul_in_text),
        args.parent_pid,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
