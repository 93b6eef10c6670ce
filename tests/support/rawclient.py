"""Raw sockets for hostile clients: hand-written HTTP heads and WebSocket frames.

A client library would never send what these tests and benchmarks need to send (endless
headers, one-byte continuation frames, ping floods, a socket that never reads).
"""

from __future__ import annotations

import base64
import os
import socket
import struct

TEXT, CONT, PING = 0x1, 0x0, 0x9


def connect(url: str, timeout: float = 10.0) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def read_all(sock: socket.socket) -> bytes:
    """Everything until the peer closes (a reset ends it too)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def ws_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame (the zero mask leaves the payload as it is)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    size = len(payload)
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", size)
    return head + b"\0\0\0\0" + payload


def ws_open(url: str, protocols: bytes = b"tokenrelay.v1") -> socket.socket:
    """A socket past the WebSocket handshake on /api/ws."""
    sock = connect(url)
    key = base64.b64encode(os.urandom(16))
    sock.sendall(
        b"GET /api/ws HTTP/1.1\r\nhost: %s\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        b"sec-websocket-key: %s\r\nsec-websocket-version: 13\r\n"
        b"sec-websocket-protocol: %s\r\n\r\n"
        % (url.removeprefix("http://").encode(), key, protocols)
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def close_code(sock: socket.socket) -> int | None:
    """Read frames until the server's close frame; its code (None if the socket just ended)."""
    data = read_all(sock)
    while len(data) >= 2:
        opcode, size = data[0] & 0x0F, data[1] & 0x7F
        start = 2
        if size == 126:
            size, start = struct.unpack("!H", data[2:4])[0], 4
        elif size == 127:
            size, start = struct.unpack("!Q", data[2:10])[0], 10
        if opcode == 0x8:
            return int(struct.unpack("!H", data[start : start + 2])[0])
        data = data[start + size :]
    return None


def endless_headers(url: str, limit: int, block: bytes) -> tuple[socket.socket, int]:
    """Send header lines that never end, up to `limit` bytes or until the server stops
    reading; the socket, still open (the caller closes it), and the bytes sent."""
    sock = connect(url, timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    sent = 0
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        while sent < limit:
            sock.sendall(block)
            sent += len(block)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    return sock, sent
