"""Running one program on every rank of an ``mx.distributed`` group (``mlx.launch``).

Every rank runs the same code on the same inputs (the model's collectives keep their
logits identical, :mod:`qnext_mlx.model.parallel`); what only rank 0 knows (a prompt read
from stdin, a random seed, a timed decision, the requests a server receives) reaches the
others through :func:`broadcast_object`. Rank 0 prints or serves; the others follow.

MLX's ring backend waits forever for a rank that died or a link that dropped, so
:class:`Watchdog` keeps a heartbeat between rank 0 and every other rank on a side TCP
connection: a rank that exits without saying goodbye, or sends nothing for
``QNEXT_HEARTBEAT_TIMEOUT`` seconds (default 20), ends every other rank with one
``error:`` line and exit status 1.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import struct
import sys
import threading
import time
from typing import Any, List, Optional

import mlx.core as mx
import numpy as np

__all__ = [
    "HEARTBEAT_INTERVAL",
    "Watchdog",
    "broadcast_object",
    "heartbeat_timeout",
    "is_leader",
    "rank_of",
]

HEARTBEAT_INTERVAL = 1.0  # seconds between heartbeats
_BYE = b"x"
_BEAT = b"."


def heartbeat_timeout() -> float:
    """Seconds of silence after which a rank counts as gone (``QNEXT_HEARTBEAT_TIMEOUT``, default 20)."""
    try:
        return max(2.0, float(os.environ.get("QNEXT_HEARTBEAT_TIMEOUT", "20")))
    except ValueError:
        return 20.0


def rank_of(group) -> int:
    """This process's rank in ``group`` (0 without one)."""
    return 0 if group is None else group.rank()


def is_leader(group) -> bool:
    """True on rank 0 (and without a group): the rank that prints or serves."""
    return rank_of(group) == 0


def broadcast_object(obj: Any, group) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; two ``all_sum`` s: the size, then the bytes).

    Other ranks pass anything (it is ignored). Without a group, returns ``obj``.
    """
    if group is None or group.size() < 2:
        return obj
    leader = group.rank() == 0
    data = pickle.dumps(obj) if leader else b""
    size = mx.distributed.all_sum(mx.array([len(data)], dtype=mx.int32), group=group)
    n = int(size.item())
    buf = mx.array(np.frombuffer(data, dtype=np.uint8)) if leader else mx.zeros((n,), dtype=mx.uint8)
    out = mx.distributed.all_sum(buf, group=group)
    mx.eval(out)  # on rank 0 too: the collective runs only when evaluated
    return obj if leader else pickle.loads(np.array(out).tobytes())


def _leader_host() -> Optional[str]:
    """Rank 0's address from ``QNEXT_WATCHDOG_HOST`` or the ring hostfile ``mlx.launch`` wrote."""
    host = os.environ.get("QNEXT_WATCHDOG_HOST")
    if host:
        return host
    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            hosts = json.load(f)
        first = hosts[0][0] if isinstance(hosts[0], list) else hosts[0]
        if isinstance(first, dict):  # other backends' hostfiles: {"ssh": ..., "ips": [...]}
            ips = first.get("ips") or []
            return ips[0] if ips else None
        return str(first).rsplit(":", 1)[0]
    except (OSError, ValueError, IndexError, KeyError, TypeError, AttributeError):
        return None


class Watchdog:
    """Heartbeats between rank 0 and the other ranks (see the module docstring).

    Start it right after the group is up (:meth:`start`, a collective: every rank calls
    it); call :meth:`finish` when this rank ends (normally or with an error it reports):
    the others then give it ``timeout`` seconds to end too, not zero.
    """

    def __init__(self, group, timeout: Optional[float] = None):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.timeout = timeout if timeout is not None else heartbeat_timeout()
        self._peers: List[socket.socket] = []
        self._names: List[int] = []
        self._done = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> "Watchdog":
        host = _leader_host()
        if host is None:
            print("warning: no rank-0 address for the heartbeat (set QNEXT_WATCHDOG_HOST); "
                  "a rank that fails may leave the others waiting", file=sys.stderr)  # fmt: skip
            return self
        listener = None
        port = 0
        if self.rank == 0:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, 0))
            listener.listen(self.size)
            port = listener.getsockname()[1]
        port = broadcast_object(port, self.group)  # the other ranks learn rank 0's port
        if self.rank == 0:
            listener.settimeout(60)
            try:
                for _ in range(self.size - 1):
                    conn, _ = listener.accept()
                    conn.settimeout(self.timeout)
                    (peer,) = struct.unpack("<i", _recv_exact(conn, 4))
                    self._peers.append(conn)
                    self._names.append(peer)
            except (OSError, socket.timeout) as e:
                self._fail(f"not every rank connected to rank 0's heartbeat ({e})")
            finally:
                listener.close()
        else:
            deadline = time.monotonic() + 60
            while True:
                try:
                    conn = socket.create_connection((host, port), timeout=5)
                    break
                except OSError as e:
                    if time.monotonic() > deadline:
                        self._fail(f"cannot reach rank 0's heartbeat at {host}:{port} ({e})")
                    time.sleep(0.2)
            conn.settimeout(self.timeout)
            conn.sendall(struct.pack("<i", self.rank))
            self._peers.append(conn)
            self._names.append(0)
        threading.Thread(target=self._beat, name="qnext-heartbeat", daemon=True).start()
        for conn, name in zip(self._peers, self._names):
            threading.Thread(target=self._watch, args=(conn, name), name=f"qnext-watch-{name}", daemon=True).start()
        return self

    def finish(self) -> None:
        """This rank ends: tell the others, stop watching."""
        if self._done.is_set():
            return
        self._done.set()
        with self._lock:
            for conn in self._peers:
                try:
                    conn.sendall(_BYE)
                except OSError:
                    pass

    # ................................................................ threads
    def _beat(self) -> None:
        while not self._done.wait(HEARTBEAT_INTERVAL):
            with self._lock:
                for conn, name in zip(self._peers, self._names):
                    try:
                        conn.sendall(_BEAT)
                    except OSError:
                        self._gone(name, "its connection dropped")

    def _watch(self, conn: socket.socket, name: int) -> None:
        while not self._done.is_set():
            try:
                data = conn.recv(64)
            except socket.timeout:
                self._gone(name, f"it sent nothing for {self.timeout:.0f} s (stopped, or a link dropped)")
                return
            except OSError:
                data = b""
            if not data:
                self._gone(name, "it exited")
                return
            if _BYE in data:
                # It ended (done, or an error it reported itself). In step with it this rank
                # ends at the same time; if it does not, it would wait forever: fail.
                if not self._done.wait(self.timeout):
                    self._gone(name, "it ended while this rank still runs")
                return

    def _gone(self, name: int, why: str) -> None:
        if self._done.is_set():
            return
        self._fail(f"rank {name} stopped: {why}; ending rank {self.rank} too")

    def _fail(self, message: str) -> None:
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        os._exit(1)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = conn.recv(n - len(data))
        if not part:
            raise OSError("connection closed")
        data += part
    return data
