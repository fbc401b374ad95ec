"""A loopback TCP proxy that can cut a transfer half way, like a Wi-Fi link that drops.

`CuttingProxy(upstream_port)` forwards every connection to the hub. Arm it with `cut_upload`
or `cut_download` and the next request of that kind has its connection closed after `limit`
bytes have passed (request body bytes for uploads, response bytes for downloads).
"""

from __future__ import annotations

import contextlib
import socket
import threading


class CuttingProxy:
    def __init__(self, upstream_port: int, limit: int = 200_000) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.limit = limit
        self.cut_upload = 0
        self.cut_download = 0
        self.cuts: list[str] = []
        self._lock = threading.Lock()
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(16)
        self.port = self._server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._server.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=30)
        except OSError:
            client.close()
            return
        state = {"mode": None, "sent": 0}
        done = threading.Event()

        def close_both() -> None:
            done.set()
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

        def up() -> None:  # client -> hub
            while not done.is_set():
                try:
                    data = client.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                with self._lock:
                    if data.startswith(b"PUT ") and self.cut_upload:
                        self.cut_upload -= 1
                        state["mode"], state["sent"] = "upload", 0
                    elif data.startswith(b"GET /api/v1/models/") and self.cut_download:
                        self.cut_download -= 1
                        state["mode"], state["sent"] = "download", 0
                if state["mode"] == "upload":
                    state["sent"] += len(data)
                    if state["sent"] > self.limit:
                        self.cuts.append("upload")
                        close_both()
                        return
                try:
                    upstream.sendall(data)
                except OSError:
                    break
            close_both()

        def down() -> None:  # hub -> client
            while not done.is_set():
                try:
                    data = upstream.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                if state["mode"] == "download":
                    state["sent"] += len(data)
                    if state["sent"] > self.limit:
                        client.sendall(data[: max(0, len(data) - (state["sent"] - self.limit))])
                        self.cuts.append("download")
                        close_both()
                        return
                try:
                    client.sendall(data)
                except OSError:
                    break
            close_both()

        threading.Thread(target=up, daemon=True).start()
        threading.Thread(target=down, daemon=True).start()
