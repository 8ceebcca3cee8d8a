"""The chaos suite's fault proxy does what each mode says (an echo server behind it; no services)."""

from __future__ import annotations

import socket
import socketserver
import threading
import time

import pytest

from faultproxy import FaultProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture()
def proxy():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proxy = FaultProxy("127.0.0.1", server.server_address[1], name="echo").start()
    yield proxy
    proxy.stop()
    server.shutdown()
    server.server_close()


def _connect(proxy: FaultProxy, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection((proxy.host, proxy.port), timeout=timeout)


def _echo(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_pass_forwards_both_ways(proxy):
    with _connect(proxy) as sock:
        assert _echo(sock, b"hello") == b"hello"
    assert proxy.stats()["bytes_up"] >= 5


def test_stall_holds_bytes_and_releases_them_when_healed(proxy):
    old = _connect(proxy)
    assert _echo(old, b"before") == b"before"
    proxy.set_mode("stall")
    old.sendall(b"held")
    old.settimeout(0.5)
    with pytest.raises(socket.timeout):
        old.recv(10)
    new = _connect(proxy, timeout=0.5)  # accepted, but nothing reaches the server
    new.sendall(b"new")
    with pytest.raises(socket.timeout):
        new.recv(10)
    proxy.set_mode("pass")
    old.settimeout(5)
    new.settimeout(5)
    assert old.recv(10) == b"held"
    assert new.recv(10) == b"new"
    old.close()
    new.close()


def test_cut_resets_open_connections_and_refuses_new_ones(proxy):
    old = _connect(proxy)
    assert _echo(old, b"x") == b"x"
    proxy.set_mode("cut")
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        old.sendall(b"after")
        time.sleep(0.1)
        old.sendall(b"after")
        if old.recv(10) == b"":
            raise ConnectionResetError("closed")
    with pytest.raises(ConnectionRefusedError):
        _connect(proxy)
    proxy.set_mode("pass")
    with _connect(proxy) as sock:
        assert _echo(sock, b"back") == b"back"
    assert proxy.stats()["reset_by_cut"] == 1


def test_refuse_keeps_open_connections(proxy):
    old = _connect(proxy)
    assert _echo(old, b"first") == b"first"  # accepted by the proxy, not still in the listen backlog
    proxy.set_mode("refuse")
    with pytest.raises(ConnectionRefusedError):
        _connect(proxy)
    assert _echo(old, b"still") == b"still"
    old.close()
    proxy.set_mode("pass")
    with _connect(proxy) as sock:
        assert _echo(sock, b"ok") == b"ok"


def test_strand_silences_open_connections_for_good_and_lets_new_ones_through(proxy):
    old = _connect(proxy)
    assert _echo(old, b"before") == b"before"
    proxy.set_mode("strand")
    old.sendall(b"lost")
    old.settimeout(0.5)
    with pytest.raises(socket.timeout):
        old.recv(10)
    with _connect(proxy) as new:
        assert _echo(new, b"new") == b"new"
    proxy.set_mode("pass")  # healing the network does not bring a stranded connection back
    with pytest.raises(socket.timeout):
        old.recv(10)
    assert proxy.stats()["stranded_open"] == 1
    assert proxy.release_stranded() == 1
    old.settimeout(2)
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        if old.recv(10) == b"":
            raise ConnectionResetError("closed")
    old.close()
