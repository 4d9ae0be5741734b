"""What the end-to-end tests (and scripts/bench_route.py) share (stdlib only): the record of
failed checks, free loopback ports, and a `cachette` server process (serve, route) started on a
free port, ready once GET /health answers 200, spoken to over HTTP, and stopped.

Imported by path: a test script's own directory is on sys.path; scripts/ adds tests/e2e.
"""
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

FAILURES = []


def check(cond, what):
    if not cond:
        FAILURES.append(what)
        print("FAIL: " + what, flush=True)
    return cond


def report(t0):
    """Prints the closing line and returns the exit code."""
    print("%d failures in %.1f s" % (len(FAILURES), time.time() - t0))
    return 1 if FAILURES else 0


def free_port(pair=False):
    """A free loopback port; with `pair`, one whose next port is free too (the KV events' PUB
    and replay endpoints)."""
    for _ in range(500):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        if not pair:
            return p
        t = socket.socket()
        try:
            t.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
        finally:
            t.close()
    raise RuntimeError("no free port")


class Process:
    """A command that serves HTTP on the --port it is given (`cachette serve`, `cachette route`):
    `cmd --port P` on a free port P, its output logged in logdir (else $TMPDIR or /tmp) as
    name-P.log. Returns once GET /health answers 200, else raises RuntimeError with the log."""

    def __init__(self, cmd, name, logdir=None, timeout=30):
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        logdir = logdir or os.environ.get("TMPDIR", "/tmp")
        self.log = open(os.path.join(logdir, "%s-%d.log" % (name, self.port)), "w+")
        self.proc = subprocess.Popen(cmd + ["--port", str(self.port)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.request("GET", "/health", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("%s did not become healthy:\n%s" % (" ".join(cmd), self.logs()))

    def logs(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def conn(self, timeout=60):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, raw=None, timeout=60):
        c = self.conn(timeout)
        try:
            data = raw if raw is not None else (json.dumps(body) if body is not None else None)
            c.request(method, path, body=data, headers={"Content-Type": "application/json"})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def post(self, path, body=None, raw=None):
        status, data = self.request("POST", path, body, raw)
        try:
            return status, json.loads(data)
        except ValueError:
            return status, data

    def get(self, path):
        status, data = self.request("GET", path)
        if path == "/metrics":
            return status, data.decode()
        return status, json.loads(data)

    def stream(self, path, body, on_event=None):
        """Returns (status, [parsed data events], saw_done); calls on_event(event) as each
        arrives."""
        c = self.conn()
        try:
            c.request("POST", path, body=json.dumps(body),
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            if r.status != 200:
                return r.status, [json.loads(r.read())], False
            events, done = [], False
            while True:
                line = r.fp.readline()
                if not line:
                    break
                line = line.decode().rstrip("\r\n")
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    done = True
                    break
                events.append(json.loads(payload))
                if on_event is not None:
                    on_event(events[-1])
            return 200, events, done
        finally:
            c.close()

    def healthy(self):
        return self.request("GET", "/health")[0] == 200

    def stop(self):
        """SIGKILL: no drain. The log file goes unless a check failed (logs() still reads it
        through the open handle)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.drop_log()

    def drop_log(self):
        if not FAILURES and os.path.exists(self.log.name):
            os.unlink(self.log.name)

    def close(self):
        """Stops the server; prints the tail of its log if any check failed."""
        self.stop()
        if FAILURES:
            print("---- %s log ----\n%s" % (self.log.name, self.logs()[-6000:]))


class Server(Process):
    """`cachette serve -m model --threads 2 extra...`."""

    def __init__(self, binary, model, *extra):
        super().__init__([binary, "serve", "-m", model, "--threads", "2"] + list(extra),
                         "cachette-serve")


def graceful_stop(s):
    """SIGTERM, as an operator stops it: the server drains and flushes its write-behind."""
    s.proc.send_signal(signal.SIGTERM)
    try:
        s.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        s.stop()
    check(s.proc.returncode == 0, "SIGTERM exit code %s" % s.proc.returncode)
    s.drop_log()


class Redis:
    """A throwaway redis-server on a free loopback port, its files under `tmp`."""

    def __init__(self, tmp):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(dir=tmp)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.time() + 10
        while time.time() < deadline:
            if subprocess.call(["redis-cli", "-p", str(self.port), "ping"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0:
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def url(self):
        return "redis://127.0.0.1:%d" % self.port

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class RedisProxy:
    """A TCP proxy on a free loopback port in front of a real Redis. `on_request(data)` sees each
    read from a client before it is passed on (a subclass stops or delays Redis there)."""

    def __init__(self, redis):
        self.redis = redis
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self):
        return "redis://127.0.0.1:%d" % self.port

    def on_request(self, data):
        pass

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.redis.port))
            threading.Thread(target=self._pipe, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, False), daemon=True).start()

    def _pipe(self, src, dst, to_redis):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if to_redis:
                    self.on_request(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for x in (src, dst):
                try:
                    x.close()
                except OSError:
                    pass

    def close(self):
        self.sock.close()


class SlowRedisProxy(RedisProxy):
    """Holds each read that carries a GET for `delay_s` before Redis sees it: a far Redis, whose
    records arrive one after another while the server goes on."""

    def __init__(self, redis, delay_s):
        super().__init__(redis)
        self.delay_s = delay_s
        self.delayed = 0

    def on_request(self, data):
        if b"$3\r\nGET\r\n" in data:
            self.delayed += 1
            time.sleep(self.delay_s)


def start_redis(tmp):
    """A fresh redis-server for one test, or None (a failed check) where none is installed."""
    if shutil.which("redis-server") is None:
        check(False, "redis-server is not installed (scripts/setup.sh installs it)")
        return None
    return Redis(tmp)
