#!/usr/bin/env python3
"""Side-by-side benchmark: gangway against nginx, HAProxy and Caddy on loopback.

One command, standard library only:

    python3 benches/run.py [--quick] [--scenarios 1,3,5] [--rounds 3] [--duration 10]
                           [--workers 1|2|1,2] [--out benches/results] [--loadgen]
    python3 benches/run.py --soak 600      # memory over a 10-minute steady load, only that

See benches/README.md for what each scenario means and how the figures are computed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import json
import math
import os
import platform
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL_BODY = "hello world\n"  # 12 bytes, the body of scenario 1's anchors
BIG_SIZE = 64 * 1024
MAX_DURATION = 15.0
PROXIES = ["gangway", "nginx", "haproxy", "caddy"]
NOFILE = 65536


# --------------------------------------------------------------------------------------
# Scenarios


@dataclass(frozen=True)
class Scenario:
    id: int
    name: str
    tool: str  # wrk | h2load | idle
    tls: bool
    path: str = "/"
    conns: int = 50
    streams: int = 1
    close: bool = False
    baseline: bool = False  # also measure wrk straight against a backend
    # Offered load in req/s, the same for every proxy (0: as fast as the proxy answers). It
    # sits below every proxy's saturation but Caddy's, so latency is compared at equal load.
    rate: int = 0
    # Who answers behind the proxy: "nginx" (three fast nginx servers) or "app" (three
    # ports of one Python process doing an app's work per request: the bottleneck).
    backend: str = "nginx"
    # h2load speaks HTTP/1.1 (`--h1`), one request at a time per connection.
    h1: bool = False

    @property
    def rps_per_conn(self) -> int:
        """h2load's `--rps`: each connection's share of `rate`."""
        return max(1, round(self.rate / self.conns))

    @property
    def conns_per_ms(self) -> int:
        """h2load's `-r` with `--rate-period 1ms`: how many connections to open each
        millisecond so that they spread evenly over one period of h2load's request timer.

        Each h2load client starts its `--rps` timer when its connection is up, and the
        timer fires every max(10 ms, 1/rps) with the requests due since the last time. With
        every connection opened at once the timers fire together, and the phase of each
        depends on when the proxy finished that connection's handshake: the bursts, and so
        the latency, would then depend on the proxy, not only on the offered load."""
        timer_ms = max(10, math.ceil(1000 / self.rps_per_conn))
        return max(1, math.ceil(self.conns / timer_ms))

    @property
    def short(self) -> str:
        return f"{self.id} {self.name}"


SCENARIOS = {
    1: Scenario(1, "plain HTTP/1.1 keep-alive, 12 B", "wrk", False, baseline=True),
    2: Scenario(2, "plain HTTP/1.1 keep-alive, 64 KiB", "wrk", False, path="/64k.bin",
                baseline=True),
    3: Scenario(3, "HTTPS HTTP/1.1 keep-alive, 12 B", "wrk", True),
    4: Scenario(4, "HTTP/2 over TLS, 50 conns x 10 streams", "h2load", True, streams=10),
    5: Scenario(5, "new TLS handshake per request", "wrk", True, close=True),
    6: Scenario(6, "10 000 idle keep-alive connections (memory)", "idle", False,
                conns=10000),
    # Issue 8's latency target is "p99 <= nginx's at the same offered load": saturating
    # runs (1-5) compare CPU, these two compare latency at a fixed 20k req/s, offered by
    # h2load's timers on connections opened spread over one timer period (conns_per_ms).
    7: Scenario(7, "plain HTTP/1.1 keep-alive at 20k req/s offered", "h2load", False,
                conns=200, rate=20000, h1=True),
    8: Scenario(8, "HTTP/2 over TLS at 20k req/s offered", "h2load", True, streams=10,
                rate=20000),
    # Issue 8's "throughput within 10 % of the direct baseline's where the backend is the
    # bottleneck": the replicas are a Python app, slower than any proxy in front of it.
    9: Scenario(9, "HTTP/1.1 keep-alive to a Python app (app-bound)", "wrk", False,
                baseline=True, backend="app"),
}


# --------------------------------------------------------------------------------------
# Small helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def raise_nofile() -> None:
    """Lift the open-files limit as far as allowed (10 000 idle connections need it): to
    NOFILE where the hard limit may be raised (CAP_SYS_RESOURCE), else soft = hard."""
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
        return
    except (ValueError, OSError):
        pass
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def nofile_limit() -> int:
    raise_nofile()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else NOFILE


def free_ports(n: int) -> list[int]:
    """Ports picked by binding port 0 (all sockets held until every port is chosen)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def wait_port(port: int, proc: subprocess.Popen | None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")
        time.sleep(0.05)


def tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def readline_timeout(pipe, timeout: float) -> bytes:
    """One line from a child's stdout pipe, or b"" after `timeout` seconds."""
    fd = pipe.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            return b""
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return b""
        chunk = os.read(fd, 1)
        if not chunk:
            return buf
        buf += chunk
    return buf


def cmd_output(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"


# --------------------------------------------------------------------------------------
# /proc: CPU time and memory of a process group, busy time of CPUs

CLK_TCK = os.sysconf("SC_CLK_TCK")


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(rest[2]) == pgid:
            pids.append(int(entry))
    return pids


def group_cpu_split(pgid: int) -> tuple[float, float]:
    """(utime, stime) in seconds of every live process of the group (all threads included)."""
    user = system = 0
    for pid in group_pids(pgid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            user += int(rest[11])
            system += int(rest[12])
        except (OSError, IndexError):
            continue
    return user / CLK_TCK, system / CLK_TCK


def group_cpu_seconds(pgid: int) -> float:
    """utime+stime of every live process of the group (all threads included)."""
    return sum(group_cpu_split(pgid))


def group_memory_kib(pgid: int) -> tuple[int, int, int]:
    """(sum of VmRSS, sum of VmHWM, number of processes) over the group."""
    rss = hwm = n = 0
    for pid in group_pids(pgid):
        try:
            with open(f"/proc/{pid}/status") as f:
                text = f.read()
        except OSError:
            continue
        n += 1
        m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
        rss += int(m.group(1)) if m else 0
        m = re.search(r"^VmHWM:\s+(\d+) kB", text, re.M)
        hwm += int(m.group(1)) if m else 0
    return rss, hwm, n


def cpu_times() -> dict[int, tuple[int, int, int]]:
    """Per CPU: (busy ticks, total ticks, irq+softirq ticks) from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            m = re.match(r"cpu(\d+)\s+(.*)", line)
            if not m:
                continue
            vals = [int(v) for v in m.group(2).split()] + [0] * 8
            idle = vals[3] + vals[4]
            total = sum(vals[:8])
            out[int(m.group(1))] = (total - idle, total, vals[5] + vals[6])
    return out


def drop_tmp(args: argparse.Namespace, tmp: Path) -> None:
    """Removes the run's temporary directory, unless --keep-tmp asks to keep it."""
    if args.keep_tmp:
        log(f"configs and logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def busy_before_start(warning: str) -> float:
    """How busy all CPUs are over 1 s; warns "... busy before WARNING" over 10 %."""
    c0 = cpu_times()
    time.sleep(1.0)
    busy = busy_percent(c0, cpu_times(), sorted(c0)) or 0.0
    if busy > 10:
        log(f"warning: the CPUs are {busy:.0f} % busy before {warning}")
    return busy


def busy_percent(before, after, cpus: list[int], column: int = 0) -> float | None:
    """Share of the CPUs' time that was busy (column 0) or in interrupts (column 2)."""
    busy = total = 0
    for c in cpus:
        if c in before and c in after:
            busy += after[c][column] - before[c][column]
            total += after[c][1] - before[c][1]
    return round(100.0 * busy / total, 1) if total else None


# --------------------------------------------------------------------------------------
# Processes: every one started here is in its own process group and is killed at exit


class Procs:
    def __init__(self) -> None:
        self.live: list[subprocess.Popen] = []

    def start(self, argv: list[str], cpus: str, log_path: Path, env: dict | None = None,
              stdout_pipe: bool = False, cwd: Path | None = None) -> subprocess.Popen:
        full = ["taskset", "-c", cpus, *argv]
        logf = open(log_path, "ab")
        try:
            p = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else logf,
                stderr=logf,
                start_new_session=True,
                env=env,
                cwd=cwd,
                preexec_fn=raise_nofile,
            )
        finally:
            logf.close()
        self.live.append(p)
        return p

    def stop(self, p: subprocess.Popen, grace: float = 5.0) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left in the group (workers of a master that exited, etc.).
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if p.stdout:
            p.stdout.close()
        if p in self.live:
            self.live.remove(p)

    def stop_all(self) -> None:
        for p in list(reversed(self.live)):
            self.stop(p, grace=2.0)


def tool_output(argv: list[str], p: subprocess.Popen, out_path: Path) -> str:
    """What a finished load tool printed; an error when it exited with a failure."""
    text = out_path.read_text(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited with status {p.returncode}: {text[-600:]}")
    return text


def run_tool(procs: Procs, argv: list[str], cpus: str, timeout: float, log_path: Path) -> str:
    """Runs a load generator to completion (bounded) and returns its output."""
    out_path = log_path.with_suffix(".out")
    with open(out_path, "wb") as out:
        full = ["taskset", "-c", cpus, *argv]
        p = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True,
                             preexec_fn=raise_nofile)
        procs.live.append(p)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            procs.stop(p)
            raise TimeoutError(f"{argv[0]} did not finish within {timeout:.0f} s")
        finally:
            if p in procs.live:
                procs.live.remove(p)
    text = tool_output(argv, p, out_path)
    return text


# --------------------------------------------------------------------------------------
# Installing what is missing


TOOLS = {  # binary: Debian package
    "nginx": "nginx",
    "haproxy": "haproxy",
    "caddy": "caddy",
    "wrk": "wrk",
    "h2load": "nghttp2-client",
    "openssl": "openssl",
    "taskset": "util-linux",
}


def ensure_tools(install: bool, only: list[str] | None = None) -> dict[str, str | None]:
    """Finds the tools (`only`: just these) and apt-get installs the missing ones."""
    wanted = {b: pkg for b, pkg in TOOLS.items() if only is None or b in only}
    found = {b: shutil.which(b) for b in wanted}
    missing = [b for b, p in found.items() if p is None]
    if missing and install:
        pkgs = sorted({TOOLS[b] for b in missing})
        if os.geteuid() != 0:
            log(f"missing {', '.join(missing)}; not root, so not installing {' '.join(pkgs)}")
        else:
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            log(f"installing from Debian: {' '.join(pkgs)} (apt-get update first)")
            subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.STDOUT, timeout=600)
            r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *pkgs],
                               env=env, capture_output=True, text=True, timeout=1200)
            if r.returncode != 0:
                # One missing package (caddy is not in every archive) must not block the rest.
                for pkg in pkgs:
                    r1 = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends",
                                         pkg], env=env, capture_output=True, text=True,
                                        timeout=1200)
                    if r1.returncode != 0:
                        last = (r1.stderr.strip().splitlines() or ["?"])[-1]
                        log(f"cannot install {pkg}: {last}")
        found = {b: shutil.which(b) for b in wanted}
    for b, p in found.items():
        if p is None:
            log(f"not available: {b} (Debian package {TOOLS[b]})")
    return found


# --------------------------------------------------------------------------------------
# Config generation


NGINX_TEMP = """\
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
"""


def backend_nginx_conf(tmp: Path, ports: list[int], status_port: int, workers: int) -> str:
    servers = []
    for i, port in enumerate(ports, 1):
        servers.append(f"""
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            add_header X-Backend b{i};
            return 200 "{SMALL_BODY.strip()}\\n";
        }}
        location = /64k.bin {{
            add_header X-Backend b{i};
            root {tmp}/www;
        }}
    }}""")
    return f"""\
user root;
worker_processes {workers};
daemon off;
pid {tmp}/backend.pid;
error_log {tmp}/backend-error.log warn;
worker_rlimit_nofile {nofile_limit()};
events {{ worker_connections 20480; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    etag off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
{NGINX_TEMP.format(d=tmp / 'backend-temp')}
{''.join(servers)}
    server {{
        listen 127.0.0.1:{status_port};
        location / {{ stub_status; }}
    }}
}}
"""


@dataclass
class RunCfg:
    """What one proxy run needs to know to write its config."""
    tmp: Path
    scen: Scenario
    workers: int
    port: int  # the port the load generator targets
    spare_port: int  # gangway always has a plain listener, even in TLS scenarios
    backends: list[int]
    cert: Path
    key: Path
    combined_pem: Path
    idle_conns: int = 10000

    @property
    def max_conns(self) -> int:
        # Enough for the scenario's clients plus upstream connections; nginx preallocates
        # its connection table, so the large value is only used where it is needed.
        return self.idle_conns + 1024 if self.scen.tool == "idle" else 4096


def nginx_conf(c: RunCfg) -> str:
    ups = "\n".join(f"        server 127.0.0.1:{p};" for p in c.backends)
    if c.scen.tls:
        listen = f"listen 127.0.0.1:{c.port} ssl http2 backlog=4096;"
        tls = (f"        ssl_certificate {c.cert};\n"
               f"        ssl_certificate_key {c.key};\n"
               f"        ssl_protocols TLSv1.2 TLSv1.3;\n")
    else:
        listen = f"listen 127.0.0.1:{c.port} backlog=4096;"
        tls = ""
    d = c.tmp / "nginx"
    return f"""\
user root;
worker_processes {c.workers};
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile {nofile_limit()};
events {{ worker_connections {c.max_conns}; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
{NGINX_TEMP.format(d=d)}
    upstream backends {{
{ups}
        keepalive 1024;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    server {{
        {listen}
{tls}        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
        }}
    }}
}}
"""


def haproxy_conf(c: RunCfg) -> str:
    servers = "\n".join(f"    server b{i} 127.0.0.1:{p}" for i, p in enumerate(c.backends, 1))
    bind = f"bind 127.0.0.1:{c.port}"
    if c.scen.tls:
        bind += f" ssl crt {c.combined_pem} alpn h2,http/1.1"
    return f"""\
global
    nbthread {c.workers}
    maxconn {c.max_conns}
    # Where the open-files hard limit cannot be raised, HAProxy would refuse to start
    # (it reserves 2 fds per connection); it needs far fewer here.
    no strict-limits

defaults
    mode http
    maxconn {c.max_conns}
    option http-keep-alive
    option forwardfor
    http-reuse always
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
    timeout http-request 10s

frontend fe
    {bind}
    http-request set-header X-Forwarded-Proto https if {{ ssl_fc }}
    http-request set-header X-Forwarded-Proto http if !{{ ssl_fc }}
    http-request set-header X-Real-IP %[src]
    default_backend be

backend be
    balance roundrobin
{servers}
"""


def caddy_conf(c: RunCfg) -> str:
    ups = " ".join(f"127.0.0.1:{p}" for p in c.backends)
    scheme = "https" if c.scen.tls else "http"
    tls = f"\n\ttls {c.cert} {c.key}" if c.scen.tls else ""
    return f"""\
{{
\tadmin off
\tauto_https off
\tservers {{
\t\tprotocols h1 h2
\t}}
}}

{scheme}://:{c.port} {{
\tbind 127.0.0.1{tls}
\treverse_proxy {ups} {{
\t\tlb_policy round_robin
\t\theader_up X-Real-IP {{remote_host}}
\t\ttransport http {{
\t\t\tkeepalive 5m
\t\t\tkeepalive_idle_conns 1024
\t\t\tkeepalive_idle_conns_per_host 1024
\t\t}}
\t}}
}}
"""


def gangway_conf(c: RunCfg) -> str:
    ups = ", ".join(f"127.0.0.1:{p}" for p in c.backends)
    if c.scen.tls:
        listen = f"  http: 127.0.0.1:{c.spare_port}\n  https: 127.0.0.1:{c.port}\n"
        tls = f"    tls: {{cert: {c.cert}, key: {c.key}}}\n"
    else:
        listen = f"  http: 127.0.0.1:{c.port}\n"
        tls = ""
    # No admin listener: its default port (9090) is fixed, and the other proxies run none.
    return f"""\
listen:
{listen}  admin: off
access_log: off
storage: {c.tmp / 'gangway-storage'}
timeouts:
  grace: 1s
sites:
  - hosts: ["*"]
{tls}    upstreams: [{ups}]
"""


# --------------------------------------------------------------------------------------
# Load generators and their output


UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(text: str) -> dict:
    r: dict = {}
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+),", text)
    if not m:
        raise RuntimeError(f"cannot read wrk output: {text[-400:]}")
    r["requests"] = int(m.group(1))
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    r["rps"] = float(m.group(1)) if m else None
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
        r[key] = round(float(m.group(1)) * UNIT_MS[m.group(2)], 3) if m else None
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        r["non_2xx"] = int(m.group(1))
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        r["socket_errors"] = {k: int(v) for k, v in
                              zip(("connect", "read", "write", "timeout"), m.groups())}
        errors += sum(int(v) for v in m.groups())
    r["errors"] = errors
    return r


def parse_h2load(text: str, log_file: Path, want: str = "h2") -> dict:
    """h2load's figures; the run fails unless the application protocol was `want`."""
    r: dict = {}
    m = re.search(r"finished in ([\d.]+)(\w+), ([\d.]+) req/s", text)
    if not m:
        raise RuntimeError(f"cannot read h2load output: {text[-400:]}")
    r["rps"] = float(m.group(3))
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", text)
    if m:
        r["requests"] = int(m.group(3))
        r["errors"] = int(m.group(5)) + int(m.group(6)) + int(m.group(7))
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if m:
        bad = int(m.group(3)) + int(m.group(4))
        r["non_2xx"] = bad
        r["errors"] = r.get("errors", 0) + bad
    m = re.search(r"Application protocol: (\S+)", text)
    r["alpn"] = m.group(1) if m else None
    m = re.search(r"Cipher: (\S+)", text)
    r["cipher"] = m.group(1) if m else None
    # Percentiles from the per-request log: start(us) \t status \t duration(us).
    durations = []
    try:
        with open(log_file) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3:
                    try:
                        durations.append(int(parts[2]))
                    except ValueError:
                        pass
    except OSError:
        pass
    durations.sort()
    for q, key in ((0.50, "p50_ms"), (0.99, "p99_ms")):
        if durations:
            idx = min(len(durations) - 1, max(0, int(round(q * len(durations))) - 1))
            r[key] = round(durations[idx] / 1000.0, 3)
        else:
            r[key] = None
    if r.get("alpn") != want:
        r["errors"] = max(r.get("errors", 0), 1)
        r["note"] = f"application protocol was {r.get('alpn')}, not {want}"
    return r


def load_argv(scen: Scenario, url: str, threads: int, seconds: float,
              log_file: Path | None) -> list[str]:
    if scen.tool == "wrk":
        argv = ["wrk", f"-t{threads}", f"-c{scen.conns}", f"-d{max(1, round(seconds))}s",
                "--latency", "--timeout", "5s"]
        if scen.close:
            argv += ["-H", "Connection: close"]
        return argv + [url]
    if scen.tool == "h2load":
        argv = ["h2load", "-t", str(threads), "-c", str(scen.conns), "-m", str(scen.streams)]
        if scen.h1:
            argv += ["--h1"]
        if scen.rate:
            # -D and -r exclude each other: a paced run is a number of requests instead,
            # which takes `seconds` at the offered rate.
            argv += ["-n", str(max(scen.conns, round(scen.rate * seconds))),
                     "--rps", str(scen.rps_per_conn),
                     "-r", str(scen.conns_per_ms), "--rate-period", "1ms"]
        else:
            argv += ["-D", str(max(1, round(seconds)))]
        if log_file is not None:
            argv += ["--log-file", str(log_file)]
        return argv + [url]
    raise ValueError(scen.tool)


# --------------------------------------------------------------------------------------
# The idle-connections client (run as a subprocess: `run.py --idle-client ...`)


async def _idle_client(port: int, n: int, hold: float, open_budget: float) -> None:
    conns = []
    failed = 0
    errors: dict[str, int] = {}
    sem = asyncio.Semaphore(256)
    req = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: idle-client\r\n\r\n"

    async def one() -> None:
        nonlocal failed
        async with sem:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), 10)
                writer.write(req)
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                status = int(head.split(b" ", 2)[1])
                m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                if m:
                    await asyncio.wait_for(reader.readexactly(int(m.group(1))), 10)
                elif re.search(rb"(?im)^transfer-encoding:\s*chunked", head):
                    await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10)
                if status != 200:
                    raise RuntimeError(f"status {status}")
                conns.append((reader, writer))
            except Exception as e:  # noqa: BLE001 - counted, reported
                failed += 1
                key = type(e).__name__
                errors[key] = errors.get(key, 0) + 1

    start = time.monotonic()
    tasks = [asyncio.ensure_future(one()) for _ in range(n)]
    done, pending = await asyncio.wait(tasks, timeout=open_budget)
    for t in pending:
        t.cancel()
    print(json.dumps({"event": "ready", "open": len(conns), "failed": failed,
                      "unfinished": len(pending), "errors": errors,
                      "seconds": round(time.monotonic() - start, 2)}), flush=True)
    await asyncio.sleep(hold)
    closed = sum(1 for r, _ in conns if r.at_eof())
    print(json.dumps({"event": "done", "still_open": len(conns) - closed,
                      "closed_by_server": closed}), flush=True)
    for _, w in conns:
        w.close()


def idle_client_main(argv: list[str]) -> None:
    port, n, hold, budget = int(argv[0]), int(argv[1]), float(argv[2]), float(argv[3])
    raise_nofile()
    asyncio.run(_idle_client(port, n, hold, budget))


# --------------------------------------------------------------------------------------
# The app backend of scenario 9 (run as a subprocess: `run.py --app-backend P1,P2,P3`)

# Per request the app waits APP_WAIT_S, as a handler waits for its database, then builds
# and serialises a small JSON document (some 30 us of Python). The wait is what bounds it:
# 50 connections / 5 ms is at most 10 000 requests/s, whoever sends them. The CPU left to
# the app is not what bounds it: on a 2-CPU machine the app shares its CPU with wrk, and
# the proxy's cross-CPU wake-ups would then decide the figure, not the proxy's own delay.
# A proxy that adds latency or holds fewer requests in flight shows as fewer requests/s
# than wrk straight at the app. The body stays SMALL_BODY for the sanity check.
APP_WAIT_S = 0.010
APP_ITEMS = 20


def _app_answer(tag: bytes) -> bytes:
    doc = {"items": [{"id": i, "name": f"item-{i}", "score": i * 0.5} for i in range(APP_ITEMS)]}
    json.dumps(doc, sort_keys=True)
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
            + str(len(SMALL_BODY)).encode() + b"\r\nX-Backend: " + tag + b"\r\n\r\n"
            + SMALL_BODY.encode())


class _AppConn(asyncio.Protocol):
    """HTTP/1.1 keep-alive, GET only: a request is a head; pipelined heads are answered in
    order; `Connection: close` closes after the answer."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.closing: list[bool] = []  # per request waiting, in order: close after it?

    def connection_made(self, transport) -> None:
        self.transport = transport
        APP_STATS["accepts"] += 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    self.transport.close()
                return
            head, self.buf = self.buf[:end].lower(), self.buf[end + 4:]
            self.closing.append(b"\r\nconnection: close" in head)
            asyncio.get_running_loop().call_later(APP_WAIT_S, self.answer)

    def answer(self) -> None:
        close = self.closing.pop(0)
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(_app_answer(self.tag))
        if close:
            self.transport.close()
            self.transport = None

    def connection_lost(self, exc) -> None:
        self.transport = None


APP_STATS = {"accepts": 0}


async def _app_backend(ports: list[int], status_port: int) -> None:
    loop = asyncio.get_running_loop()
    for i, port in enumerate(ports, 1):
        tag = f"b{i}".encode()
        await loop.create_server(lambda tag=tag: _AppConn(tag), "127.0.0.1", port,
                                 backlog=4096)

    async def status(reader, writer) -> None:
        # The same body as nginx's stub_status, which backend_accepts() reads; like nginx,
        # it counts its own connection (measure_load subtracts it).
        APP_STATS["accepts"] += 1
        a = APP_STATS["accepts"]
        body = f"Active connections: 0\nserver accepts handled requests\n {a} {a} 0\n"
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n{body}".encode())
        await writer.drain()
        writer.close()

    await asyncio.start_server(status, "127.0.0.1", status_port)
    await asyncio.Event().wait()


def app_backend_main(argv: list[str]) -> None:
    ports = [int(p) for p in argv[0].split(",")]
    raise_nofile()
    asyncio.run(_app_backend(ports, int(argv[1])))


# --------------------------------------------------------------------------------------
# The bench


@dataclass
class Env:
    args: argparse.Namespace
    tmp: Path
    procs: Procs
    tools: dict
    proxy_cpus: str
    load_cpus: str
    proxy_cpu_list: list[int]
    load_cpu_list: list[int]
    backends: list[int] = field(default_factory=list)
    status_port: int = 0
    backend_proc: subprocess.Popen | None = None
    # Scenario 9's app: three ports of one Python process, and its accept counter's port.
    app_ports: list[int] = field(default_factory=list)
    app_status_port: int = 0
    app_proc: subprocess.Popen | None = None
    gangway_bin: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    combined: Path | None = None
    counter: int = 0


def backend_accepts(status_port: int) -> int | None:
    """Connections a backend accepted so far, from its stub_status page (the app serves
    the same page)."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", status_port, timeout=3)
        conn.request("GET", "/")
        body = conn.getresponse().read().decode()
        conn.close()
        m = re.search(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s*$", body, re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def start_listening(env: Env, argv: list[str], logf: Path, ports: list[int]
                    ) -> subprocess.Popen:
    """Starts a backend process on the load CPUs and waits until it listens on `ports`."""
    p = env.procs.start(argv, env.load_cpus, logf)
    for port in ports:
        wait_port(port, p)
    return p


def get_bodies(port: int, *paths: str) -> list[bytes]:
    """GETs each path in turn on one keep-alive connection; the response bodies."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        bodies = []
        for path in paths:
            conn.request("GET", path)
            bodies.append(conn.getresponse().read())
        return bodies
    finally:
        conn.close()


def start_backends(env: Env, workers: int) -> None:
    www = env.tmp / "www"
    www.mkdir(exist_ok=True)
    (www / "64k.bin").write_bytes(bytes((i * 7 + 13) % 251 for i in range(BIG_SIZE)))
    (env.tmp / "backend-temp").mkdir(exist_ok=True)
    ports = free_ports(4)
    env.backends, env.status_port = ports[:3], ports[3]
    conf = env.tmp / "backend.conf"
    conf.write_text(backend_nginx_conf(env.tmp, env.backends, env.status_port, workers))
    env.backend_proc = start_listening(
        env, ["nginx", "-c", str(conf), "-p", str(env.tmp), "-e",
              str(env.tmp / "backend-error.log")],
        env.tmp / "backend.log", env.backends + [env.status_port])
    # Sanity: a small and a large body from each backend.
    for port in env.backends:
        body, big = get_bodies(port, "/", "/64k.bin")
        if body.decode() != SMALL_BODY or len(big) != BIG_SIZE:
            raise RuntimeError(f"backend on {port} answers wrongly: {body!r}, {len(big)} B")
    log(f"backends: nginx ({workers} worker) on 127.0.0.1:{env.backends} "
        f"(CPU {env.load_cpus}), stub_status on {env.status_port}")


def start_app(env: Env) -> None:
    """Scenario 9's backend: one Python process (so one core's worth of app) on three ports."""
    ports = free_ports(4)
    env.app_ports, env.app_status_port = ports[:3], ports[3]
    argv = [sys.executable, str(Path(__file__).resolve()), "--app-backend",
            ",".join(map(str, env.app_ports)), str(env.app_status_port)]
    env.app_proc = start_listening(env, argv, env.tmp / "app.log",
                                   env.app_ports + [env.app_status_port])
    for port in env.app_ports:
        (body,) = get_bodies(port, "/")
        if body.decode() != SMALL_BODY:
            raise RuntimeError(f"app backend on {port} answers wrongly: {body!r}")
    log(f"app backend: one Python process on 127.0.0.1:{env.app_ports} (CPU {env.load_cpus})")


@dataclass
class Backend:
    ports: list[int]  # what the proxies forward to
    proc: subprocess.Popen | None  # the process behind them (its CPU is reported)
    status_port: int  # its stub_status page (upstream connects)


def backend_of(env: Env, scen: Scenario) -> Backend:
    """Who answers behind the proxies in this scenario."""
    if scen.backend == "app":
        return Backend(env.app_ports, env.app_proc, env.app_status_port)
    return Backend(env.backends, env.backend_proc, env.status_port)


def make_cert(env: Env) -> None:
    env.cert, env.key = env.tmp / "cert.pem", env.tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(env.key), "-out", str(env.cert), "-days", "30",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30)
    env.combined = env.tmp / "combined.pem"
    env.combined.write_text(env.cert.read_text() + env.key.read_text())


def build_gangway(env: Env) -> None:
    log("building gangway: cargo build --release")
    r = subprocess.run(["cargo", "build", "--release"], cwd=ROOT, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError("cargo build --release failed")
    env.gangway_bin = ROOT / "target" / "release" / "gangway"


def given_gangway_bin(args: argparse.Namespace) -> Path | None:
    """The binary to run without building: --gangway-bin (must be executable), or with
    --no-build an existing target/release/gangway; None means build it."""
    if args.gangway_bin:
        path = Path(args.gangway_bin).resolve()
        if not os.access(path, os.X_OK):
            raise RuntimeError(f"--gangway-bin {path} is not executable")
        return path
    if args.no_build and (ROOT / "target/release/gangway").exists():
        return ROOT / "target" / "release" / "gangway"
    return None


def start_proxy(env: Env, name: str, scen: Scenario, workers: int, run_dir: Path,
                wrap: list[str] | None = None) -> tuple[subprocess.Popen, RunCfg]:
    """Starts one proxy in front of the backends. `wrap` runs it under another program
    (benches/instructions.py: valgrind); nginx then runs without its master process, so the
    process started is the one that serves."""
    port, spare = free_ports(2)
    c = RunCfg(env.tmp, scen, workers, port, spare, backend_of(env, scen).ports, env.cert, env.key,
               env.combined, env.args.idle_conns)
    logf = run_dir / f"{name}.log"
    base_env = dict(os.environ)
    if name == "gangway":
        cfg = run_dir / "gangway.yaml"
        cfg.write_text(gangway_conf(c))
        argv = [str(env.gangway_bin), "run", "-c", str(cfg)]
        base_env["TOKIO_WORKER_THREADS"] = str(workers)
        base_env.pop("RUST_LOG", None)
    elif name == "nginx":
        (env.tmp / "nginx").mkdir(exist_ok=True)
        cfg = run_dir / "nginx.conf"
        cfg.write_text(("master_process off;\n" if wrap else "") + nginx_conf(c))
        argv = ["nginx", "-c", str(cfg), "-p", str(env.tmp / "nginx"), "-e",
                str(env.tmp / "nginx" / "error.log")]
    elif name == "haproxy":
        cfg = run_dir / "haproxy.cfg"
        cfg.write_text(haproxy_conf(c))
        argv = ["haproxy", "-db", "-f", str(cfg)]
    elif name == "caddy":
        cfg = run_dir / "Caddyfile"
        cfg.write_text(caddy_conf(c))
        home = env.tmp / "caddy-home"
        home.mkdir(exist_ok=True)
        base_env.update(GOMAXPROCS=str(workers), HOME=str(home),
                        XDG_CONFIG_HOME=str(home / "config"), XDG_DATA_HOME=str(home / "data"))
        argv = ["caddy", "run", "--config", str(cfg), "--adapter", "caddyfile"]
    else:
        raise ValueError(name)
    p = env.procs.start([*(wrap or []), *argv], env.proxy_cpus, logf, env=base_env)
    try:
        wait_port(port, p, timeout=60.0 if wrap else 20.0)
    except RuntimeError as e:
        env.procs.stop(p)
        raise RuntimeError(f"{name} did not start: {e}\n{tail(logf)}") from None
    return p, c


def sanity_check(port: int, tls: bool, host: str | None = None) -> dict:
    """A few requests on one connection: status, body, which backends answered, cipher.
    `host`: the Host header to send (default: 127.0.0.1:port)."""
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    seen = []
    info: dict = {}
    for _ in range(6):
        conn.request("GET", "/", headers={"Host": host} if host else {})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200 or body.decode(errors="replace") != SMALL_BODY:
            conn.close()
            raise RuntimeError(f"sanity request: status {resp.status}, body {body[:80]!r}")
        seen.append(resp.getheader("X-Backend"))
    if tls and conn.sock is not None:
        info["cipher"] = conn.sock.cipher()[0]
        info["tls_version"] = conn.sock.version()
    conn.close()
    info["backends_seen"] = sorted({s for s in seen if s})
    if len(info["backends_seen"]) < 3:
        info["note"] = f"6 requests reached only backends {info['backends_seen']}"
    return info


def start_perf(env: Env, name: str, scen: Scenario, workers: int
               ) -> subprocess.Popen | None:
    """With --perf DIR: `perf record` sampling the proxy's CPUs (every process on them,
    kernel included) for the measured run, into DIR/w<workers>-s<scenario>-<proxy>-<n>.data.
    The sampling interrupts are charged to the proxy, so a profiled run's CPU figures are a
    few percent high: it tells where the time goes, not how much there is."""
    if not env.args.perf:
        return None
    out = Path(env.args.perf)
    out.mkdir(parents=True, exist_ok=True)
    n = 1
    while (path := out / f"w{workers}-s{scen.id}-{name}-{n}.data").exists():
        n += 1
    p = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "4000",
                          "-C", env.proxy_cpus, "-o", str(path)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    env.procs.live.append(p)  # killed with the rest on error or Ctrl-C
    return p


def stop_perf(env: Env, p: subprocess.Popen | None) -> None:
    if p is None:
        return
    p.send_signal(signal.SIGINT)  # perf writes its file on SIGINT
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(timeout=30)
    env.procs.stop(p)


def measure_load(env: Env, name: str, scen: Scenario, workers: int, proc, port: int,
                 run_dir: Path, direct: bool) -> dict:
    args = env.args
    scheme = "https" if scen.tls else "http"
    url = f"{scheme}://127.0.0.1:{port}{scen.path}"
    threads = max(1, len(env.load_cpu_list))

    def bound(seconds: float) -> float:
        # A paced run is a number of requests: a proxy that cannot answer the offered rate
        # would stretch it, so it is cut at half as long again, and fails as too slow.
        return seconds * 1.5 + 3 if scen.rate else args.duration + 30

    def run(seconds: float, log_file: Path | None, stem: str) -> str:
        try:
            return run_tool(env.procs, load_argv(scen, url, threads, seconds, log_file),
                            env.load_cpus, bound(seconds), run_dir / stem)
        except TimeoutError:
            if not scen.rate:
                raise
            raise RuntimeError(f"did not keep up with the offered {scen.rate} req/s: the "
                               f"{seconds:g} s of requests took over {bound(seconds):g} s")

    # Warm-up (caches, pools, JIT-free but allocator and connection pools matter).
    if args.warmup > 0:
        run(args.warmup, None, f"{name}-warmup")
    pgid = proc.pid
    h2log = run_dir / f"{name}-h2load.log"
    backend = backend_of(env, scen)
    backend_proc = backend.proc
    acc0 = backend_accepts(backend.status_port)
    (ucpu0, scpu0) = group_cpu_split(pgid)
    cpu0 = ucpu0 + scpu0
    bcpu0 = group_cpu_seconds(backend_proc.pid)
    cores0 = cpu_times()
    perf = start_perf(env, name, scen, workers)
    t0 = time.monotonic()
    text = run(args.duration, h2log, f"{name}-load")
    wall = time.monotonic() - t0
    stop_perf(env, perf)
    cores1 = cpu_times()
    (ucpu1, scpu1) = group_cpu_split(pgid)
    cpu1 = ucpu1 + scpu1
    bcpu1 = group_cpu_seconds(backend_proc.pid)
    acc1 = backend_accepts(backend.status_port)
    if scen.tool == "wrk":
        r = parse_wrk(text)
    else:
        r = parse_h2load(text, h2log, "http/1.1" if scen.h1 else "h2")
    with contextlib.suppress(OSError):
        h2log.unlink()
    reqs = r.get("requests") or 0
    r["wall_s"] = round(wall, 2)
    r["proxy_cpu_s"] = round(cpu1 - cpu0, 3)
    if reqs > 0:
        if not direct:
            r["cpu_us_per_req"] = round((cpu1 - cpu0) * 1e6 / reqs, 2)
            # The kernel's share (stime): on loopback it is mostly TCP work that every proxy
            # pays alike, the floor under any proxy's CPU per request.
            r["sys_us_per_req"] = round((scpu1 - scpu0) * 1e6 / reqs, 2)
        r["backend_cpu_us_per_req"] = round((bcpu1 - bcpu0) * 1e6 / reqs, 2)
    if acc0 is not None and acc1 is not None:
        r["upstream_connects"] = acc1 - acc0 - 1  # minus the status request itself
    r["proxy_core_busy_pct"] = busy_percent(cores0, cores1, env.proxy_cpu_list)
    r["load_core_busy_pct"] = busy_percent(cores0, cores1, env.load_cpu_list)
    if not direct and r["proxy_core_busy_pct"] is not None and wall > 0 \
            and env.proxy_cpus != env.load_cpus:
        # Busy time on the proxy's cores that was not the proxy's: other programs on the
        # machine (a build, another benchmark) or interrupts. Over ~15 % the run is suspect.
        # Interrupt and softirq time (much of it the proxy's own loopback traffic) is
        # reported apart; it is taken out only where the kernel keeps it out of the
        # proxy's own utime+stime, else it would be subtracted twice (irq_time_apart).
        own = 100.0 * (cpu1 - cpu0) / wall / max(1, len(env.proxy_cpu_list))
        irq = busy_percent(cores0, cores1, env.proxy_cpu_list, column=2) or 0.0
        r["proxy_core_irq_pct"] = irq
        r["foreign_on_proxy_core_pct"] = round(
            max(0.0, r["proxy_core_busy_pct"] - (irq if irq_time_apart() else 0.0) - own), 1)
    rss, hwm, nproc = group_memory_kib(pgid)
    prefix = "backend_" if direct else ""  # the direct baseline has no proxy to weigh
    r[prefix + "rss_mib"] = round(rss / 1024, 1)
    r[prefix + "peak_rss_mib"] = round(hwm / 1024, 1)
    r[prefix + "processes"] = nproc
    return judge_load(r, text, reqs)


def judge_load(r: dict, text: str, reqs: int) -> dict:
    """Keeps the load generator's output tail; a run fails with no request done or over 1 %
    of them failed."""
    r["raw_output"] = text[-3000:]
    if reqs == 0:
        r["ok"] = False
        r["error"] = "no request completed"
    elif r.get("errors", 0) > 0.01 * reqs:
        r["ok"] = False
        r["error"] = f"{r['errors']} errors out of {reqs} requests"
    return r


def measure_idle(env: Env, name: str, scen: Scenario, proc, port: int, run_dir: Path) -> dict:
    args = env.args
    pgid = proc.pid
    rss0, _, _ = group_memory_kib(pgid)
    cpu0 = group_cpu_seconds(pgid)
    argv = [sys.executable, str(Path(__file__).resolve()), "--idle-client", str(port),
            str(args.idle_conns), str(args.idle_hold), str(args.idle_open_budget)]
    client = env.procs.start(argv, env.load_cpus, run_dir / f"{name}-idle-client.log",
                             stdout_pipe=True)
    r: dict = {"rss_before_mib": round(rss0 / 1024, 1)}
    try:
        ready = None
        line = readline_timeout(client.stdout, args.idle_open_budget + 15)
        if line.strip():
            ready = json.loads(line)
        if not ready:
            raise RuntimeError(f"idle client gave no report\n"
                               f"{tail(run_dir / f'{name}-idle-client.log')}")
        r.update(conns_open=ready["open"], conns_failed=ready["failed"],
                 open_seconds=ready["seconds"], client_errors=ready.get("errors"))
        time.sleep(min(2.0, max(0.5, args.idle_hold / 2)))
        rss, hwm, nproc = group_memory_kib(pgid)
        cpu1 = group_cpu_seconds(pgid)
        r.update(rss_mib=round(rss / 1024, 1), peak_rss_mib=round(hwm / 1024, 1),
                 processes=nproc, proxy_cpu_s=round(cpu1 - cpu0, 3))
        if ready["open"]:
            r["kib_per_conn"] = round((rss - rss0) / ready["open"], 2)
            r["cpu_us_per_conn"] = round((cpu1 - cpu0) * 1e6 / ready["open"], 1)
        line = readline_timeout(client.stdout, args.idle_hold + 15)
        if line.strip():
            done = json.loads(line)
            r["still_open_after_hold"] = done["still_open"]
        client.wait(timeout=30)
    finally:
        env.procs.stop(client)
    if proc.poll() is not None:
        raise RuntimeError(f"{name} exited with status {proc.returncode} during the run")
    want = args.idle_conns
    if r.get("conns_open", 0) < 0.99 * want:
        r["ok"] = False
        r["error"] = (f"only {r.get('conns_open', 0)} of {want} connections opened "
                      f"({r.get('client_errors')})")
    elif r.get("still_open_after_hold", want) < 0.99 * r["conns_open"]:
        r["ok"] = False
        r["error"] = f"{r['conns_open'] - r['still_open_after_hold']} closed by the proxy"
    return r


def one_run(env: Env, name: str, scen: Scenario, workers: int, rnd: int) -> dict:
    env.counter += 1
    run_dir = env.tmp / "runs" / f"{env.counter:03d}-w{workers}-s{scen.id}-r{rnd}-{name}"
    run_dir.mkdir(parents=True)
    rec: dict = {"round": rnd, "scenario": scen.id, "proxy": name, "workers": workers,
                 "ok": True}
    proc = None
    try:
        if name == "direct":
            backend = backend_of(env, scen)
            port, proc = backend.ports[0], backend.proc
            rec.update(measure_load(env, name, scen, workers, proc, port, run_dir, True))
        else:
            proc, c = start_proxy(env, name, scen, workers, run_dir)
            rec.update(sanity_check(c.port, scen.tls))
            if scen.tool == "idle":
                rec.update(measure_idle(env, name, scen, proc, c.port, run_dir))
            else:
                rec.update(measure_load(env, name, scen, workers, proc, c.port, run_dir, False))
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode} during the run")
    except Exception as e:  # noqa: BLE001 - a failed run is a result, not a crash
        record_failure(rec, e, run_dir / f"{name}.log")
    finally:
        if proc is not None and name != "direct":
            env.procs.stop(proc)
    keep_failed_run(env, rec, run_dir)
    return rec


def record_failure(rec: dict, error: Exception, logf: Path) -> None:
    rec["ok"] = False
    rec["error"] = str(error).strip()
    if logf.exists():
        rec["log_tail"] = tail(logf)


def keep_failed_run(env: "Env", rec: dict, run_dir: Path) -> None:
    """Copies a failed run's files (config, logs, tool output) next to the results."""
    if not rec["ok"]:
        dest = Path(env.args.out) / "failed-runs" / run_dir.name
        shutil.copytree(run_dir, dest, dirs_exist_ok=True)
        rec["files"] = str(dest)


def describe(rec: dict) -> str:
    if not rec["ok"]:
        return f"FAILED: {rec.get('error', '?').splitlines()[0][:160]}"
    if rec["scenario"] == 6:
        return (f"{rec.get('conns_open')} conns, RSS {rec.get('rss_mib')} MiB "
                f"(peak {rec.get('peak_rss_mib')}), {rec.get('kib_per_conn')} KiB/conn")
    text = (f"{rec.get('rps', 0):,.0f} req/s, p50 {rec.get('p50_ms')} ms, "
            f"p99 {rec.get('p99_ms')} ms")
    if rec["proxy"] == "direct":
        return text + f" (backend CPU {rec.get('backend_cpu_us_per_req')} us/req)"
    return (text + f", CPU {rec.get('cpu_us_per_req')} us/req, peak RSS "
            f"{rec.get('peak_rss_mib')} MiB, upstream connects {rec.get('upstream_connects')}")


# --------------------------------------------------------------------------------------
# Load generators compared (--loadgen): wrk against `gangway load`, scenario 1's setup

LOADGEN_GENS = ["wrk", "gangway load"]
LOADGEN_TARGETS = ["gangway", "direct"]
LOADGEN_SHARE = 0.9  # gangway load should reach this share of wrk's req/s through gangway


_IRQ_APART: list = []


def irq_time_apart() -> bool:
    """Whether the kernel keeps interrupt time out of the processes' utime+stime
    (CONFIG_IRQ_TIME_ACCOUNTING=y). Without it (tick accounting), a tick that lands in an
    interrupt or softirq is charged to the running process's stime and also shows in the
    irq/softirq columns of /proc/stat, so subtracting both would count it twice. When the
    kernel config cannot be read, assume apart (as the scenarios' `foreign` figure does)."""
    if not _IRQ_APART:
        text = ""
        with contextlib.suppress(OSError, EOFError):
            import gzip
            with gzip.open("/proc/config.gz", "rt") as f:
                text = f.read()
        if not text:
            with contextlib.suppress(OSError):
                text = Path(f"/boot/config-{platform.release()}").read_text()
        _IRQ_APART.append("# CONFIG_IRQ_TIME_ACCOUNTING is not set" not in text)
    return _IRQ_APART[0]


def pid_cpu_seconds(pid: int) -> float | None:
    """utime+stime of one process (all its threads), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def run_tool_cpu(procs: Procs, argv: list[str], cpus: str, timeout: float, log_path: Path
                 ) -> tuple[str, dict]:
    """Like run_tool, and also measures the tool's own CPU time: utime+stime from
    /proc/<pid>/stat right after the start and again once it has exited but before it is
    reaped (waitid with WNOWAIT leaves the zombie, whose /proc entry still has the totals
    of all its threads). wait4's rusage is kept as a cross-check (microsecond resolution)."""
    out_path = log_path.with_suffix(".out")
    with open(out_path, "wb") as out:
        # taskset execs the tool: the pid is the tool's.
        p = subprocess.Popen(["taskset", "-c", cpus, *argv], stdin=subprocess.DEVNULL,
                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                             preexec_fn=raise_nofile)
    procs.live.append(p)
    try:
        cpu0 = pid_cpu_seconds(p.pid) or 0.0
        deadline = time.monotonic() + timeout
        while os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{argv[0]} did not finish within {timeout:.0f} s")
            time.sleep(0.05)
        cpu1 = pid_cpu_seconds(p.pid)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    except BaseException:
        procs.stop(p)
        raise
    finally:
        if p in procs.live:
            procs.live.remove(p)
    text = tool_output(argv, p, out_path)
    cpu = {"loadgen_cpu_s": round(cpu1 - cpu0, 3) if cpu1 is not None else None,
           "loadgen_cpu_s_rusage": round(ru.ru_utime + ru.ru_stime, 3)}
    return text, cpu


def parse_gangway_load(text: str) -> dict:
    """`gangway load --json`'s report (stdout; stderr is in the same file, hence the
    search for the outer braces)."""
    start, end = text.find("{"), text.rfind("}")
    try:
        doc = json.loads(text[start:end + 1]) if 0 <= start < end else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or "requests" not in doc:
        raise RuntimeError(f"cannot read gangway load output: {text[-400:]}")
    lat = doc.get("latency_ms") or {}
    # As wrk: a status outside 2xx/3xx is an error.
    bad = sum(v for k, v in (doc.get("statuses") or {}).items() if not 200 <= int(k) < 400)
    r = {"requests": doc["requests"], "rps": doc.get("requests_per_second"),
         "p50_ms": lat.get("p50"), "p99_ms": lat.get("p99"),
         "errors": (doc.get("errors") or 0) + bad}
    if bad:
        r["non_2xx"] = bad
    if doc.get("error_kinds"):
        r["error_kinds"] = doc["error_kinds"]
    return r


def loadgen_argv(env: Env, gen: str, url: str, seconds: float) -> list[str]:
    scen = SCENARIOS[1]
    if gen == "wrk":
        return load_argv(scen, url, max(1, len(env.load_cpu_list)), seconds, None)
    # tokio sizes its pool by the CPUs taskset allows: one thread per load CPU, as wrk -t.
    return [str(env.gangway_bin), "load", url, "-c", str(scen.conns),
            "-d", f"{max(1, round(seconds))}s", "--admin", "off", "--json"]


def measure_loadgen(env: Env, gen: str, target: str, proc, port: int, run_dir: Path) -> dict:
    args = env.args
    url = f"http://127.0.0.1:{port}{SCENARIOS[1].path}"
    tag = gen.replace(" ", "-")
    bound = args.duration + 30
    if args.warmup > 0:
        run_tool(env.procs, loadgen_argv(env, gen, url, args.warmup), env.load_cpus, bound,
                 run_dir / f"{tag}-warmup")
    direct = target == "direct"
    cpu0 = group_cpu_seconds(proc.pid)
    bcpu0 = group_cpu_seconds(env.backend_proc.pid)
    cores0 = cpu_times()
    t0 = time.monotonic()
    text, cpu = run_tool_cpu(env.procs, loadgen_argv(env, gen, url, args.duration),
                             env.load_cpus, bound, run_dir / f"{tag}-load")
    wall = time.monotonic() - t0
    cores1 = cpu_times()
    cpu1 = group_cpu_seconds(proc.pid)
    bcpu1 = group_cpu_seconds(env.backend_proc.pid)
    r = parse_wrk(text) if gen == "wrk" else parse_gangway_load(text)
    r.update(cpu)
    reqs = r.get("requests") or 0
    r["wall_s"] = round(wall, 2)
    lg = r.get("loadgen_cpu_s")
    if lg is not None and wall > 0:
        # How much of the load CPUs the generator itself took (the backends share them).
        r["loadgen_core_pct"] = round(100.0 * lg / wall / max(1, len(env.load_cpu_list)), 1)
    else:
        r["loadgen_core_pct"] = None
    if reqs > 0:
        if lg is not None:
            r["loadgen_cpu_us_per_req"] = round(lg * 1e6 / reqs, 2)
        if not direct:
            r["proxy_cpu_s"] = round(cpu1 - cpu0, 3)
            r["cpu_us_per_req"] = round((cpu1 - cpu0) * 1e6 / reqs, 2)
        r["backend_cpu_us_per_req"] = round((bcpu1 - bcpu0) * 1e6 / reqs, 2)
    r["load_core_busy_pct"] = busy_percent(cores0, cores1, env.load_cpu_list)
    # Interrupt time counts on top of the processes' own only where the kernel keeps it
    # apart (see irq_time_apart).
    apart = irq_time_apart()
    nload = max(1, len(env.load_cpu_list))
    if r["load_core_busy_pct"] is not None and lg is not None and wall > 0 \
            and env.proxy_cpus != env.load_cpus:
        # What kept the load core busy: the generator, the backends, interrupts (loopback
        # TCP of both), and the rest, i.e. other programs on the machine.
        r["backend_core_pct"] = round(100.0 * (bcpu1 - bcpu0) / wall / nload, 1)
        irq = busy_percent(cores0, cores1, env.load_cpu_list, column=2) or 0.0
        r["load_core_irq_pct"] = irq
        r["foreign_on_load_core_pct"] = round(max(
            0.0, r["load_core_busy_pct"] - r["loadgen_core_pct"] - r["backend_core_pct"]
            - (irq if apart else 0.0)), 1)
    if not direct:
        busy = r["proxy_core_busy_pct"] = busy_percent(cores0, cores1, env.proxy_cpu_list)
        if busy is not None and wall > 0 and env.proxy_cpus != env.load_cpus:
            own = 100.0 * (cpu1 - cpu0) / wall / max(1, len(env.proxy_cpu_list))
            irq = busy_percent(cores0, cores1, env.proxy_cpu_list, column=2) or 0.0
            r["proxy_core_irq_pct"] = irq
            # The proxy core's busy time that was gangway's (its CPU time, plus interrupts
            # where they are not in it): near 100 % means gangway was saturated.
            r["proxy_core_gangway_pct"] = round(min(busy, own + (irq if apart else 0.0)), 1)
            r["foreign_on_proxy_core_pct"] = round(busy - r["proxy_core_gangway_pct"], 1)
    return judge_load(r, text, reqs)


def one_loadgen_run(env: Env, gen: str, target: str, workers: int, rnd: int) -> dict:
    env.counter += 1
    tag = gen.replace(" ", "-")
    run_dir = env.tmp / "runs" / f"{env.counter:03d}-w{workers}-loadgen-r{rnd}-{tag}-{target}"
    run_dir.mkdir(parents=True)
    rec: dict = {"round": rnd, "scenario": "loadgen", "target": target, "generator": gen,
                 "workers": workers, "ok": True}
    proc = None
    try:
        if target == "direct":
            proc = env.backend_proc
            rec.update(measure_loadgen(env, gen, target, proc, env.backends[0], run_dir))
        else:
            # A fresh gangway per measurement, as in the scenarios: same config as scenario 1.
            proc, c = start_proxy(env, "gangway", SCENARIOS[1], workers, run_dir)
            rec.update(sanity_check(c.port, False))
            rec.update(measure_loadgen(env, gen, target, proc, c.port, run_dir))
            if proc.poll() is not None:
                raise RuntimeError(f"gangway exited with status {proc.returncode} during the run")
    except Exception as e:  # noqa: BLE001 - a failed run is a result, not a crash
        record_failure(rec, e, run_dir / "gangway.log")
    finally:
        if proc is not None and target != "direct":
            env.procs.stop(proc)
    keep_failed_run(env, rec, run_dir)
    return rec


def loadgen_round(env: Env, workers: int, rnd: int) -> list[dict]:
    """Both generators against gangway, then both straight at a backend. Their order
    alternates from round to round, so that a drift of the machine favours neither."""
    gens = LOADGEN_GENS if rnd % 2 else LOADGEN_GENS[::-1]
    recs = []
    for target in LOADGEN_TARGETS:
        for gen in gens:
            log(f"w{workers} round {rnd}/{env.args.rounds} load generators: {gen} -> "
                f"{'no proxy' if target == 'direct' else target} ...")
            rec = one_loadgen_run(env, gen, target, workers, rnd)
            recs.append(rec)
            log(f"    {gen}: {describe_loadgen(rec)}")
    return recs


def describe_loadgen(rec: dict) -> str:
    if not rec["ok"]:
        return f"FAILED: {rec.get('error', '?').splitlines()[0][:160]}"
    text = (f"{rec.get('rps', 0):,.0f} req/s, p50 {rec.get('p50_ms')} ms, "
            f"p99 {rec.get('p99_ms')} ms, generator CPU {rec.get('loadgen_cpu_us_per_req')} "
            f"us/req ({rec.get('loadgen_core_pct')} % of the load core)")
    if rec["target"] != "direct":
        text += (f", gangway CPU {rec.get('cpu_us_per_req')} us/req, proxy core "
                 f"{rec.get('proxy_core_gangway_pct')} % gangway")
    return text


LOADGEN_METRICS = ["rps", "p50_ms", "p99_ms", "loadgen_cpu_us_per_req", "loadgen_core_pct",
                   "cpu_us_per_req", "backend_cpu_us_per_req", "proxy_core_busy_pct",
                   "proxy_core_gangway_pct", "foreign_on_proxy_core_pct", "load_core_busy_pct",
                   "backend_core_pct", "load_core_irq_pct", "foreign_on_load_core_pct",
                   "errors"]


def loadgen_summary(lg_runs: list[dict]) -> dict:
    """Medians per (target, generator); gangway load ÷ wrk within each round; the verdict."""
    rows = []
    for target in LOADGEN_TARGETS:
        for gen in LOADGEN_GENS:
            rs = [r for r in lg_runs if r["target"] == target and r["generator"] == gen]
            if not rs:
                continue
            ok = [r for r in rs if r["ok"]]
            row = {"workers": rs[0]["workers"], "target": target, "generator": gen,
                   "runs": len(rs), "runs_ok": len(ok)}
            for m in LOADGEN_METRICS:
                row[m] = median([r.get(m) for r in ok])
            row["errors_seen"] = sorted({r.get("error", "").splitlines()[0][:200]
                                         for r in rs if not r["ok"]})
            rows.append(row)
    rats = []
    for target in LOADGEN_TARGETS:
        per: dict = {}
        for r in lg_runs:
            if r["target"] == target and r["ok"]:
                per.setdefault(r["round"], {})[r["generator"]] = r
        both = [rr for rr in per.values() if all(g in rr for g in LOADGEN_GENS)]
        row = {"target": target, "a": "gangway load", "b": "wrk", "rounds": len(both)}
        for m in ("rps", "loadgen_cpu_us_per_req", "p50_ms", "p99_ms", "cpu_us_per_req"):
            vals = [rr["gangway load"][m] / rr["wrk"][m] for rr in both
                    if rr["gangway load"].get(m) and rr["wrk"].get(m)]
            row[m] = round(median(vals), 3) if vals else None
        if any(rr for rr in per.values()):
            rats.append(row)
    return {"summary": rows, "ratios": rats, "threshold": LOADGEN_SHARE,
            "verdict": loadgen_verdict(rows, rats)}


def loadgen_verdict(rows: list[dict], rats: list[dict]) -> str:
    thr = f"{LOADGEN_SHARE * 100:.0f} %"
    via = next((r for r in rats if r["target"] == "gangway"), None)
    if not via or via.get("rps") is None:
        return ("no verdict: wrk and gangway load did not both succeed against gangway in the "
                "same round")
    w = next((r for r in rows if r["target"] == "gangway" and r["generator"] == "wrk"), {})
    g = next((r for r in rows if r["target"] == "gangway" and r["generator"] == "gangway load"),
             {})
    # gangway saturated under gangway load: gangway, not the generator, set the pace.
    saturated = (g.get("proxy_core_gangway_pct") or 0) >= 90
    n = via["rounds"]
    text = (f"through gangway, gangway load reached {via['rps'] * 100:.0f} % of wrk's req/s "
            f"(median of {n} per-round ratio{'s' if n != 1 else ''}; threshold {thr}): ")
    if via["rps"] >= LOADGEN_SHARE:
        text += "it is not the bottleneck compared with wrk."
    elif saturated:
        text += (f"below the threshold, although gangway used {g['proxy_core_gangway_pct']:.0f} "
                 "% of its core under it: the shortfall is gangway's own CPU per request "
                 f"({fmt(g.get('cpu_us_per_req'))} µs under gangway load, "
                 f"{fmt(w.get('cpu_us_per_req'))} under wrk), not the generator's speed; rerun "
                 "to see whether it persists.")
    else:
        text += ("it IS the bottleneck: it drives gangway less hard than wrk does, so use wrk "
                 "to measure gangway's capacity.")
    if via.get("loadgen_cpu_us_per_req"):
        text += (f" Per request it costs {via['loadgen_cpu_us_per_req']:.2f}× wrk's CPU "
                 "(the load core is shared with the backends, so a costlier generator leaves "
                 "less for them).")
    if saturated and via["rps"] >= LOADGEN_SHARE:
        text += (f" Under gangway load gangway used {g['proxy_core_gangway_pct']:.0f} % of its "
                 f"core (under wrk {fmt(w.get('proxy_core_gangway_pct'), 0)} %): it was "
                 "saturated, so it set the pace, not the generator.")
    elif not saturated and w.get("proxy_core_gangway_pct") is not None \
            and w["proxy_core_gangway_pct"] < 90:
        irq = (f"interrupts {fmt(w.get('load_core_irq_pct'), 0)} %, " if irq_time_apart()
               else "")
        text += (f" Even with wrk gangway used only {w['proxy_core_gangway_pct']:.0f} % of its "
                 "core, so neither generator saturated gangway here: the load core was the "
                 f"limit ({fmt(w.get('load_core_busy_pct'), 0)} % busy: wrk "
                 f"{fmt(w.get('loadgen_core_pct'), 0)} %, backends "
                 f"{fmt(w.get('backend_core_pct'), 0)} %, {irq}other programs "
                 f"{fmt(w.get('foreign_on_load_core_pct'), 0)} %).")
    direct = next((r for r in rats if r["target"] == "direct"), None)
    if direct and direct.get("rps") is not None:
        text += (" With no proxy (generator and backend on one core) gangway load reached "
                 f"{direct['rps'] * 100:.0f} % of wrk's req/s"
                 + (f", at {direct['loadgen_cpu_us_per_req']:.2f}× its CPU per request"
                    if direct.get("loadgen_cpu_us_per_req") else "") + ".")
    if any((r.get("foreign_on_proxy_core_pct") or 0) > 15
           or (r.get("foreign_on_load_core_pct") or 0) > 15 for r in rows):
        text += " Other programs took a large share of the CPUs: rerun on a quiet machine."
    return text


def loadgen_markdown(meta: dict, lg: dict) -> list[str]:
    L = ["## Load generators: wrk against `gangway load`\n"]
    pin = meta["pinning"].get(str(meta.get("loadgen_workers")), {})
    L.append(f"Scenario 1's setup (plain HTTP/1.1 keep-alive, 12 B, 50 connections): gangway "
             f"({meta.get('loadgen_workers')} worker, CPU {pin.get('proxy', '?')}, started "
             f"fresh for each measurement) in front of the three backends, or no proxy "
             f"(one backend); generator and backends on CPU {pin.get('load', '?')}. "
             f"`{' '.join(meta.get('loadgen_commands', {}).get('wrk', []))}` and "
             f"`{' '.join(meta.get('loadgen_commands', {}).get('gangway load', []))}`, "
             "their order alternating from round to round. **Generator CPU µs/req** = the "
             "generator process's utime+stime (all threads, from /proc) ÷ requests: the lower, "
             "the cheaper the generator. **gen. % of load core** = its CPU time ÷ wall time. "
             "**gangway % of its core** = gangway's CPU time ÷ wall time"
             + (" plus the core's interrupt time" if meta.get("irq_time_apart") else
                " (interrupt time included: this kernel charges it to the running process)")
             + "; near 100 % = gangway saturated. Medians.\n")
    L.append("| target | generator | req/s | p50 ms | p99 ms | generator CPU µs/req "
             "| gen. % of load core | gangway CPU µs/req | gangway % of its core "
             "| load core busy % | runs ok | notes |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in lg["summary"]:
        notes = run_notes(r)
        L.append(f"| {'no proxy' if r['target'] == 'direct' else r['target']} "
                 f"| {r['generator']} | {fmt(r['rps'], thousands=True)} "
                 f"| {fmt(r['p50_ms'], 2)} | {fmt(r['p99_ms'], 2)} "
                 f"| {fmt(r['loadgen_cpu_us_per_req'], 2)} | {fmt(r['loadgen_core_pct'], 0)} "
                 f"| {fmt(r['cpu_us_per_req'])} | {fmt(r['proxy_core_gangway_pct'], 0)} "
                 f"| {fmt(r['load_core_busy_pct'], 0)} | {r['runs_ok']}/{r['runs']} "
                 f"| {'; '.join(notes)} |")
    if lg["ratios"]:
        L.append("")
        L.append("gangway load ÷ wrk (same round, median of per-round ratios; req/s > 1 and "
                 "the others < 1 favour gangway load):\n")
        L.append("| target | req/s | generator CPU/req | p50 | p99 | gangway CPU/req | rounds |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        for r in lg["ratios"]:
            L.append(f"| {'no proxy' if r['target'] == 'direct' else r['target']} "
                     f"| {fmt(r['rps'], 2)} | {fmt(r['loadgen_cpu_us_per_req'], 2)} "
                     f"| {fmt(r['p50_ms'], 2)} | {fmt(r['p99_ms'], 2)} "
                     f"| {fmt(r['cpu_us_per_req'], 2)} | {r['rounds']} |")
    L.append("")
    L.append(f"**Verdict**: {lg['verdict']}\n")
    return L


# --------------------------------------------------------------------------------------
# Summaries, Markdown, JSON, plot

METRICS = ["rps", "p50_ms", "p99_ms", "cpu_us_per_req", "sys_us_per_req", "backend_cpu_us_per_req",
           "peak_rss_mib", "rss_mib", "upstream_connects", "errors", "proxy_core_busy_pct",
           "load_core_busy_pct", "conns_open", "kib_per_conn", "still_open_after_hold",
           "cpu_us_per_conn", "foreign_on_proxy_core_pct", "proxy_core_irq_pct"]


def summarize(runs: list[dict]) -> list[dict]:
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["workers"], r["scenario"], r["proxy"]), []).append(r)
    out = []
    for (w, s, p), rs in groups.items():
        ok = [r for r in rs if r["ok"]]
        row = {"workers": w, "scenario": s, "proxy": p, "runs": len(rs), "runs_ok": len(ok)}
        for m in METRICS:
            row[m] = median([r.get(m) for r in ok])
        row["errors_seen"] = sorted({r.get("error", "").splitlines()[0][:200]
                                     for r in rs if not r["ok"]})
        ciphers = sorted({r.get("cipher") for r in ok if r.get("cipher")})
        if ciphers:
            row["cipher"] = ", ".join(ciphers)
        out.append(row)
    return out


def ratios(runs: list[dict], a: str, b: str) -> list[dict]:
    """Median over rounds of a/b, each ratio taken within the same round."""
    out = []
    keys = sorted({(r["workers"], r["scenario"]) for r in runs})
    for w, s in keys:
        per = {}
        for r in runs:
            if r["workers"] == w and r["scenario"] == s and r["ok"]:
                per.setdefault(r["round"], {})[r["proxy"]] = r
        row = {"workers": w, "scenario": s, "a": a, "b": b}
        for m in ("cpu_us_per_req", "rps", "p99_ms", "peak_rss_mib", "rss_mib"):
            vals = []
            for rr in per.values():
                if a in rr and b in rr and rr[a].get(m) and rr[b].get(m):
                    vals.append(rr[a][m] / rr[b][m])
            row[m] = round(median(vals), 3) if vals else None
        row["rounds"] = sum(1 for rr in per.values() if a in rr and b in rr)
        out.append(row)
    return out


def vs_direct(runs: list[dict]) -> list[dict]:
    """Each proxy's req/s ÷ the no-proxy baseline's, in the scenarios that have one (median
    of the per-round ratios). Issue 8 wants ≥ 0.90 where the backend is the bottleneck
    (scenario 9); in 1 and 2 the load generator's CPU is, so there it says little."""
    out = []
    proxies = sorted({r["proxy"] for r in runs if r["proxy"] != "direct"})
    for p in proxies:
        for r in ratios(runs, p, "direct"):
            if r["rounds"] and r["rps"] is not None:
                out.append({"workers": r["workers"], "scenario": r["scenario"], "proxy": p,
                            "rps_ratio": r["rps"], "rounds": r["rounds"]})
    return out


def run_notes(r: dict) -> list[str]:
    """The notes column of a summary row: cores other programs used, errors, failures."""
    notes = []
    for core in ("proxy", "load"):
        busy = r.get(f"foreign_on_{core}_core_pct") or 0
        if busy > 15:
            notes.append(f"noisy: {busy:.0f} % of the {core} core used by others")
    if r.get("errors"):
        notes.append(f"errors {fmt(r['errors'], 0)}")
    notes += [f"FAILED: {e}" for e in r["errors_seen"]]
    return notes


def fmt(v, digits=1, thousands=False) -> str:
    if v is None:
        return "–"
    if thousands:
        return f"{v:,.0f}"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def machine_info() -> dict:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            kb = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
            mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, AttributeError):
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "memory": mem,
            "kernel": platform.release(), "os": _os_name()}


def _os_name() -> str:
    try:
        text = Path("/etc/os-release").read_text()
        m = re.search(r'^PRETTY_NAME="?([^"\n]*)', text, re.M)
        return m.group(1) if m else "?"
    except OSError:
        return "?"


def versions(tools: dict, gangway_bin: Path | None) -> dict:
    v = {}
    if gangway_bin:
        v["gangway"] = cmd_output([str(gangway_bin), "--version"])
    if tools.get("nginx"):
        v["nginx"] = cmd_output(["nginx", "-v"]).replace("nginx version: ", "")
    if tools.get("haproxy"):
        v["haproxy"] = cmd_output(["haproxy", "-v"]).splitlines()[0].split(" - ")[0].replace(
            "HAProxy version ", "")
    if tools.get("caddy"):
        v["caddy"] = cmd_output(["caddy", "version"]).split()[0]
    if tools.get("wrk"):
        v["wrk"] = cmd_output(["wrk", "-v"]).splitlines()[0].split(" Copyright")[0].replace(
            "wrk ", "")
    if tools.get("h2load"):
        v["h2load"] = cmd_output(["h2load", "--version"]).replace("h2load ", "")
    v["openssl"] = cmd_output(["openssl", "version"]).split(" (")[0]
    return v


def write_markdown(path: Path, meta: dict, summary: list[dict], rat: list[dict],
                   best: list[dict], lg: dict | None = None,
                   direct: list[dict] | None = None) -> None:
    L = []
    mi = meta["machine"]
    L.append("# gangway side-by-side benchmark\n")
    L.append(f"- date: {meta['date']}")
    L.append(f"- machine: {mi['nproc']} CPUs ({mi['cpu_model']}), {mi['memory']}, "
             f"{mi['os']}, kernel {mi['kernel']}")
    L.append(f"- command: `{meta['command']}`")
    L.append(f"- {meta['rounds']} round(s) of {meta['duration']} s per measurement "
             f"(+{meta['warmup']} s warm-up), proxies alternated "
             f"{' '.join(meta['proxies'])} each round; medians shown")
    for w, pin in meta["pinning"].items():
        L.append(f"- workers {w}: proxy on CPU {pin['proxy']}, load generator + backends on "
                 f"CPU {pin['load']}" + (" (shared: not enough CPUs to separate them)"
                                         if pin['proxy'] == pin['load'] else ""))
    L.append("- versions: " + "; ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    if meta.get("skipped"):
        L.append("- skipped: " + "; ".join(meta["skipped"]))
    if meta.get("interrupted"):
        L.append("- **interrupted**: partial results")
    if meta.get("cpu_busy_pct_before_start", 0) > 10:
        L.append(f"- **warning**: the CPUs were {meta['cpu_busy_pct_before_start']:.0f} % busy "
                 "before the start: something else was running")
    noisy = [r for r in summary if (r.get("foreign_on_proxy_core_pct") or 0) > 15]
    if noisy:
        worst = max(r["foreign_on_proxy_core_pct"] for r in noisy)
        L.append(f"- **warning**: in {len(noisy)} scenario/proxy cells other programs or "
                 f"interrupts used more than 15 % (up to {worst:.0f} %) of the proxy's "
                 "pinned CPU: those figures are distorted; rerun on a quiet machine")
    L.append("")
    L.append("CPU µs/req = (utime+stime of all the proxy's processes during the measurement) "
             "÷ requests completed. Upstream connects = connections the backends accepted "
             "during the measurement (after warm-up). p50/p99 from wrk --latency or from "
             "h2load's per-request log.\n")
    for w in sorted({r["workers"] for r in summary}):
        L.append(f"## {w} worker{'s' if w > 1 else ''} per proxy\n")
        L += summary_table(meta, summary, w)
        L.append("")
        L.append("Details:\n")
        L.append("| scenario | proxy | req/s | p50 ms | p99 ms | CPU µs/req | of which kernel "
                 "| peak RSS MiB | upstream connects | load core busy % | runs ok | notes |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for s in sorted({r["scenario"] for r in summary if r["workers"] == w}):
            if s == 6:
                continue
            rows = [r for r in summary if r["workers"] == w and r["scenario"] == s]
            rows.sort(key=lambda r: (meta["order"].index(r["proxy"])
                                     if r["proxy"] in meta["order"] else 99))
            for r in rows:
                notes = []
                if r["proxy"] == "direct":
                    notes.append(f"no proxy; backend CPU {fmt(r['backend_cpu_us_per_req'])} "
                                 "µs/req")
                if r.get("cipher"):
                    notes.append(r["cipher"])
                notes += run_notes(r)
                L.append(f"| {SCENARIOS[s].short} | {r['proxy']} | {fmt(r['rps'], thousands=True)}"
                         f" | {fmt(r['p50_ms'], 2)} | {fmt(r['p99_ms'], 2)} "
                         f"| {fmt(r['cpu_us_per_req'])} | {fmt(r.get('sys_us_per_req'))} "
                         f"| {fmt(r['peak_rss_mib'])} "
                         f"| {fmt(r['upstream_connects'], 0)} | {fmt(r['load_core_busy_pct'], 0)} "
                         f"| {r['runs_ok']}/{r['runs']} | {'; '.join(notes)} |")
        idle = [r for r in summary if r["workers"] == w and r["scenario"] == 6]
        if idle:
            L.append("")
            L.append(f"### {SCENARIOS[6].short}\n")
            L.append("| proxy | connections held | RSS held MiB | peak RSS MiB | KiB/conn "
                     "| still open after hold | runs ok | notes |")
            L.append("|---|---:|---:|---:|---:|---:|---:|---|")
            idle.sort(key=lambda r: (meta["order"].index(r["proxy"])
                                     if r["proxy"] in meta["order"] else 99))
            for r in idle:
                notes = "; ".join(f"FAILED: {e}" for e in r["errors_seen"])
                L.append(f"| {r['proxy']} | {fmt(r['conns_open'], 0)} | {fmt(r['rss_mib'])} "
                         f"| {fmt(r['peak_rss_mib'])} | {fmt(r['kib_per_conn'], 2)} "
                         f"| {fmt(r['still_open_after_hold'], 0)} | {r['runs_ok']}/{r['runs']} "
                         f"| {notes} |")
        rr = [r for r in rat if r["workers"] == w and r["rounds"]]
        if rr:
            L.append("")
            L.append("### gangway ÷ nginx (same round, median of per-round ratios; "
                     "< 1 is better for CPU, p99 and RSS, > 1 for req/s)\n")
            L.append("| scenario | CPU/req | req/s | p99 | peak RSS | RSS held | "
                     "CPU/req ÷ best of nginx, HAProxy | rounds |")
            L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
            for r in rr:
                b = next((x for x in best if x["workers"] == w and x["scenario"] ==
                          r["scenario"]), {})
                L.append(f"| {SCENARIOS[r['scenario']].short} | {fmt(r['cpu_us_per_req'], 2)} "
                         f"| {fmt(r['rps'], 2)} | {fmt(r['p99_ms'], 2)} "
                         f"| {fmt(r['peak_rss_mib'], 2)} | {fmt(r['rss_mib'], 2)} "
                         f"| {fmt(b.get('ratio'), 2)} | {r['rounds']} |")
        dd = [d for d in direct or [] if d["workers"] == w]
        if dd:
            L.append("")
            L.append("### req/s ÷ no proxy (same round, median of per-round ratios; issue 8 "
                     "wants ≥ 0.90 where the backend is the bottleneck, scenario 9)\n")
            cols = [p for p in meta["order"] if any(d["proxy"] == p for d in dd)]
            L.append("| scenario | " + " | ".join(cols) + " |")
            L.append("|---|" + "---:|" * len(cols))
            for sc in sorted({d["scenario"] for d in dd}):
                cells = [next((fmt(d["rps_ratio"], 2) for d in dd
                               if d["scenario"] == sc and d["proxy"] == p), "–") for p in cols]
                L.append(f"| {SCENARIOS[sc].short} | " + " | ".join(cells) + " |")
        L.append("")
    if lg:
        L += loadgen_markdown(meta, lg)
    if meta.get("plot"):
        L.append(f"![requests/s and p99 per scenario]({meta['plot']})\n")
    path.write_text("\n".join(L) + "\n")


def summary_table(meta: dict, summary: list[dict], w: int) -> list[str]:
    """The compact view: one row per scenario, one column per proxy."""
    rows = [r for r in summary if r["workers"] == w]
    proxies = [p for p in meta["order"] if any(r["proxy"] == p for r in rows)]
    head = "| scenario | " + " | ".join(
        "no proxy" if p == "direct" else p for p in proxies) + " |"
    L = ["Per cell: **proxy CPU µs/request** (req/s, p99 ms); scenario 6: RSS MiB with the "
         "idle connections held. Medians over the rounds.\n", head,
         "|---|" + "---:|" * len(proxies)]
    for s in sorted({r["scenario"] for r in rows}):
        cells = []
        for p in proxies:
            r = next((r for r in rows if r["scenario"] == s and r["proxy"] == p), None)
            if r is None:
                cells.append("")
            elif r["runs_ok"] == 0:
                cells.append("FAILED")
            elif s == 6:
                cells.append(f"{fmt(r['rss_mib'])} MiB ({fmt(r['conns_open'], 0)} conns)")
            elif p == "direct":
                cells.append(f"({fmt(r['rps'], thousands=True)}, {fmt(r['p99_ms'], 2)})")
            else:
                cells.append(f"**{fmt(r['cpu_us_per_req'])}** ({fmt(r['rps'], thousands=True)}"
                             f", {fmt(r['p99_ms'], 2)})")
        L.append(f"| {SCENARIOS[s].short} | " + " | ".join(cells) + " |")
    return L


def best_ratio(summary: list[dict]) -> list[dict]:
    """gangway's median CPU/req ÷ the better (lower) of nginx's and HAProxy's medians."""
    out = []
    for w, s in sorted({(r["workers"], r["scenario"]) for r in summary}):
        by = {r["proxy"]: r for r in summary if r["workers"] == w and r["scenario"] == s}
        g = by.get("gangway", {}).get("cpu_us_per_req")
        refs = [by[p]["cpu_us_per_req"] for p in ("nginx", "haproxy")
                if p in by and by[p].get("cpu_us_per_req")]
        out.append({"workers": w, "scenario": s,
                    "ratio": round(g / min(refs), 3) if g and refs else None})
    return out


def have_matplotlib(allow_pip: bool) -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        pass
    if not allow_pip:
        return False
    log("matplotlib not importable; trying pip install matplotlib")
    try:
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"],
                           capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if r.returncode != 0:
        return False
    import importlib
    importlib.invalidate_caches()
    try:
        import matplotlib  # noqa: F401,F811
        return True
    except ImportError:
        return False


def plot(path: Path, summary: list[dict], order: list[str]) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workers = sorted({r["workers"] for r in summary})
    fig, axes = plt.subplots(len(workers), 3, figsize=(17, 4.6 * len(workers)), squeeze=False)
    colors = {"gangway": "#d62728", "nginx": "#2ca02c", "haproxy": "#1f77b4",
              "caddy": "#9467bd", "direct": "#7f7f7f"}
    for wi, w in enumerate(workers):
        rows = [r for r in summary if r["workers"] == w]
        scen = sorted({r["scenario"] for r in rows if r["scenario"] != 6})
        proxies = [p for p in order if any(r["proxy"] == p for r in rows)]
        width = 0.8 / max(1, len(proxies))
        for ax, metric, title in ((axes[wi][0], "rps", "requests/s"),
                                  (axes[wi][1], "p99_ms", "p99 latency (ms)")):
            for pi, p in enumerate(proxies):
                xs, ys = [], []
                for si, s in enumerate(scen):
                    r = next((r for r in rows if r["scenario"] == s and r["proxy"] == p), None)
                    if r and r.get(metric) is not None:
                        xs.append(si + (pi - (len(proxies) - 1) / 2) * width)
                        ys.append(r[metric])
                ax.bar(xs, ys, width, label=p, color=colors.get(p))
            ax.set_xticks(range(len(scen)))
            ax.set_xticklabels([f"S{s}" for s in scen])
            ax.set_title(f"{title}, {w} worker(s)")
            ax.grid(axis="y", alpha=0.3)
        axes[wi][0].legend(fontsize=8)
        # Third panel: CPU per request, and the idle-connections memory as a note.
        ax = axes[wi][2]
        for pi, p in enumerate(proxies):
            xs, ys = [], []
            for si, s in enumerate(scen):
                r = next((r for r in rows if r["scenario"] == s and r["proxy"] == p), None)
                if r and r.get("cpu_us_per_req") is not None:
                    xs.append(si + (pi - (len(proxies) - 1) / 2) * width)
                    ys.append(r["cpu_us_per_req"])
            ax.bar(xs, ys, width, label=p, color=colors.get(p))
        ax.set_xticks(range(len(scen)))
        ax.set_xticklabels([f"S{s}" for s in scen])
        ax.set_yscale("log")
        ax.set_title(f"proxy CPU µs/request (log), {w} worker(s)")
        ax.grid(axis="y", alpha=0.3)
        idle = [r for r in rows if r["scenario"] == 6 and r.get("rss_mib") is not None]
        if idle:
            txt = "S6 RSS with 10k idle conns: " + ", ".join(
                f"{r['proxy']} {r['rss_mib']:.0f} MiB" for r in
                sorted(idle, key=lambda r: order.index(r["proxy"]) if r["proxy"] in order
                       else 99))
            ax.text(0.01, -0.16, txt, transform=ax.transAxes, fontsize=8)
    fig.suptitle("S1 plain h1 12 B · S2 plain h1 64 KiB · S3 https h1 · S4 h2 over TLS · "
                 "S5 new TLS handshake per request\nS7 plain h1 at 20k req/s · "
                 "S8 h2 over TLS at 20k req/s (latency at equal load)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_outputs(env_args, meta: dict, runs: list[dict], lg_runs: list[dict] | None = None
                  ) -> dict | None:
    """Writes the files; returns the load-generator summary (None without --loadgen)."""
    out = Path(env_args.out)
    out.mkdir(parents=True, exist_ok=True)
    lg_runs = lg_runs or []
    lg = loadgen_summary(lg_runs) if lg_runs else None
    summary = summarize(runs)
    rat = ratios(runs, "gangway", "nginx")
    best = best_ratio(summary)
    direct = vs_direct(runs)
    if not env_args.no_plot and summary:
        if have_matplotlib(not env_args.no_pip):
            try:
                plot(out / "results.png", summary, meta["order"])
                meta["plot"] = "results.png"
            except Exception as e:  # noqa: BLE001
                log(f"plot failed: {e}")
        else:
            log("matplotlib is not available: no plot (pip install matplotlib to get one)")
    slim_runs = [{k: v for k, v in r.items() if k != "raw_output"} for r in runs]
    doc = {"meta": meta, "summary": summary, "ratio_gangway_nginx": rat,
           "gangway_cpu_vs_best_of_nginx_haproxy": best, "rps_vs_direct": direct,
           "runs": slim_runs}
    if lg is not None:
        doc["load_generators"] = dict(
            lg, runs=[{k: v for k, v in r.items() if k != "raw_output"} for r in lg_runs])
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    # Raw tool outputs, for anyone who doubts a number.
    (out / "raw-outputs.json").write_text(json.dumps(
        [{"round": r["round"], "scenario": r["scenario"], "proxy": r["proxy"],
          "workers": r["workers"], "output": r.get("raw_output")} for r in runs]
        + [{"round": r["round"], "scenario": "loadgen", "target": r["target"],
            "generator": r["generator"], "workers": r["workers"],
            "output": r.get("raw_output")} for r in lg_runs], indent=1))
    write_markdown(out / "results.md", meta, summary, rat, best, lg, direct)
    log(f"wrote {out / 'results.md'}, {out / 'results.json'}"
        + (f", {out / 'results.png'}" if meta.get("plot") else ""))
    return lg


# --------------------------------------------------------------------------------------
# Soak (--soak SECONDS): gangway's memory under a long steady load. Issue 8: "no growth
# over a 10-minute soak at steady load (memory at the end within 10 % of memory after the
# first minute)". Only the soak runs; see benches/README.md.

SOAK_MIN = 120.0  # the reference is the memory after the first minute: a minute, then more
SOAK_MAX = 3600.0
SOAK_INTERVAL = 5.0  # seconds between samples
SOAK_REF_AT = 60.0  # the reference: the sample nearest this many seconds into the load
SOAK_TAIL = 3  # the end: the mean of the last this many samples under load
SOAK_LIMIT = 1.10  # end ÷ reference above this fails
SOAK_OVERRUN = 3  # the generators run this much longer than the sampling, so that the
#                   last samples are taken under load
SOAK_AFTER = 5.0  # one more sample this long after the load stopped (not judged)
SOAK_PLAIN_HOST = "soak-plain.test"  # Host of the plain load: the site without TLS


@dataclass(frozen=True)
class SoakGen:
    name: str
    tls: bool
    conns: int
    delay_ms: int  # wrk's Lua delay(): the pause before each request on a connection
    close: bool  # `Connection: close`: a new connection (and TLS handshake) per request
    what: str

    @property
    def max_rps(self) -> float:
        return self.conns * 1000.0 / self.delay_ms


SOAK_GENS = [
    SoakGen("keepalive", False, 20, 10, False,
            "plain HTTP/1.1 keep-alive: many requests on a few long-lived connections"),
    SoakGen("churn", True, 4, 20, True,
            "HTTPS with `Connection: close`: a new TCP connection and a full TLS handshake "
            "per request"),
]


def soak_floor() -> float:
    """SOAK_MIN; $BENCH_SOAK_MIN_SECONDS may lower it to test the harness itself with short
    runs (not documented: the verdict of a run shorter than two minutes means little)."""
    try:
        floor = float(os.environ.get("BENCH_SOAK_MIN_SECONDS", SOAK_MIN))
    except ValueError:
        floor = SOAK_MIN
    return max(floor, (SOAK_TAIL + 1) * SOAK_INTERVAL)


def gangway_soak_conf(env: Env, http_port: int, https_port: int, admin_port: int) -> str:
    ups = ", ".join(f"127.0.0.1:{p}" for p in env.backends)
    return f"""\
listen:
  http: 127.0.0.1:{http_port}
  https: 127.0.0.1:{https_port}
  admin: 127.0.0.1:{admin_port}
access_log: off
storage: {env.tmp / 'gangway-storage'}
timeouts:
  grace: 1s
sites:
  # The HTTPS load. wrk sends no usable SNI to an IP address, so gangway picks the
  # certificate by the local address: the site is named by it.
  - hosts: ["127.0.0.1"]
    tls: {{cert: {env.cert}, key: {env.key}}}
    upstreams: [{ups}]
  # The plain load, by its Host header: on the plain listener a TLS site would answer
  # every request with a redirect to https instead of proxying it.
  - hosts: ["*"]
    tls: none
    upstreams: [{ups}]
"""


def start_soak_gangway(env: Env, workers: int, run_dir: Path
                       ) -> tuple[subprocess.Popen, dict[str, int]]:
    """gangway with both listeners and its admin endpoint (for /metrics), pinned as in the
    scenarios."""
    http_port, https_port, admin_port = free_ports(3)
    cfg = run_dir / "gangway.yaml"
    cfg.write_text(gangway_soak_conf(env, http_port, https_port, admin_port))
    base_env = dict(os.environ, TOKIO_WORKER_THREADS=str(workers))
    base_env.pop("RUST_LOG", None)
    logf = run_dir / "gangway.log"
    p = env.procs.start([str(env.gangway_bin), "run", "-c", str(cfg)], env.proxy_cpus, logf,
                        env=base_env)
    try:
        for port in (http_port, https_port, admin_port):
            wait_port(port, p)
    except RuntimeError as e:
        env.procs.stop(p)
        raise RuntimeError(f"gangway did not start: {e}\n{tail(logf)}") from None
    return p, {"http": http_port, "https": https_port, "admin": admin_port}


def soak_wrk_argv(g: SoakGen, port: int, seconds: int, script: Path) -> list[str]:
    argv = ["wrk", "-t1", f"-c{g.conns}", f"-d{seconds}s", "--latency", "--timeout", "5s",
            "-s", str(script)]
    argv += ["-H", "Connection: close"] if g.close else ["-H", f"Host: {SOAK_PLAIN_HOST}"]
    return argv + [f"{'https' if g.tls else 'http'}://127.0.0.1:{port}/"]


def gangway_metrics(port: int) -> dict | None:
    """The few figures of gangway's admin /metrics the soak follows: open HTTP/1
    connections, requests in flight, unrouted requests and responses by status class
    (summed over the routes)."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace")
        conn.close()
    except (OSError, http.client.HTTPException):
        return None
    if resp.status != 200:
        return None
    out: dict = {"responses": {}}
    for line in text.splitlines():
        m = re.match(r"(\w+)(?:\{([^}]*)\})?\s+(\S+)\s*$", line)
        if not m or line.startswith("#"):
            continue
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        try:
            v = int(float(value))
        except ValueError:
            continue
        if name == "gangway_connections" and 'protocol="h1"' in labels:
            out["connections"] = v
        elif name == "gangway_requests_in_flight":
            out["in_flight"] = v
        elif name == "gangway_unrouted_requests_total":
            out["unrouted"] = v
        elif name == "gangway_route_requests_total":
            c = re.search(r'code="(\w+)"', labels)
            if c:
                out["responses"][c.group(1)] = out["responses"].get(c.group(1), 0) + v
    return out


def group_fds_threads(pgid: int) -> tuple[int, int]:
    """Open file descriptors and threads over the group (a leaked connection keeps its
    socket)."""
    fds = threads = 0
    for pid in group_pids(pgid):
        with contextlib.suppress(OSError):
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        with contextlib.suppress(OSError, AttributeError):
            with open(f"/proc/{pid}/status") as f:
                threads += int(re.search(r"^Threads:\s+(\d+)", f.read(), re.M).group(1))
    return fds, threads


def soak_sample(env: Env, proc, admin_port: int, t: float, phase: str) -> dict:
    rss, hwm, _ = group_memory_kib(proc.pid)
    fds, threads = group_fds_threads(proc.pid)
    s = {"t": round(t, 1), "phase": phase, "rss_kib": rss, "hwm_kib": hwm,
         "cpu_s": round(group_cpu_seconds(proc.pid), 3), "fds": fds, "threads": threads,
         "backend_accepts": backend_accepts(env.status_port)}
    m = gangway_metrics(admin_port)
    if m is not None:
        s.update(m)
    return s


def soak_rates(samples: list[dict]) -> None:
    """Per interval, into each sample after the first: gangway's CPU % of one core and
    its 2xx responses per second."""
    for a, b in zip(samples, samples[1:]):
        dt_s = b["t"] - a["t"] if b["phase"] == a["phase"] or a["phase"] == "start" else 0
        if dt_s <= 0:
            continue
        b["cpu_pct"] = round(100.0 * (b["cpu_s"] - a["cpu_s"]) / dt_s, 1)
        ra, rb = (a.get("responses") or {}).get("2xx"), (b.get("responses") or {}).get("2xx")
        if ra is not None and rb is not None:
            b["rps"] = round((rb - ra) / dt_s, 1)


def run_soak(env: Env, proc, ports: dict[str, int], duration: float, run_dir: Path,
             samples: list[dict], res: dict) -> None:
    """Starts both generators, samples every SOAK_INTERVAL s until `duration`, collects
    the generators' totals. Fills `samples` and `res` as it goes (partial on an error)."""
    seconds = int(round(duration)) + SOAK_OVERRUN
    gens = []
    samples.append(soak_sample(env, proc, ports["admin"], 0.0, "start"))
    cores0 = cpu_times()
    for g in SOAK_GENS:
        script = env.tmp / f"soak-{g.name}.lua"
        script.write_text(f"-- {g.what}\nfunction delay()\n  return {g.delay_ms}\nend\n")
        argv = soak_wrk_argv(g, ports["https" if g.tls else "http"], seconds, script)
        gens.append((g, env.procs.start(argv, env.load_cpus, run_dir / f"wrk-{g.name}.out")))
    t0 = time.monotonic()
    log(f"soak: {duration:.0f} s of load, a sample every {SOAK_INTERVAL:.0f} s")
    k = 1
    while k * SOAK_INTERVAL <= duration + 1e-6 and res.get("gangway_exit") is None:
        due = t0 + k * SOAK_INTERVAL
        while (left := due - time.monotonic()) > 0:
            time.sleep(min(left, 1.0))
            if proc.poll() is not None:
                res["gangway_exit"] = proc.returncode
                res["gangway_exit_after_s"] = round(time.monotonic() - t0, 1)
                break
            for g, p in gens:
                if p.poll() is not None:
                    raise RuntimeError(
                        f"wrk ({g.name}) exited with status {p.returncode} after "
                        f"{time.monotonic() - t0:.0f} s:\n{tail(run_dir / f'wrk-{g.name}.out')}")
        if res.get("gangway_exit") is not None:
            break
        samples.append(soak_sample(env, proc, ports["admin"], time.monotonic() - t0, "load"))
        if k % 6 == 0 or k * SOAK_INTERVAL == SOAK_REF_AT:
            soak_rates(samples)
            s = samples[-1]
            log(f"    t={s['t']:5.0f} s  RSS {s['rss_kib'] / 1024:6.1f} MiB  CPU "
                f"{fmt(s.get('cpu_pct'), 0):>3} %  {fmt(s.get('rps'), thousands=True):>6} "
                f"resp/s  {s.get('connections', '?')} conns  {s['fds']} fds")
        k += 1
    res["cores"] = (cores0, cpu_times())
    if res.get("gangway_exit") is not None:
        log(f"gangway exited with status {res['gangway_exit']} "
            f"{res['gangway_exit_after_s']} s into the soak")
        for _, p in gens:
            env.procs.stop(p)
        res["wrk"] = {g.name: {"error": "stopped: gangway had exited"} for g, _ in gens}
        return
    wrk: dict = {}
    for g, p in gens:
        try:
            p.wait(timeout=SOAK_OVERRUN + 30)
        except subprocess.TimeoutExpired:
            env.procs.stop(p)
            raise RuntimeError(f"wrk ({g.name}) did not finish") from None
        env.procs.stop(p)
        text = (run_dir / f"wrk-{g.name}.out").read_text(errors="replace")
        if p.returncode != 0:
            raise RuntimeError(f"wrk ({g.name}) exited with status {p.returncode}: "
                               f"{text[-600:]}")
        wrk[g.name] = parse_wrk(text)
        wrk[g.name]["raw_output"] = text[-3000:]
    res["wrk"] = wrk
    time.sleep(SOAK_AFTER)
    if proc.poll() is None:
        samples.append(soak_sample(env, proc, ports["admin"], time.monotonic() - t0, "after"))
    else:
        res["gangway_exit"] = proc.returncode
        res["gangway_exit_after_s"] = round(time.monotonic() - t0, 1)


def soak_verdict(samples: list[dict], res: dict, env: Env | None = None) -> dict:
    """The figures and the verdict from the samples and the generators' totals."""
    v: dict = {}
    reasons: list[str] = []
    soak_rates(samples)
    start = next((s for s in samples if s["phase"] == "start"), None)
    load = [s for s in samples if s["phase"] == "load"]
    after = next((s for s in samples if s["phase"] == "after"), None)
    mib = lambda kib: round(kib / 1024, 2)  # noqa: E731
    if res.get("gangway_exit") is not None:
        reasons.append(f"gangway exited with status {res['gangway_exit']} "
                       f"{res.get('gangway_exit_after_s')} s into the soak")
    if start:
        v["start_rss_mib"] = mib(start["rss_kib"])
    if len(load) > SOAK_TAIL:
        ref = min(load, key=lambda s: abs(s["t"] - SOAK_REF_AT))
        end = load[-SOAK_TAIL:]
        end_kib = sum(s["rss_kib"] for s in end) / len(end)
        peak = max(load, key=lambda s: s["rss_kib"])
        v.update(ref_t=ref["t"], ref_rss_mib=mib(ref["rss_kib"]),
                 end_t=[end[0]["t"], end[-1]["t"]], end_rss_mib=mib(end_kib),
                 peak_rss_mib=mib(peak["rss_kib"]), peak_t=peak["t"],
                 ratio=round(end_kib / ref["rss_kib"], 4) if ref["rss_kib"] else None,
                 hwm_mib=mib(load[-1]["hwm_kib"]), load_s=load[-1]["t"])
        if v["ratio"] is None or v["ratio"] > SOAK_LIMIT:
            reasons.append(f"RSS at the end is {fmt(v['ratio'], 3)}× the RSS after the first "
                           f"minute (limit {SOAK_LIMIT:.2f}×)")
        # gangway's own view over the load: CPU, responses by class, connections, fds.
        first, last = start or load[0], load[-1]
        cpu = last["cpu_s"] - first["cpu_s"]
        v["gangway_cpu_s"] = round(cpu, 2)
        if last["t"] > first["t"]:
            v["gangway_cpu_pct"] = round(100.0 * cpu / (last["t"] - first["t"]), 1)
        r0, r1 = first.get("responses") or {}, last.get("responses") or {}
        if r1:
            v["gangway_responses"] = {c: r1.get(c, 0) - r0.get(c, 0) for c in sorted(r1)}
            ok = v["gangway_responses"].get("2xx", 0)
            if ok:
                v["gangway_cpu_us_per_response"] = round(cpu * 1e6 / ok, 1)
                v["gangway_rps"] = round(ok / (last["t"] - first["t"]), 1)
            bad = sum(n for c, n in v["gangway_responses"].items() if c != "2xx")
            bad += (last.get("unrouted") or 0) - (first.get("unrouted") or 0)
            if bad:
                reasons.append(f"gangway sent {bad} responses other than 2xx "
                               f"({v['gangway_responses']})")
        v["fds"] = [first["fds"], last["fds"]]
        v["threads"] = [first["threads"], last["threads"]]
        v["connections_end"] = last.get("connections")
        if first.get("backend_accepts") is not None and last.get("backend_accepts") is not None:
            # Minus the status requests themselves, one per sample.
            n = sum(1 for s in samples if s["phase"] == "load")
            v["upstream_connects"] = last["backend_accepts"] - first["backend_accepts"] - n
    elif res.get("gangway_exit") is None:
        reasons.append(f"only {len(load)} samples under load: no verdict")
    if after:
        v["after_rss_mib"] = mib(after["rss_kib"])
        v["after_connections"] = after.get("connections")
    for name, w in (res.get("wrk") or {}).items():
        if w.get("error"):
            continue
        sock = sum((w.get("socket_errors") or {}).values())
        if sock:
            reasons.append(f"wrk {name}: socket errors {w['socket_errors']}")
        if w.get("non_2xx"):
            reasons.append(f"wrk {name}: {w['non_2xx']} non-2xx responses")
        if not w.get("requests"):
            reasons.append(f"wrk {name}: no request completed")
    if env is not None and res.get("cores") and len(load) > 1:
        c0, c1 = res["cores"]
        v["proxy_core_busy_pct"] = busy_percent(c0, c1, env.proxy_cpu_list)
        v["load_core_busy_pct"] = busy_percent(c0, c1, env.load_cpu_list)
        if v["proxy_core_busy_pct"] is not None and "gangway_cpu_pct" in v \
                and env.proxy_cpus != env.load_cpus:
            irq = busy_percent(c0, c1, env.proxy_cpu_list, column=2) or 0.0
            own = v["gangway_cpu_pct"] / max(1, len(env.proxy_cpu_list))
            v["foreign_on_proxy_core_pct"] = round(max(
                0.0, v["proxy_core_busy_pct"] - (irq if irq_time_apart() else 0.0) - own), 1)
    v["verdict"] = "FAIL" if reasons else "PASS"
    v["reasons"] = reasons
    return v


def soak_markdown(meta: dict, v: dict) -> str:
    mi = meta["machine"]
    pin = meta["pinning"]
    L = ["# gangway soak\n",
         f"- date: {meta['date']}",
         f"- machine: {mi['nproc']} CPUs ({mi['cpu_model']}), {mi['memory']}, {mi['os']}, "
         f"kernel {mi['kernel']}",
         f"- command: `{meta['command']}`",
         "- versions: " + "; ".join(f"{k} {x}" for k, x in meta.get("versions", {}).items()),
         f"- duration: {meta['duration_s']:.0f} s of steady load (the generators run "
         f"{SOAK_OVERRUN} s longer, so the last samples are under load), a sample every "
         f"{SOAK_INTERVAL:.0f} s: RSS = VmRSS summed over gangway's process group (/proc)",
         f"- gangway: {meta['workers']} worker on CPU {pin['proxy']}; both generators and the "
         f"three nginx backends on CPU {pin['load']}"
         + (" (shared: not enough CPUs to separate them)" if pin["proxy"] == pin["load"]
            else ""),
         "- load, two wrk at once for the whole run (a Lua `delay()` paces each connection, "
         "so the load is steady rather than saturating):"]
    for g in SOAK_GENS:
        L.append(f"  - {g.name}: {g.what}; {g.conns} connections, {g.delay_ms} ms pause "
                 f"before each request (at most {g.max_rps:,.0f} req/s): "
                 f"`{shlex.join(meta['commands'][g.name])}`")
    if meta.get("cpu_busy_pct_before_start", 0) > 10:
        L.append(f"- **warning**: the CPUs were {meta['cpu_busy_pct_before_start']:.0f} % busy "
                 "before the start: something else was running")
    if (v.get("foreign_on_proxy_core_pct") or 0) > 15:
        L.append(f"- **warning**: other programs used {v['foreign_on_proxy_core_pct']:.0f} % "
                 "of gangway's CPU during the soak (memory is little affected; the rates and "
                 "CPU figures are)")
    if meta.get("interrupted"):
        L.append("- **interrupted**: partial results")
    L.append("")
    if meta.get("error"):
        first, _, rest = meta["error"].partition("\n")
        L.append(f"**Verdict: ERROR** (the soak could not run): {first}\n")
        if rest:
            L += ["```", rest, "```", ""]
    else:
        L.append(f"**Verdict: {v['verdict']}**"
                 + (": " + "; ".join(v["reasons"]) if v["reasons"] else
                    f": RSS at the end is {fmt(v.get('ratio'), 3)}× the RSS after the first "
                    f"minute (limit {SOAK_LIMIT:.2f}×), no errors") + "\n")
    if "ref_rss_mib" in v:
        L += ["| RSS | MiB | when |", "|---|---:|---|",
              f"| before the load | {fmt(v.get('start_rss_mib'), 1)} | t = 0 |",
              f"| after the first minute (reference: the sample nearest "
              f"{SOAK_REF_AT:.0f} s) | {fmt(v['ref_rss_mib'], 1)} "
              f"| t = {v['ref_t']:.0f} s |",
              f"| end: mean of the last {SOAK_TAIL} samples | {fmt(v['end_rss_mib'], 1)} "
              f"| t = {v['end_t'][0]:.0f}–{v['end_t'][1]:.0f} s |",
              f"| peak of the samples | {fmt(v['peak_rss_mib'], 1)} | t = {v['peak_t']:.0f} s |",
              f"| peak (VmHWM, the process's whole life) | {fmt(v['hwm_mib'], 1)} "
              "| the kernel updates it lazily: it can miss a short peak |",
              f"| {SOAK_AFTER:.0f} s after the load stopped | {fmt(v.get('after_rss_mib'), 1)} "
              "| not judged |",
              f"| **end ÷ reference** | **{fmt(v.get('ratio'), 3)}** | limit {SOAK_LIMIT:.2f} |",
              ""]
    wrk = meta.get("wrk") or {}
    if wrk:
        L += ["| generator | requests | req/s | p50 ms | p99 ms | socket errors | non-2xx |",
              "|---|---:|---:|---:|---:|---|---:|"]
        for name, w in wrk.items():
            if w.get("error"):
                L.append(f"| {name} | {w['error']} | | | | | |")
                continue
            sock = w.get("socket_errors") or {}
            L.append(f"| {name} | {fmt(w.get('requests'), thousands=True)} "
                     f"| {fmt(w.get('rps'), thousands=True)} | {fmt(w.get('p50_ms'), 2)} "
                     f"| {fmt(w.get('p99_ms'), 2)} "
                     f"| {', '.join(f'{k} {n}' for k, n in sock.items()) or '0'} "
                     f"| {w.get('non_2xx', 0)} |")
        total = sum(w.get("requests") or 0 for w in wrk.values())
        errs = sum(w.get("errors") or 0 for w in wrk.values() if not w.get("error"))
        L.append(f"| **total** | **{total:,}** | | | | | errors {errs} |")
        L.append("")
    if "gangway_cpu_s" in v:
        L.append(f"gangway over the load: CPU {v['gangway_cpu_s']} s "
                 f"({fmt(v.get('gangway_cpu_pct'))} % of a core, "
                 f"{fmt(v.get('gangway_cpu_us_per_response'))} µs per response), "
                 f"{fmt(v.get('gangway_rps'), thousands=True)} 2xx responses/s, both loads "
                 f"(responses by class from its /metrics: {v.get('gangway_responses')}); open fds {v['fds'][0]} → "
                 f"{v['fds'][1]}, threads {v['threads'][0]} → {v['threads'][1]}; client "
                 f"connections open at the end {v.get('connections_end')} "
                 f"({fmt(v.get('after_connections'))} after the load stopped); upstream connects "
                 f"{v.get('upstream_connects')}. Proxy core busy "
                 f"{fmt(v.get('proxy_core_busy_pct'))} %, load core "
                 f"{fmt(v.get('load_core_busy_pct'))} %.\n")
    if meta.get("plot"):
        L.append(f"![gangway RSS over the soak]({meta['plot']})\n")
    L.append(f"Samples: `soak.json`. Issue 8's other memory target (≤ 64 MiB with 10 000 idle "
             f"connections) is scenario 6 of the normal run.")
    return "\n".join(L) + "\n"


def soak_plot(path: Path, samples: list[dict], v: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = [s for s in samples if s["phase"] in ("start", "load")]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True,
                                   gridspec_kw={"height_ratios": [2, 1]})
    ax1.plot([s["t"] for s in run], [s["rss_kib"] / 1024 for s in run], color="#d62728",
             marker=".", label="gangway RSS (VmRSS, process group)")
    if v.get("ref_rss_mib"):
        ax1.axhline(v["ref_rss_mib"] * SOAK_LIMIT, color="#7f7f7f", ls="--",
                    label=f"limit: {SOAK_LIMIT:.2f} × the reference")
        ax1.plot([v["ref_t"]], [v["ref_rss_mib"]], "o", color="black",
                 label=f"reference (t = {v['ref_t']:.0f} s)")
        ax1.axvspan(v["end_t"][0], v["end_t"][1], color="#1f77b4", alpha=0.15,
                    label=f"end: mean of the last {SOAK_TAIL} samples")
    top = max([s["rss_kib"] / 1024 for s in run] + [(v.get("ref_rss_mib") or 0) * SOAK_LIMIT])
    ax1.set_ylim(0, top * 1.08)
    ax1.set_ylabel("MiB")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8, loc="lower right")
    ax1.set_title(f"gangway soak: {v.get('verdict')}, end ÷ reference = "
                  f"{fmt(v.get('ratio'), 3)}")
    rated = [s for s in run if "cpu_pct" in s]
    ax2.plot([s["t"] for s in rated], [s["cpu_pct"] for s in rated], color="#d62728",
             label="gangway CPU % of a core")
    ax2.set_ylabel("CPU %")
    ax2.set_ylim(0, max([s["cpu_pct"] for s in rated] + [1.0]) * 1.15)
    ax2.grid(alpha=0.3)
    ax2.set_xlabel("seconds since the load started")
    with_rps = [s for s in rated if "rps" in s]
    if with_rps:
        ax3 = ax2.twinx()
        ax3.plot([s["t"] for s in with_rps], [s["rps"] for s in with_rps], color="#1f77b4",
                 label="2xx responses/s (gangway /metrics)")
        ax3.set_ylabel("responses/s")
        ax3.set_ylim(0, max([s["rps"] for s in with_rps] + [1.0]) * 1.15)
        h1, l1 = ax2.get_legend_handles_labels()
        h2, l2 = ax3.get_legend_handles_labels()
        ax2.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_soak_outputs(args: argparse.Namespace, meta: dict, samples: list[dict],
                       v: dict) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("soak.png",):
        with contextlib.suppress(OSError):
            (out / stale).unlink()
    if not args.no_plot and any(s["phase"] == "load" for s in samples):
        if have_matplotlib(not args.no_pip):
            try:
                soak_plot(out / "soak.png", samples, v)
                meta["plot"] = "soak.png"
            except Exception as e:  # noqa: BLE001
                log(f"plot failed: {e}")
        else:
            log("matplotlib is not available: no plot (pip install matplotlib to get one)")
    wrk = {k: {x: y for x, y in w.items() if x != "raw_output"}
           for k, w in (meta.get("wrk") or {}).items()}
    doc = {"meta": dict(meta, wrk=wrk), "result": v, "samples": samples,
           "wrk_outputs": {k: w.get("raw_output") for k, w in (meta.get("wrk") or {}).items()}}
    (out / "soak.json").write_text(json.dumps(doc, indent=1))
    (out / "soak.md").write_text(soak_markdown(meta, v))
    log(f"wrote {out / 'soak.md'}, {out / 'soak.json'}"
        + (f", {out / 'soak.png'}" if meta.get("plot") else ""))


def soak_main(args: argparse.Namespace, argv: list[str]) -> int:
    """--soak: only the soak. Exit 0 on PASS, 1 on FAIL, 2 if it could not run."""
    ignored = [o for o in ("--quick", "--scenarios", "--rounds", "--duration", "--warmup",
                           "--proxies", "--loadgen", "--idle-conns", "--idle-hold")
               if any(a == o or a.startswith(o + "=") for a in argv)]
    if ignored:
        log(f"--soak runs only the soak: {', '.join(ignored)} ignored")
    tools = ensure_tools(not args.no_install, ["nginx", "wrk", "openssl", "taskset"])
    for need, path in tools.items():
        if not path:
            log(f"cannot run the soak without {need}")
            return 2
    duration = args.soak
    workers = args.worker_list[0]
    ncpu = os.cpu_count() or 1
    pcpus, lcpus = cpu_plan(workers, ncpu, args.proxy_cpus, args.load_cpus)
    idle_busy = busy_before_start("the soak starts: other programs are running")
    tmp = Path(tempfile.mkdtemp(prefix="gangway-soak-"))
    run_dir = tmp / "runs" / "soak"
    run_dir.mkdir(parents=True)
    procs = Procs()
    env = Env(args, tmp, procs, tools, pcpus, lcpus, parse_cpus(pcpus), parse_cpus(lcpus))
    meta: dict = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python3 benches/run.py " + shlex.join(argv),
        "machine": machine_info(), "duration_s": duration, "interval_s": SOAK_INTERVAL,
        "reference_at_s": SOAK_REF_AT, "end_samples": SOAK_TAIL, "limit": SOAK_LIMIT,
        "workers": workers, "pinning": {"proxy": pcpus, "load": lcpus},
        "generators": [vars(g) for g in SOAK_GENS],
        "commands": {g.name: soak_wrk_argv(g, 0, int(round(duration)) + SOAK_OVERRUN,
                                           Path(f"soak-{g.name}.lua"))
                     for g in SOAK_GENS},
        "cpu_busy_pct_before_start": idle_busy, "irq_time_apart": irq_time_apart(),
        "tmp": str(tmp),
    }
    for g in SOAK_GENS:  # the command as run, with a readable URL
        meta["commands"][g.name][-1] = meta["commands"][g.name][-1].replace(
            ":0/", ":PORT/")
    log(f"soak: gangway ({workers} worker) on CPU {pcpus}, wrk x2 and backends on CPU {lcpus}"
        + (" (shared)" if pcpus == lcpus else ""))
    samples: list[dict] = []
    res: dict = {}
    v: dict = {"verdict": "ERROR", "reasons": []}
    code = 2
    try:
        env.gangway_bin = given_gangway_bin(args)
        if env.gangway_bin is None:
            build_gangway(env)
        meta["versions"] = versions({"nginx": tools["nginx"], "wrk": tools["wrk"]},
                                    env.gangway_bin)
        make_cert(env)
        start_backends(env, max(1, len(env.load_cpu_list)))
        proc, ports = start_soak_gangway(env, workers, run_dir)
        meta["sanity"] = {"plain": sanity_check(ports["http"], False, SOAK_PLAIN_HOST),
                          "https": sanity_check(ports["https"], True)}
        run_soak(env, proc, ports, duration, run_dir, samples, res)
        meta["wrk"] = res.get("wrk")
        v = soak_verdict(samples, res, env)
        code = 0 if v["verdict"] == "PASS" else 1
    except KeyboardInterrupt:
        meta["interrupted"] = True
        meta["error"] = "interrupted"
        log("interrupted: stopping everything and writing what was sampled")
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        meta["error"] = str(e).strip()[:1500] or repr(e)
    finally:
        procs.stop_all()
        if code == 2 and samples:
            meta.setdefault("wrk", res.get("wrk"))
            v = dict(soak_verdict(samples, res, env), verdict="ERROR")
        meta.setdefault("versions", {})
        try:
            write_soak_outputs(args, meta, samples, v)
            if code != 0:
                keep_failed_run(env, {"ok": False}, run_dir)
        finally:
            drop_tmp(args, tmp)
    if meta.get("error"):
        log(f"soak: could not run: {meta['error'].splitlines()[0]}")
    else:
        log(f"soak: {v['verdict']}: RSS {fmt(v.get('ref_rss_mib'))} MiB after the first minute, "
            f"{fmt(v.get('end_rss_mib'))} MiB at the end (× {fmt(v.get('ratio'), 3)}, limit "
            f"{SOAK_LIMIT:.2f}), peak {fmt(v.get('peak_rss_mib'))} MiB; "
            + ("; ".join(v["reasons"]) if v["reasons"] else "no errors"))
    return code


# --------------------------------------------------------------------------------------
# Main


def cpu_plan(workers: int, ncpu: int, proxy_override: str | None, load_override: str | None
             ) -> tuple[str, str]:
    if proxy_override and load_override:
        return proxy_override, load_override
    if ncpu >= 2 * workers:
        proxy = ",".join(str(i) for i in range(workers))
        load = ",".join(str(i) for i in range(workers, 2 * workers))
    elif ncpu > workers:
        proxy = ",".join(str(i) for i in range(workers))
        load = ",".join(str(i) for i in range(workers, ncpu))
    else:
        # Not enough cores to keep them apart (2 workers on a 2-core machine): share.
        proxy = load = ",".join(str(i) for i in range(ncpu))
    return proxy_override or proxy, load_override or load


def parse_cpus(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 3 s measurements, 1 round, 1 s warm-up")
    ap.add_argument("--scenarios", default="1,2,3,4,5,6,7,8,9", help="comma list of 1-9")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3; quick 1)")
    ap.add_argument("--duration", type=float, default=None,
                    help=f"seconds per measurement (default 10; quick 3; max {MAX_DURATION:.0f})")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds of warm-up load before each measurement (default 2; quick 1)")
    ap.add_argument("--workers", default="1",
                    help="workers/threads per proxy: 1, 2, or 1,2 for both runs")
    ap.add_argument("--proxies", default=",".join(PROXIES),
                    help="subset and order of gangway,nginx,haproxy,caddy")
    ap.add_argument("--out", default=str(ROOT / "benches" / "results"))
    ap.add_argument("--idle-conns", type=int, default=10000)
    ap.add_argument("--idle-hold", type=float, default=None,
                    help="seconds the idle connections are held (default 5; quick 3)")
    ap.add_argument("--idle-open-budget", type=float, default=60.0,
                    help="seconds allowed to open the idle connections")
    ap.add_argument("--proxy-cpus", default=None, help="override the proxy's CPU list")
    ap.add_argument("--load-cpus", default=None, help="override the load generator's CPU list")
    ap.add_argument("--no-install", action="store_true", help="never run apt-get")
    ap.add_argument("--no-build", action="store_true", help="use the existing release binary")
    ap.add_argument("--gangway-bin", default=None,
                    help="benchmark this gangway binary instead of building target/release")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-pip", action="store_true", help="do not pip install matplotlib")
    ap.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    ap.add_argument("--perf", metavar="DIR", default=None,
                    help="record a `perf record` CPU profile of the proxy's CPUs during "
                    "each measured run into DIR (needs linux-perf)")
    ap.add_argument("--soak", type=float, default=None, metavar="SECONDS",
                    help=f"run only the soak: gangway under a steady load for SECONDS (at "
                    f"least {SOAK_MIN:.0f}, at most {SOAK_MAX:.0f}; issue 8 asks for 600), its "
                    f"RSS sampled every {SOAK_INTERVAL:.0f} s; writes soak.md, soak.json, "
                    "soak.png. Exit 0 PASS, 1 FAIL, 2 could not run")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 when any run failed, or a proxy or scenario was skipped "
                    "(CI's smoke run of the harness)")
    ap.add_argument("--loadgen", action="store_true",
                    help="also compare the load generators: wrk against `gangway load`, in "
                    "scenario 1's setup, through gangway and straight at a backend")
    a = ap.parse_args(argv)
    a.rounds = a.rounds if a.rounds is not None else (1 if a.quick else 3)
    a.duration = a.duration if a.duration is not None else (3.0 if a.quick else 10.0)
    a.warmup = a.warmup if a.warmup is not None else (1.0 if a.quick else 2.0)
    a.idle_hold = a.idle_hold if a.idle_hold is not None else (3.0 if a.quick else 5.0)
    if a.duration > MAX_DURATION:
        log(f"--duration {a.duration} capped at {MAX_DURATION:.0f} s")
        a.duration = MAX_DURATION
    a.scenario_ids = [int(s) for s in a.scenarios.split(",") if s.strip()]
    for s in a.scenario_ids:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s}")
    a.worker_list = [int(w) for w in a.workers.split(",") if w.strip()]
    if a.soak is not None:
        floor = soak_floor()
        if a.soak < floor:
            ap.error(f"--soak needs at least {floor:.0f} s (the reference is the memory "
                     f"after the first minute)")
        if a.soak > SOAK_MAX:
            log(f"--soak {a.soak:.0f} capped at {SOAK_MAX:.0f} s")
            a.soak = SOAK_MAX
    a.proxy_list = [p.strip() for p in a.proxies.split(",") if p.strip()]
    for p in a.proxy_list:
        if p not in PROXIES:
            ap.error(f"unknown proxy {p}")
    return a


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--idle-client":
        idle_client_main(argv[1:])
        return 0
    if argv and argv[0] == "--app-backend":
        app_backend_main(argv[1:])
        return 0
    args = parse_args(argv)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    if args.soak is not None:
        return soak_main(args, argv)

    tools = ensure_tools(not args.no_install)
    for need in ("nginx", "wrk", "openssl", "taskset"):
        if not tools.get(need):
            log(f"cannot run without {need}")
            return 2
    if args.perf and not shutil.which("perf"):
        log("--perf needs perf (Debian package linux-perf)")
        return 2
    skipped = []
    proxies = []
    for p in args.proxy_list:
        if p != "gangway" and not tools.get(p):
            skipped.append(f"{p} (not installed)")
            log(f"skipping {p}: not installed")
        else:
            proxies.append(p)
    scenario_ids = list(args.scenario_ids)
    for s in [s for s in scenario_ids if SCENARIOS[s].tool == "h2load"]:
        if not tools.get("h2load"):
            skipped.append(f"scenario {s} (h2load not installed)")
            scenario_ids.remove(s)

    ncpu = os.cpu_count() or 1
    idle_busy = busy_before_start("the benchmark starts: other programs are running and "
                                  "will distort the figures")
    fds = nofile_limit()
    if 6 in scenario_ids and fds < args.idle_conns + 2048:
        log(f"warning: open-files limit is {fds}; {args.idle_conns} idle connections plus "
            "upstream connections may not fit")
    tmp = Path(tempfile.mkdtemp(prefix="gangway-bench-"))
    procs = Procs()
    runs: list[dict] = []
    lg_runs: list[dict] = []
    meta: dict = {
        "irq_time_apart": irq_time_apart(),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python3 benches/run.py " + shlex.join(argv),
        "machine": machine_info(),
        "rounds": args.rounds, "duration": args.duration, "warmup": args.warmup,
        "proxies": proxies, "order": proxies + ["direct"], "scenarios": scenario_ids,
        "scenario_names": {s: SCENARIOS[s].name for s in scenario_ids},
        "workers": args.worker_list, "pinning": {}, "skipped": skipped,
        "idle_conns": args.idle_conns, "nofile_limit": fds, "cpu_busy_pct_before_start": idle_busy, "tmp": str(tmp),
    }
    interrupted = False
    env = None
    try:
        env = Env(args, tmp, procs, tools, "", "", [], [])
        if "gangway" in proxies or args.loadgen:  # --loadgen runs `gangway load` too
            env.gangway_bin = given_gangway_bin(args)
            if env.gangway_bin is None:
                try:
                    build_gangway(env)
                except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                    log(f"skipping gangway: {e}")
                    skipped.append(f"gangway ({e})")
                    if "gangway" in proxies:
                        proxies.remove("gangway")
        if args.loadgen:
            if env.gangway_bin is None:
                skipped.append("load generators (no gangway binary)")
                log("skipping --loadgen: no gangway binary")
            else:
                meta["loadgen_workers"] = args.worker_list[0]
                meta["loadgen_commands"] = {
                    "wrk": load_argv(SCENARIOS[1], "URL", 1, args.duration, None),
                    "gangway load": ["gangway", "load", "URL", "-c", str(SCENARIOS[1].conns),
                                     "-d", f"{max(1, round(args.duration))}s", "--admin",
                                     "off", "--json"]}
        meta["versions"] = versions(tools, env.gangway_bin)
        make_cert(env)
        for workers in args.worker_list:
            pcpus, lcpus = cpu_plan(workers, ncpu, args.proxy_cpus, args.load_cpus)
            env.proxy_cpus, env.load_cpus = pcpus, lcpus
            env.proxy_cpu_list, env.load_cpu_list = parse_cpus(pcpus), parse_cpus(lcpus)
            meta["pinning"][str(workers)] = {"proxy": pcpus, "load": lcpus}
            if pcpus == lcpus:
                log(f"only {ncpu} CPUs: with {workers} workers the proxy and the load "
                    f"generator share CPUs {pcpus}")
            start_backends(env, max(1, len(env.load_cpu_list)))
            if any(SCENARIOS[s].backend == "app" for s in scenario_ids):
                start_app(env)
            for rnd in range(1, args.rounds + 1):
                for s in scenario_ids:
                    scen = SCENARIOS[s]
                    names = list(proxies)
                    if scen.baseline and workers == args.worker_list[0]:
                        names.append("direct")
                    for name in names:
                        log(f"w{workers} round {rnd}/{args.rounds} scenario {scen.short}: "
                            f"{name} ...")
                        rec = one_run(env, name, scen, workers, rnd)
                        runs.append(rec)
                        log(f"    {name}: {describe(rec)}")
                if args.loadgen and env.gangway_bin and workers == args.worker_list[0]:
                    lg_runs += loadgen_round(env, workers, rnd)
            procs.stop(env.backend_proc)
            env.backend_proc = None
            if env.app_proc is not None:
                procs.stop(env.app_proc)
                env.app_proc = None
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping everything and writing partial results")
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        meta["fatal"] = traceback.format_exc().splitlines()[-1]
    finally:
        procs.stop_all()
        meta["interrupted"] = interrupted
        if "versions" not in meta:
            meta["versions"] = {}
        try:
            if runs or lg_runs:
                lg = write_outputs(args, meta, runs, lg_runs)
                if lg is not None:
                    print("\n".join(loadgen_markdown(meta, lg)), flush=True)
        finally:
            drop_tmp(args, tmp)
    if meta.get("fatal"):
        return 1
    if interrupted:
        return 130
    if args.strict:
        failed = [r for r in runs + lg_runs if not r.get("ok", True)]
        for r in failed:
            log(f"FAILED: w{r.get('workers')} scenario {r.get('scenario')} {r.get('proxy')}: "
                f"{r.get('error')}")
        for what in skipped:
            log(f"SKIPPED: {what}")
        if failed or skipped or not runs:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
