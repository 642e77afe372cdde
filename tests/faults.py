"""Real faults for the tests: a Postgres database made unreachable, and a TCP proxy in front
of Redis that loses the reply to a chosen command."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

import psycopg

from tests.conftest import DATABASE_URL


def _admin() -> psycopg.Connection:
    return psycopg.connect(
        psycopg.conninfo.make_conninfo(DATABASE_URL, dbname="postgres"), autocommit=True
    )


def database_name(url: str) -> str:
    return psycopg.conninfo.conninfo_to_dict(url)["dbname"]


def cut_database(url: str) -> None:
    """End every session of the database (locks included) and refuse new ones."""
    name = database_name(url)
    with _admin() as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )


def restore_database(url: str) -> None:
    with _admin() as admin:
        admin.execute(f'ALTER DATABASE "{database_name(url)}" ALLOW_CONNECTIONS true')


@contextlib.contextmanager
def database_down(url: str) -> Iterator[None]:
    cut_database(url)
    try:
        yield
    finally:
        restore_database(url)


def blip_database(url: str, seconds: float) -> None:
    """What a restart of Postgres does to one database: sessions end, nobody gets in for a
    moment, then connections work again."""
    with database_down(url):
        time.sleep(seconds)


class ReplyDroppingProxy:
    """A TCP proxy to Redis that, once, forwards a request matching ``drop_after`` and then
    closes the client's connection instead of relaying the reply: the command ran, the client
    never learns it did (a reply lost on the network)."""

    def __init__(self, host: str, port: int, *, drop_after: Callable[[bytes], bool]) -> None:
        self.target = (host, port)
        self.drop_after = drop_after
        self.dropped = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._closing.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._pump, args=(client,), daemon=True).start()

    def _pump(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.target) as server:
            while not self._closing.is_set():
                ready, _, _ = select.select([client, server], [], [], 0.2)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is server:
                        client.sendall(data)
                        continue
                    server.sendall(data)
                    if not self.dropped.is_set() and self.drop_after(data):
                        self.dropped.set()
                        self._swallow_reply(server)
                        return  # closes the client's connection: the reply is lost

    @staticmethod
    def _swallow_reply(server: socket.socket) -> None:
        server.settimeout(2.0)
        with contextlib.suppress(TimeoutError):
            server.recv(65536)

    def close(self) -> None:
        self._closing.set()
        self.listener.close()
        self._thread.join(timeout=2)
