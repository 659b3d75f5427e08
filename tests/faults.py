"""A TCP proxy in front of the test S3 server that can take the endpoint down, make it hang, or make it fail.

Why not stop moto itself: `ThreadedMotoServer.stop()` closes the listening socket but keeps serving the
keep-alive connections clients already hold (werkzeug joins its handler threads), so a client with a pooled
connection never notices the outage, and `stop()` itself blocks until those clients go away. The proxy gives a
faithful outage instead: `down()` closes its listening socket and resets every open connection (clients get
connection refused / reset), `up()` listens again on the same port, and the data is still there, because moto's
backend (in this process) never stopped, like an S3 front end that fails while the storage behind it does not.
"""

from __future__ import annotations

import socket
import threading

ERROR_BODY = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>\n"
ERROR_RESPONSE = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: "
                  + str(len(ERROR_BODY)).encode() + b"\r\nConnection: close\r\n\r\n" + ERROR_BODY)


class FaultProxy:
    """Forwards 127.0.0.1:port to `upstream` (host, port). Modes: "up" (forward), "hang" (accept, never answer),
    "error" (answer every request with HTTP 503 SlowDown); `down()` / `up()` stop and restart listening."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.mode = "up"
        self.lock = threading.Lock()
        self.connections: list[socket.socket] = []
        self.listener = None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self, mode: str = "up") -> None:
        self.mode = mode
        if self.listener is None:
            self.listener = socket.socket()
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(("127.0.0.1", self.port))
            self.listener.listen(64)
            threading.Thread(target=self.accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        """Connection refused for new connections; open ones are reset."""
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept(); close() alone would not
            listener.close()
        self.drop_connections()

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        self.drop_connections()  # pooled connections must meet the new mode too

    def drop_connections(self) -> None:
        with self.lock:
            for conn in self.connections:
                try:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self.connections.clear()

    def accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            with self.lock:
                self.connections.append(client)
            threading.Thread(target=self.serve, args=(client,), daemon=True).start()

    def serve(self, client: socket.socket) -> None:
        mode = self.mode
        if mode == "hang":
            return  # keep the connection open, never answer
        if mode == "error":
            try:
                client.recv(65536)
                client.sendall(ERROR_RESPONSE)
            except OSError:
                pass
            client.close()
            return
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        with self.lock:
            self.connections.append(upstream)
        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
        pump(client, upstream)


def pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    for s in (source, sink):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
