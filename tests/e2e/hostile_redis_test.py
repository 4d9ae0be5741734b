#!/usr/bin/env python3
"""End-to-end: a server never trusts what it reads from Redis (stdlib only).

A warm run of `cachette serve --redis` writes its chunks to Redis. The test then finds every key
that run wrote (SCAN over the key space, keys that were not there before) and overwrites each with
a hostile value: heads claiming billions of parts or a terabyte, random bytes, truncated heads,
wrong checksums, a valid-looking head whose parts have the wrong lengths. A restarted server (no
disk tier, so only Redis could serve) must answer exactly as the cold run did, take no chunk from
Redis, and stay healthy.

Redis: a redis-server of its own by default, so the keys it poisons are surely its own; with
--redis-url (e.g. scripts/redis.sh's redis://127.0.0.1:6390) a shared standalone server, where
the prompt's fresh nonce makes the run's chunks (content addressed) its alone and only keys new
since the run began are touched (a client writing there at the same moment could lose some).

Usage: hostile_redis_test.py --binary build/.../cachette --model models/cachette-tiny-q8_0.gguf
       [--redis-url redis://127.0.0.1:6390]
"""
import argparse
import os
import random
import shutil
import socket
import struct
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_test import FAILURES, Server, check  # noqa: E402
from e2e_util import Redis, graceful_stop  # noqa: E402
from tiers_test import LONG, by_tier, complete  # noqa: E402

PREFIX = b"ct:"  # RedisTierOptions::key_prefix default (docs/formats/redis-record.md)


class Resp:
    """A minimal RESP2 client: enough for SCAN, GET, SET, EXISTS on one standalone server."""

    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=10)
        self.buf = b""

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind in (b"+", b"-"):
            if kind == b"-":
                raise RuntimeError("redis error: %r" % rest)
            return rest
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise RuntimeError("unexpected RESP reply %r" % line)

    def call(self, *args):
        parts = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(parts))
        return self._reply()

    def keys(self, pattern):
        cursor, found = b"0", set()
        while True:
            cursor, batch = self.call("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            found.update(batch)
            if cursor == b"0":
                return found


def head(n_parts, part_bytes, total, checksum, version=2, flags=0, magic=b"CTRH"):
    return magic + struct.pack("<HHIIQQ", version, flags, n_parts, part_bytes, total, checksum)


def flip(value, at):
    b = bytearray(value)
    b[at % len(b)] ^= 0x5A
    return bytes(b)


def is_head(key):
    return key.endswith(b"}")  # parts are "<head>:<n>"


def poison(r, head_key, original, kind, rng):
    """Overwrites one head (and, for kind 4, parts beside it) with hostile value `kind`;
    `original` is the head's value as the server wrote it."""
    if kind == 0:
        r.call("SET", head_key, head(0xFFFFFFFF, 1, 0xFFFFFFFF, 0))  # billions of parts
    elif kind == 1:
        r.call("SET", head_key, bytes(rng.getrandbits(8) for _ in range(200)))  # random bytes
    elif kind == 2:
        r.call("SET", head_key, original[:20])  # truncated head
    elif kind == 3:
        r.call("SET", head_key, flip(original, 24))  # wrong checksum field
    elif kind == 4:
        # A well-formed split head; its parts are there but of the wrong lengths.
        r.call("SET", head_key, head(2, 1 << 20, (1 << 20) + 5, 12345))
        r.call("SET", head_key + b":0", os.urandom(100))
        r.call("SET", head_key + b":1", os.urandom(7))
    elif kind == 5:
        r.call("SET", head_key, head(0, 0, 1 << 40, 0) + original[32:])  # a terabyte inline
    elif kind == 6:
        r.call("SET", head_key, flip(original, len(original) - 1))  # record bytes changed
    else:
        r.call("SET", head_key, head(3, 0, 3000, 0))  # part_bytes 0
    return kind


KINDS = 8


def test_hostile_values_are_misses(binary, model, tmp, url):
    own = None
    if not url:
        if shutil.which("redis-server") is None:
            check(False, "redis-server is not installed (scripts/setup.sh installs it)")
            return
        own = Redis(tmp)
        url = own.url()
    hostport = url.split("://", 1)[1].rstrip("/")
    host, port = hostport.rsplit(":", 1)
    r = Resp(host, int(port))
    nonce = "%016x" % random.SystemRandom().getrandbits(64)
    prompt = "Run %s. " % nonce + LONG
    servers = []
    before = set()
    try:
        before = r.keys(PREFIX + b"*")
        a = Server(binary, model, "--redis", url, "--chunk-tokens", "64")
        servers.append(a)
        cold_text, _ = complete(a, prompt)
        graceful_stop(a)  # flushes write-behind to Redis
        servers.remove(a)

        # A control: an untouched restart is served from Redis, so Redis really is in play.
        b = Server(binary, model, "--redis", url, "--chunk-tokens", "64")
        servers.append(b)
        text_b, u_b = complete(b, prompt)
        check(by_tier(u_b).get("redis", 0) >= 64, "control restart hits Redis: %s" % u_b)
        check(text_b == cold_text, "control restart answers like the cold run")
        b.stop()
        servers.remove(b)
        written = sorted(r.keys(PREFIX + b"*") - before)
        heads = [k for k in written if is_head(k)]
        check(len(heads) >= 2, "the warm run wrote chunk heads to Redis: %d keys" % len(written))
        namespaces = set(k[len(PREFIX):len(PREFIX) + 32] for k in heads)
        check(len(namespaces) == 1, "one namespace's key space: %s" % namespaces)

        # The load stops at the first missing chunk and the recomputed chunks are written back
        # (write-through), so one server start reads one hostile value: a round per kind, every
        # head of the run poisoned with that kind, so whichever chunk is first meets it.
        rng = random.Random(nonce)
        originals = {k: r.call("GET", k) or b"" for k in heads}
        for kind in range(KINDS):
            for k in heads:
                poison(r, k, originals[k], kind, rng)
            for k in written:
                if not is_head(k):
                    r.call("SET", k, os.urandom(33))  # every part of the run: junk, wrong length
            c = Server(binary, model, "--redis", url, "--chunk-tokens", "64")
            servers.append(c)
            text, u = complete(c, prompt)
            check(text == cold_text, "kind %d: answers like the cold run: %r vs %r"
                  % (kind, text, cold_text))
            check(by_tier(u).get("redis", 0) == 0, "kind %d: no chunk from Redis: %s" % (kind, u))
            check(c.healthy() and c.proc.poll() is None, "kind %d: server healthy" % kind)
            status, metrics = c.get("/metrics")
            counted = sum(float(l.split()[-1]) for l in metrics.splitlines()
                          if not l.startswith("#") and 'tier="redis"' in l and
                          ("corruptions_total" in l or "errors_total" in l))
            check(status == 200 and counted > 0,
                  "kind %d: the hostile value was read and counted (%s)" % (kind, counted))
            c.stop()
            servers.remove(c)
    finally:
        for s in servers:
            s.stop()
        try:
            for k in r.keys(PREFIX + b"*") - before:
                r.call("DEL", k)
        except Exception:  # cleanup only
            pass
        if own is not None:
            own.kill()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--redis-url", default="", help="a shared standalone Redis (default: own)")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="cachette-hostile-redis-")
    failed = False
    try:
        print("== test_hostile_values_are_misses", flush=True)
        try:
            test_hostile_values_are_misses(args.binary, args.model, tmp, args.redis_url)
        except Exception as e:  # a crash of the test itself is a failure, not a skip
            check(False, "test raised %r" % (e,))
        failed = bool(FAILURES)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("%d passed, %d failed" % (0 if failed else 1, 1 if failed else 0))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
