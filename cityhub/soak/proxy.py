"""A TCP proxy in front of the central broker that the soak can cut, one per gateway.

While cut, the proxy moves no bytes either way and connects no new client
upstream: bytes already read are held and delivered when the link is
restored, as TCP would after a partition heals, so the MQTT stream is never
corrupted. Whether a client or the broker gives up on the connection in the
meantime (keepalive) is theirs to decide, as on a real network.

Why a proxy and not a network namespace: the embedded broker listens on
127.0.0.1 only and serves both the site link and the central link of each
gateway; a namespace would cut both links (or need the broker to listen on a
veth address), needs root and leaks interfaces if the runner dies. The
proxy cuts exactly one gateway's central link, runs anywhere, and dies with
the runner.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading

from cityhub.localstack.procs import LOOPBACK

logger = logging.getLogger(__name__)

CHUNK_BYTES = 65536


class LinkCutter:
    """Listens on ``port`` (0: a free one) and forwards to ``upstream_port`` on loopback."""

    def __init__(self, *, name: str, upstream_port: int, port: int = 0) -> None:
        self.name = name
        self.upstream_port = upstream_port
        self._open = threading.Event()
        self._open.set()
        self._closed = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server((LOOPBACK, port))
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name=f"cutter[{name}]", daemon=True)
        self._thread.start()

    @property
    def is_cut(self) -> bool:
        return not self._open.is_set()

    def cut(self) -> None:
        self._open.clear()

    def restore(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closed.set()
        self._open.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _addr = self._listener.accept()
            except OSError:
                return
            self._track(client)
            threading.Thread(
                target=self._connect, args=(client,), name=f"cutter[{self.name}]", daemon=True
            ).start()

    def _connect(self, client: socket.socket) -> None:
        self._open.wait()  # no SYN gets through while cut
        try:
            upstream = socket.create_connection((LOOPBACK, self.upstream_port), timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        self._track(upstream)
        threading.Thread(
            target=self._pump, args=(upstream, client), name=f"cutter[{self.name}]", daemon=True
        ).start()
        self._pump(client, upstream)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(CHUNK_BYTES)
                self._open.wait()  # held, not dropped, while cut
                if not data or self._closed.is_set():
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
                with self._lock:
                    self._sockets.discard(sock)
