"""DNS rebinding: the bench display answers only requests whose Host names the address it listens on.

A real DisplayServer on loopback, real HTTP requests with chosen Host headers (as a browser sends after
an attacker's name has been re-pointed at this machine)."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port

from edge.display.server import DisplayServer


def request(port: int, method: str, path: str, host: str | None, body: bytes | None = None) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest(method, path, skip_host=True)
        if host is not None:
            connection.putheader("Host", host)
        if body is not None:
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def serve(tmp_path: Path, host: str) -> Iterator[DisplayServer]:
    server = DisplayServer(f"tcp://127.0.0.1:{free_port()}", (host, free_port()), tmp_path / "sessions")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def loopback(tmp_path: Path) -> Iterator[DisplayServer]:
    yield from serve(tmp_path, "127.0.0.1")


@pytest.mark.parametrize("path", ["/", "/api/state", "/export.csv", "/events", "/preview.jpg"])
def test_a_foreign_host_gets_403_on_every_get(loopback: DisplayServer, path: str) -> None:
    port = loopback.port
    assert request(port, "GET", path, f"rebind.evil.example:{port}") == 403
    assert request(port, "GET", path, None) == 403  # no Host at all


def test_posts_from_a_foreign_host_are_refused_even_without_origin(loopback: DisplayServer) -> None:
    port = loopback.port
    before = loopback.state.slide.slide_id
    assert request(port, "POST", "/api/new-slide", f"rebind.evil.example:{port}", b"{}") == 403
    assert loopback.state.slide.slide_id == before
    assert request(port, "POST", "/api/new-slide", f"127.0.0.1:{port}", b"{}") == 200


def test_the_listen_address_and_localhost_are_served(loopback: DisplayServer) -> None:
    port = loopback.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
        assert request(port, "GET", "/api/state", host) == 200, host
    assert request(port, "GET", "/api/state", f"127.0.0.1:{port + 1}") == 403  # another port is another origin
    assert request(port, "GET", "/api/state", "127.0.0.1") == 403  # no port = 80, not this server


def test_a_wildcard_listen_serves_ip_literals_and_this_hosts_name_only(tmp_path: Path) -> None:
    for server in serve(tmp_path, "0.0.0.0"):
        port = server.port
        assert request(port, "GET", "/api/state", f"192.0.2.7:{port}") == 200  # the tablet uses the bench PC's IP
        assert request(port, "GET", "/api/state", f"{socket.gethostname()}:{port}") == 200
        assert request(port, "GET", "/api/state", f"rebind.evil.example:{port}") == 403
        assert request(port, "GET", "/api/state", f"localhost:{port}") == 200
