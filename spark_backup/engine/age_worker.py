"""Decrypt age streams in a process of its own, one after another.

Decryption (``age_decrypt.decrypt_stream``), decompression and both digests run here, on
another core than the restoring process, which then only reads, parses and writes, and holds
the interpreter lock to itself (a decompressing thread beside it contended for the lock, and
on a busy machine doubled a restore's wall time). The worker hashes the ciphertext it reads,
so the stored digest costs the restoring process nothing.

One worker serves a whole run: a deep verify of 500 small copies starts one process, not 500
(each start costs about 80 ms of interpreter and imports). ``AgeWorker`` is the calling side.

It hashes the plaintext it hands over too: that digest is taken where the bytes are made, so
the restoring process only reads, parses and writes (on a tree of small files it is the
slowest stage, as ``tar -x`` is in ``age -d | zstd -d | tar -x``). The caller counts what it
read and compares it with the count the worker reports, so the digest covers exactly the
bytes that were restored.

The private key reaches the worker through an inherited pipe, never through its arguments or
environment (which other users may read from /proc). Protocol::

    python -m spark_backup.engine.age_worker IDENTITY_FD CONTROL_FD
    IDENTITY_FD: age identities, one per line, then end of file
    CONTROL_FD:  a Unix SOCK_SEQPACKET socket; per object, the caller sends one message
                 carrying two descriptors (SCM_RIGHTS): the stored (encrypted) bytes to read
                 and a pipe to write the plaintext into. The worker decrypts, closes both and
                 answers with one JSON message, {"ok": true, "sha256": ..., "bytes": ...,
                 "plaintext_sha256": ..., "plaintext_bytes": ...} (the digests of what it
                 read and of what it wrote) or
                 {"ok": false, "error": "damaged" | "no_matching_keys" | "reader_gone",
                 "detail": ..., "bytes": ...}. The caller closing the socket ends the worker.
"""

from __future__ import annotations

import hashlib
import os
import queue
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, BinaryIO

from spark_backup.engine.gc_pause import pause_during_startup, startup_done
from spark_backup.engine.streams import (
    CHUNK_SIZE,
    HashingReader,
    Readable,
    copy_stream,
    widen_pipe,
)

if TYPE_CHECKING:
    from pyrage import x25519

    from spark_backup.engine.age_decrypt import Identities

_REQUEST = b"decrypt"
# The same, and the plaintext inflated from zstd before it is written: decompression then runs
# in the worker too, and the restoring process only reads, hashes and writes.
_REQUEST_ZSTD = b"decrypt zstd"
_MAX_STATUS = 64 * 1024
# How long a worker may take to exit once told to; it has nothing left to do then.
_EXIT_SECONDS = 10


# --- the worker --------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    # Ctrl-C reaches the whole process group; the calling process decides, and closes the
    # pipes, which stops this worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Its start is on the way to a restore's first plaintext, and its imports make thousands of
    # objects that live as long as it does: the collector would walk them a dozen times (1.2 ms
    # of 37). The usual thresholds again once the identities are read.
    pause_during_startup()
    # The worker's alone (cryptography, zstandard): the calling side, which imports this
    # module for ``AgeWorker``, loads none of it. Both before the identities are read: a worker
    # started ahead of them (``AgeWorker.start``) has made every import when they come.
    import zstandard  # noqa: F401

    from spark_backup.engine.age_decrypt import Identities

    identity_fd, control_fd = int(argv[0]), int(argv[1])
    with os.fdopen(identity_fd, "r", encoding="utf-8") as handle:
        # Written by ``AgeWorker`` from identities it holds parsed (``str`` of each), so they
        # need no second check: the worker imports nothing it can do without, as every restore,
        # verify and wal-fetch waits for it to start.
        identities = Identities(handle.read().split())
    startup_done()
    with socket.socket(fileno=control_fd) as control:
        while True:
            message, fds, _, _ = socket.recv_fds(control, len(_REQUEST_ZSTD), 2)
            if not message:
                return 0  # the caller is done
            if len(fds) != 2 or message not in (_REQUEST, _REQUEST_ZSTD):
                for fd in fds:
                    os.close(fd)
                return 1
            status = decrypt(fds[0], fds[1], identities, zstd=message == _REQUEST_ZSTD)
            import json  # here: not on the way to the first plaintext

            control.sendall(json.dumps(status).encode())


def decrypt(
    stored_fd: int, plain_fd: int, identities: Identities, zstd: bool = False
) -> dict[str, Any]:
    """Decrypt from ``stored_fd`` into ``plain_fd`` (inflated, with ``zstd``), closing both;
    the status to report."""
    from spark_backup.engine.age_decrypt import AgeDecryptError, decrypt_stream

    # decrypt_stream reads 256 KiB at a time, and the pieces written inflate to about 1 MiB
    # each, the pipe's size: no buffering needed either way.
    stored_file = open(stored_fd, "rb", buffering=0)  # noqa: SIM115
    stored = HashingReader(stored_file)
    plain = _PlainOut(plain_fd)
    status: dict[str, Any]
    try:
        inflated = _Inflate(plain) if zstd else None
        decrypt_stream(stored, plain.write if inflated is None else inflated.write, identities)
        if inflated is not None:
            inflated.finish()
        plain.finish()
        status = {
            "ok": True,
            "sha256": stored.hexdigest(),
            "bytes": stored.bytes,
            "plaintext_sha256": plain.sha256.hexdigest(),
            "plaintext_bytes": plain.bytes,
        }
    except _ZstdDamage as exc:
        status = {"ok": False, "error": "zstd", "detail": str(exc), "bytes": stored.bytes}
    except AgeDecryptError as exc:
        status = {"ok": False, "error": exc.kind, "detail": str(exc), "bytes": stored.bytes}
    except OSError as exc:
        # A failed write is the reader going away; a failed read, a store that failed.
        kind = "reader_gone" if plain.broken else "damaged"
        status = {"ok": False, "error": kind, "detail": str(exc), "bytes": stored.bytes}
    finally:
        plain.close()
        stored_file.close()
    return status


class _ZstdDamage(Exception):
    """The decrypted bytes are not one whole zstd frame whose checksum matches."""


class _Inflate:
    """Inflates the zstd frame written to it into ``out``: one frame, checked to its end and
    against its checksum. On the decrypting thread itself, between its writes of 256 KiB:
    pieces of 1 MiB (4 MiB inflated) cost the worker a third more CPU in a restore."""

    def __init__(self, out: _PlainOut):
        import zstandard  # imported already by ``main``

        self._out = out
        self._error = zstandard.ZstdError
        self._frame = zstandard.ZstdDecompressor().decompressobj(write_size=CHUNK_SIZE)

    def write(self, data: bytes) -> None:
        if self._frame.eof:
            raise _ZstdDamage("data after the end of the zstd frame")
        try:
            inflated = self._frame.decompress(data)
        except self._error as exc:
            raise _ZstdDamage(str(exc)) from None
        if self._frame.eof and self._frame.unused_data:
            raise _ZstdDamage("data after the end of the zstd frame")
        if inflated:
            self._out.write(inflated)

    def finish(self) -> None:
        """The frame must have ended."""
        if not self._frame.eof:
            raise _ZstdDamage("the stream ends inside a zstd frame")


class _PlainOut:
    """The plaintext pipe, hashed, counted and written on a thread of its own, so that hashing
    and writing one piece overlap with decrypting and inflating the next (hashlib and the
    pipe's writes release the interpreter lock; the decrypting thread holds it for microseconds
    at a time). At most ``DEPTH`` pieces wait, so memory stays bounded. A failed write (the
    reader went away) is raised by the next ``write`` or by ``finish``.

    The thread runs at a lower priority (``NICENESS``): restoring a large file, the restoring
    process only writes, and the thread has a core to itself (a 300 MB file restored at 99% of
    ``age -d | zstd -d | tar -x`` instead of 69%); restoring many small files, the restoring
    process needs its core all the time, and at the same priority the thread took CPU from it
    (a 20,000-file tree: 0.51 s instead of 0.42 s)."""

    DEPTH = 4
    NICENESS = 5

    def __init__(self, fd: int):
        self.sha256 = hashlib.sha256()
        self.bytes = 0
        self.broken = False
        self._fd = fd
        self._failure: OSError | None = None
        self._pieces: queue.Queue[bytes | bytearray | None] = queue.Queue(self.DEPTH)
        self._thread: threading.Thread | None = threading.Thread(
            target=self._write_pieces, name="age-worker-plaintext", daemon=True
        )
        self._thread.start()

    def write(self, data: bytes | bytearray) -> None:
        if self._failure is not None:
            raise self._failure
        self.bytes += len(data)
        self._pieces.put(data)

    def _write_pieces(self) -> None:
        with suppress(OSError, AttributeError):  # a hint only; Linux sets it per thread
            # Lower than the worker's own priority, whatever that is: set as it was (5), a
            # worker started at nice -5 had this thread ten steps below it, and one at nice 10
            # (as root) had it above.
            thread = threading.get_native_id()
            own = os.getpriority(os.PRIO_PROCESS, thread)
            os.setpriority(os.PRIO_PROCESS, thread, min(19, own + self.NICENESS))
        try:
            while (data := self._pieces.get()) is not None:
                if self._failure is not None:
                    continue  # taken off the queue only, so that the writer never waits
                self.sha256.update(data)
                view = memoryview(data)
                try:
                    while view:
                        view = view[os.write(self._fd, view) :]
                except OSError as exc:
                    self.broken = True
                    self._failure = exc
        finally:
            with suppress(OSError):
                os.close(self._fd)

    def finish(self) -> None:
        """Wait until every piece is written, and close the pipe; raises a failed write."""
        if self._thread is not None:
            self._pieces.put(None)
            self._thread.join()
            self._thread = None
        if self._failure is not None:
            raise self._failure

    def close(self) -> None:
        with suppress(OSError):
            self.finish()


# --- the calling side --------------------------------------------------------------------------


class Decryption:
    """One object being decrypted by the worker: read ``plaintext`` to its end (or stop early),
    then ``finish`` for the worker's status."""

    def __init__(self, worker: AgeWorker, plaintext: BinaryIO):
        self.plaintext = plaintext
        self.status: dict[str, Any] | None = None
        self._worker = worker
        self._feeder: threading.Thread | None = None
        self._feed_errors: list[BaseException] = []

    def feed_from(self, stored: Readable, fd: int) -> None:
        self._feeder = threading.Thread(
            target=_feed, args=(stored, fd, self._feed_errors), name="age-worker-feed", daemon=True
        )
        self._feeder.start()

    def finish(self) -> dict[str, Any]:
        """Wait for the worker to end this decryption; its status (``{}`` if it died without
        one). After a full read this only closes our end; if the reader stopped early, the
        worker's next write fails and it stops."""
        self.plaintext.close()
        self.status = self._worker.answer()
        self.join_feeder()
        if self._feed_errors:
            raise self._feed_errors[0]
        return self.status

    def join_feeder(self) -> None:
        if self._feeder is not None:
            self._feeder.join()


class AgeWorker:
    """An ``age_worker`` process that decrypts one object after another, started on first use
    (or by ``start``) and stopped by ``close`` (or the ``with`` block's end). One decryption at
    a time; a worker that died is replaced by the next decryption.

    Without ``identities`` a worker can be started before they are known: a restore starts it
    with the command, so that its interpreter and imports (about 55 ms, a tenth of restoring a
    tree of 20,000 files) overlap reading the plan and the copy's manifest. It waits for its
    identities after its imports; ``open_copy`` hands it the copy's (``provide``)."""

    def __init__(self, identities: list[x25519.Identity] | None = None):
        self.identities = identities
        self._process: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        # The write end of the identity pipe of a worker started before its identities.
        self._identity_pipe: int | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> AgeWorker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _start(self) -> None:
        # The worker keeps freed buffers for reuse (processes.ALLOCATOR_ENVIRONMENT).
        from spark_backup.engine.processes import ALLOCATOR_ENVIRONMENT, tool_environment

        identity_read, identity_write = os.pipe()
        control, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # -P: spark-backup as installed (or on PYTHONPATH), never a package of the same name
            # in the directory the command was started from, in the process given the keys.
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-P",
                    "-m",
                    "spark_backup.engine.age_worker",
                    str(identity_read),
                    str(worker_end.fileno()),
                ],
                stdin=subprocess.DEVNULL,
                pass_fds=(identity_read, worker_end.fileno()),
                env={**tool_environment(), **ALLOCATOR_ENVIRONMENT},
            )
        except BaseException:
            os.close(identity_write)
            control.close()
            raise
        finally:
            os.close(identity_read)
            worker_end.close()
        self._control = control
        self._identity_pipe = identity_write
        if self.identities is not None:
            self._send_identities()

    def start(self) -> AgeWorker:
        """Start the process now, if it is not running (its identities may follow)."""
        with self._lock:
            if self._process is None:
                self._start()
        return self

    def provide(self, identities: list[x25519.Identity]) -> None:
        """Give a worker made without identities the ones to decrypt with (sent at once, if it
        is running)."""
        if self.identities is not None:
            raise RuntimeError("this age worker has its identities already")
        self.identities = identities
        if self._identity_pipe is not None:
            self._send_identities()

    def _send_identities(self) -> None:
        assert self.identities is not None and self._identity_pipe is not None
        pipe, self._identity_pipe = self._identity_pipe, None
        # A worker that died meanwhile is replaced by the next decryption (``decrypting``).
        with suppress(BrokenPipeError), os.fdopen(pipe, "w", encoding="utf-8") as keys:
            keys.write("".join(f"{identity}\n" for identity in self.identities))

    def close(self) -> None:
        """Let the worker exit (closing the socket tells it to); kill it if it does not. One
        that never had its identities is killed: it has read nothing, and would only finish
        its imports first."""
        if self._identity_pipe is not None:
            self._kill()
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._process is not None:
            try:
                self._process.wait(_EXIT_SECONDS)
            except subprocess.TimeoutExpired:
                self._kill()  # stuck: nothing it could still do matters
            except BaseException:
                self._kill()
                raise
            self._process = None

    def _kill(self) -> None:
        if self._identity_pipe is not None:
            os.close(self._identity_pipe)
            self._identity_pipe = None
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def answer(self) -> dict[str, Any]:
        """The worker's status for the decryption under way; ``{}`` (and the worker gone, so
        that the next decryption starts another) if it died without one."""
        assert self._control is not None
        try:
            answer = self._control.recv(_MAX_STATUS)
        except OSError:
            answer = b""
        if not answer:
            self._kill()
            return {}
        import json  # not at the top: the worker needs it only once it has decrypted

        return json.loads(answer)

    @contextmanager
    def decrypting(self, stored: Readable, zstd: bool = False) -> Iterator[Decryption]:
        """Decrypt ``stored`` (handed over as it is where it is a regular file, else fed by a
        thread), and with ``zstd`` inflate it too: ``plaintext`` then gives the inflated bytes. Leaving the block without ``finish`` stops the worker: it may be midway."""
        if self.identities is None:
            raise RuntimeError("an age worker made without identities needs them (provide)")
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._kill()
                self._start()
            assert self._control is not None
            file_fd = _real_fileno(stored)
            plain_read, plain_write = os.pipe()
            widen_pipe(plain_write)
            feed_read, feed_write = os.pipe() if file_fd is None else (-1, -1)
            try:
                socket.send_fds(
                    self._control,
                    [_REQUEST_ZSTD if zstd else _REQUEST],
                    [file_fd if file_fd is not None else feed_read, plain_write],
                )
            except BaseException:
                os.close(plain_read)
                if feed_write != -1:
                    os.close(feed_write)
                self._kill()
                raise
            finally:
                os.close(plain_write)
                if feed_read != -1:
                    os.close(feed_read)
            decryption = Decryption(self, open(plain_read, "rb"))  # noqa: SIM115
            if feed_write != -1:
                decryption.feed_from(stored, feed_write)
            try:
                yield decryption
            finally:
                if decryption.status is None:
                    decryption.plaintext.close()
                    self._kill()
                    decryption.join_feeder()


def _feed(stored: Readable, fd: int, errors: list[BaseException]) -> None:
    pipe = open(fd, "wb", buffering=CHUNK_SIZE)  # noqa: SIM115
    try:
        copy_stream(stored, pipe)
        pipe.flush()
    except BrokenPipeError:
        pass  # the worker stopped first; its status says why
    except BaseException as exc:
        errors.append(exc)
    finally:
        with suppress(OSError):
            pipe.close()


def _real_fileno(stream: Readable) -> int | None:
    """The descriptor of a regular file behind ``stream``, at its current position, if any."""
    try:
        fd = stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return None
    return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None


if __name__ == "__main__":
    # Every descriptor is closed and every answer sent by now; the caller waits for this exit
    # (a restore publishes only after it), so the interpreter's teardown is skipped.
    os._exit(main(sys.argv[1:]))
