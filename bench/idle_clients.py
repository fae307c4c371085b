#!/usr/bin/env python3
"""Opens N idle PostgreSQL connections to a wire port and holds them.

Each connection sends a startup packet (protocol 3.0, the user and database
given, no password) and waits for its first ReadyForQuery; then it stays
idle. Once all are up the script prints "ready N" and waits for a line on
stdin (or EOF) before closing them all.

Usage: idle_clients.py HOST PORT USER DATABASE COUNT
PGPASSWORD, when set, is proved with SCRAM-SHA-256 when the server asks.
"""

import asyncio
import base64
import hashlib
import hmac
import os
import resource
import struct
import sys

# The salted password, per (salt, iterations): derived once, not per client.
SALTED = {}


def startup_packet(user: str, database: str) -> bytes:
    body = struct.pack("!I", 196608)
    for key, value in (("user", user), ("database", database)):
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def message(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("!I", len(body) + 4) + body


class Scram:
    """The client side of SCRAM-SHA-256 (RFC 5802, 7677), without channel binding."""

    def __init__(self, password: str):
        self.password = password.encode()
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        self.first_bare = f"n=,r={self.nonce}"

    def first(self) -> bytes:
        data = ("n,," + self.first_bare).encode()
        return message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!I", len(data)) + data)

    def final(self, server_first: str) -> bytes:
        fields = dict(item.split("=", 1) for item in server_first.split(","))
        salt, iterations = base64.b64decode(fields["s"]), int(fields["i"])
        key = (fields["s"], iterations)
        if key not in SALTED:
            SALTED[key] = hashlib.pbkdf2_hmac("sha256", self.password, salt, iterations)
        client_key = hmac.new(SALTED[key], b"Client Key", "sha256").digest()
        stored = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={fields['r']}"
        auth = f"{self.first_bare},{server_first},{without_proof}".encode()
        signature = hmac.new(stored, auth, "sha256").digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        final = f"{without_proof},p={base64.b64encode(proof).decode()}"
        return message(b"p", final.encode())


async def connect(host, port, packet):
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(packet)
    await writer.drain()
    scram = None
    while True:
        header = await reader.readexactly(5)
        tag, length = header[0:1], struct.unpack("!I", header[1:5])[0]
        body = await reader.readexactly(length - 4)
        if tag == b"E":
            raise RuntimeError(body.decode(errors="replace"))
        if tag == b"R":
            code = struct.unpack("!I", body[:4])[0]
            if code == 10:
                scram = Scram(os.environ.get("PGPASSWORD", ""))
                writer.write(scram.first())
            elif code == 11:
                writer.write(scram.final(body[4:].decode()))
        if tag == b"Z":
            return writer


async def main():
    host, port, user, database, count = sys.argv[1:6]
    count = int(count)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 1024), hard))
    packet = startup_packet(user, database)
    writers = []
    # In batches, so the listener's backlog is never the limit.
    for start in range(0, count, 200):
        batch = [connect(host, int(port), packet) for _ in range(min(200, count - start))]
        writers.extend(await asyncio.gather(*batch))
    print(f"ready {len(writers)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for writer in writers:
        writer.close()


asyncio.run(main())
