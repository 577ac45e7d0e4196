#!/usr/bin/env python3
"""Benchmark Sugar's /run beside the tools people would use instead.

Starts a fleet of real sshd hosts on loopback addresses with the shared
``fleet.py``, registers them with a real Sugar server over HTTP and times
``POST /run`` of ``true``: cold (the first run after the server starts,
every connection new) and warm (the second run, over kept connections),
for N = 200 and 50 hosts and WORKERS = 8 and 32, then ``seq 1 100000`` on
50 hosts.  In the same run, ``peers.py`` times OpenSSH with xargs, Fabric's
ThreadingGroup, a thread pool of Fabric connections and parallel-ssh on
the same fleet, each round right after Sugar's (the machine is shared,
and its speed drifts over minutes), and measures the CPU of one SSH
handshake and of one command over an open connection, from which the
lower bounds come:
N x (client + server CPU) / cores.  It also measures /register requests
per second with 50 concurrent callers (ab) beside a bare http.server, a
run on 200 hosts while registrations go on, the share of a warm run's
server CPU spent on HTTP, the registry and the logs, and the server's
memory over ten runs of ``seq 1 100000`` on 50 hosts.

Every address is loopback.  Run from the project folder, after
``./bootstrap --test``, as root::

    .venv/bin/python bench_sugar.py            # about 20 minutes

Medians of --runs (5) runs.  The machine is shared and noisy: read the
ratios, not the seconds.
"""

import argparse
import concurrent.futures
import datetime
import http.client
import http.server
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("SUGAR_SHARED_BENCH",
                        os.path.join(HERE, "..", "shared", "bench"))
TOKEN = "bench-token-0123456789"
PEERS = "openssh-xargs,fabric-group,fabric-pool,pssh-native"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fleet(command, *args):
    subprocess.run([sys.executable, os.path.join(SHARED, "fleet.py"),
                    command] + list(args), check=True,
                   stdout=subprocess.DEVNULL)


def fleet_hosts(folder):
    with open(os.path.join(folder, "fleet.json")) as state:
        return [(h["addr"], h["port"]) for h in json.load(state)["hosts"]]


class Api:
    """Sugar's HTTP API at *port* on loopback, with the bench's token."""

    def __init__(self, port):
        self.port = port

    def request(self, path, fields, timeout=600):
        connection = http.client.HTTPConnection("127.0.0.1", self.port,
                                                timeout=timeout)
        try:
            connection.request("POST", path, urllib.parse.urlencode(fields), {
                "Content-Type": "application/x-www-form-urlencoded",
                "Authorization": "Bearer " + TOKEN,
                "Accept": "application/json"})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def register(self, hosts):
        def one(number_host):
            number, (address, port) = number_host
            status, _ = self.request("/register", {
                "id": "host%04d" % number,
                "address": "%s:%d" % (address, port)})
            return status
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(one, enumerate(hosts)))
        assert all(s == 201 for s in statuses), statuses

    def run(self, command, target=None):
        """Seconds for one /run, checking every host ended ok."""
        fields = {"command": command}
        if target:
            fields["target"] = target
        clock = time.perf_counter()
        status, body = self.request("/run", fields)
        took = time.perf_counter() - clock
        totals = json.loads(body)["totals"]
        assert status == 200 and totals.get("ok") == totals["clients"], \
            totals
        return took

    def clients(self):
        """How many clients the registry lists."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port,
                                                timeout=60)
        try:
            connection.request("GET", "/clients", headers={
                "Authorization": "Bearer " + TOKEN,
                "Accept": "application/json"})
            return len(json.loads(connection.getresponse().read())[
                "clients"])
        finally:
            connection.close()


class Sugar(Api):
    """A Sugar server process for one measurement."""

    def __init__(self, folder, workers, key):
        self.folder = tempfile.mkdtemp(prefix="sugar-bench-", dir=folder)
        Api.__init__(self, free_port())
        env = dict(os.environ, TOKEN=TOKEN, PORT=str(self.port),
                   HOST="127.0.0.1", WORKERS=str(workers), SSH_KEY=key,
                   LOGGING="WARNING", LOG_DIR="logs")
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "sugar_server")],
            cwd=self.folder, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        if not self.process.stdout.readline():
            raise RuntimeError("sugar_server did not start: "
                               + self.process.stderr.read())

    def rss(self):
        with open("/proc/%d/status" % self.process.pid) as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024

    def stop(self):
        self.process.terminate()
        self.process.wait(60)
        shutil.rmtree(self.folder, ignore_errors=True)


def sugar_round(folder, hosts, workers, command, key):
    """Sugar's cold and warm /run and RSS per kept connection, on a new
    server.
    """
    sugar = Sugar(folder, workers, key)
    try:
        sugar.register(hosts)
        before = sugar.rss()
        cold = sugar.run(command)
        warm = sugar.run(command)
        return cold, warm, (sugar.rss() - before) / len(hosts)
    finally:
        sugar.stop()
        wait_idle(folder)


def side_by_side(folder, hosts, workers, command, runs, key, out):
    """Medians of Sugar's (cold, warm, memory) and of each peer's (cold,
    warm) over *runs* rounds.  Each round times Sugar, then every peer
    once, so that all see the shared machine in the same minutes; a first
    round warms the machine's caches and is dropped.
    """
    ours, theirs = [], {}
    for _ in range(runs + 1):
        ours.append(sugar_round(folder, hosts, workers, command, key))
        for tool, times in time_peers(folder, workers, command, out).items():
            theirs.setdefault(tool, []).append(times)
    ours = [statistics.median(r[i] for r in ours[1:]) for i in range(3)]

    def median(values):
        values = [v for v in values[1:] if v is not None]
        return statistics.median(values) if values else None
    return ours, {tool: (median([c for c, _ in times]),
                         median([w for _, w in times]))
                  for tool, times in theirs.items()}


def wait_idle(fleet_dir, most=30):
    """Wait until the fleet's sshd sessions of the last run have ended."""
    deadline = time.monotonic() + most
    while time.monotonic() < deadline:
        busy = subprocess.run(["pgrep", "-f", "sshd: root"],
                              capture_output=True).stdout.split()
        if not busy:
            return
        time.sleep(0.2)


def time_peers(fleet_dir, workers, command, out):
    """Each peer's (cold, warm) seconds for one fan-out."""
    path = os.path.join(out, "peers-%d-%s.json" % (workers, command[:3]))
    subprocess.run([sys.executable, os.path.join(SHARED, "peers.py"),
                    "--dir", fleet_dir, "-W", str(workers), "--runs", "1",
                    "--warmup", "0", "--tools", PEERS, "--json", path,
                    "--run-timeout", "120"] +
                   command.split(), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    with open(path) as result:
        summary = json.load(result)["summary"]
    return {s["tool"]: (s.get("fanout_median"), s.get("warm_median"))
            for s in summary if s.get("fanout_median")}


def handshake_costs(fleet_dir, out):
    path = os.path.join(out, "handshake.json")
    subprocess.run([sys.executable, os.path.join(SHARED, "peers.py"),
                    "handshake", "--dir", fleet_dir, "--count", "50",
                    "--json", path], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    with open(path) as result:
        for row in json.load(result)["results"]:
            if str(row.get("tool")).startswith("paramiko"):
                return (row["client_cpu_per_conn"] +
                        row["server_cpu_per_conn"],
                        row["exec_on_open_client_cpu"] +
                        row["exec_on_open_server_cpu"])
    raise RuntimeError("peers.py handshake measured no paramiko connection")


class Bare(http.server.BaseHTTPRequestHandler):
    """The yardstick for /register: answers 200 and nothing else."""

    protocol_version = "HTTP/1.0"

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"] or 0))
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args):
        pass


def requests_per_second(port, path, body_file, total=5000):
    answer = subprocess.run(
        ["ab", "-q", "-r", "-n", str(total), "-c", "50", "-p", body_file, "-T",
         "application/x-www-form-urlencoded",
         "http://127.0.0.1:%d%s" % (port, path)],
        capture_output=True, text=True)
    if answer.returncode:
        raise RuntimeError("ab failed: " + answer.stderr[-300:])
    for line in answer.stdout.splitlines():
        if line.startswith("Requests per second:"):
            return float(line.split()[3])
        if line.startswith("Non-2xx responses:"):
            raise RuntimeError("ab: " + line)
    raise RuntimeError("ab printed no rate:\n" + answer.stdout)


def register_load(folder, hosts, key):
    """/register rate beside a bare http.server, and a run meanwhile."""
    if not shutil.which("ab"):
        return None
    body = os.path.join(folder, "register.body")
    with open(body, "w") as file:
        file.write("id=loadclient&address=127.0.0.1")
    http.server.ThreadingHTTPServer.request_queue_size = 1024
    bare = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Bare)
    thread = threading.Thread(target=bare.serve_forever, daemon=True)
    thread.start()
    bare_rate = requests_per_second(bare.server_address[1], "/", body)
    bare.shutdown()
    bare.server_close()
    sugar = Sugar(folder, 32, key)
    try:
        sugar_rate = requests_per_second(sugar.port, "/register", body)
        sugar.register(hosts)
        done = []
        loader = threading.Thread(target=lambda: done.append(
            requests_per_second(sugar.port, "/register", body, 3000)))
        loader.start()
        run = sugar.run("true", target="host*")
        loader.join()
        kept = sugar.clients()
    finally:
        sugar.stop()
    assert kept == len(hosts) + 1, kept
    return sugar_rate, bare_rate, run, len(hosts), done


def memory_over_runs(folder, hosts, key, command, runs=10):
    """Sugar's RSS after registering, after one and after *runs* runs of
    *command*: as the launcher sets malloc (two arenas), then with
    glibc's default of 8 arenas per core (MALLOC_ARENA_MAX).
    """
    rss = {}
    for arenas in ("", str(8 * os.cpu_count())):
        if arenas:
            os.environ["MALLOC_ARENA_MAX"] = arenas
        try:
            sugar = Sugar(folder, 8, key)
        finally:
            os.environ.pop("MALLOC_ARENA_MAX", None)
        try:
            sugar.register(hosts)
            rss[arenas] = [sugar.rss()]
            for number in range(runs):
                sugar.run(command)
                if number in (0, runs - 1):
                    rss[arenas].append(sugar.rss())
        finally:
            sugar.stop()
            wait_idle(folder)
    return rss


def cost_shares(hosts, key, runs=10):
    """Shares of the server's CPU in warm runs spent outside SSH.

    Runs a Server in this process (as the launcher would) and counts, with
    `time.thread_time`, the CPU of the HTTP request threads (parsing,
    authentication, the registry read, the job start and the reply), of
    the job's end (its record and the registry's notes) and of the client
    logs, against the whole process's CPU over *runs* warm runs of `true`.
    """
    import functools
    sys.path.insert(0, HERE)
    import sugar
    spent = dict.fromkeys(("http", "registry", "finish", "logs"), 0.0)

    def count(owner, name, part):
        method = getattr(owner, name)

        @functools.wraps(method)
        def counted(*args, **kwargs):
            clock = time.thread_time()
            try:
                return method(*args, **kwargs)
            finally:
                spent[part] += time.thread_time() - clock
        setattr(owner, name, counted)
        return owner, name, method

    originals = [
        count(sugar._Handler, "handle_one_request", "http"),
        count(sugar._Registry, "clients", "registry"),
        count(sugar._Job, "_finish", "finish"),
        count(sugar._LogEntry, "__init__", "logs"),
        count(sugar._LogEntry, "close", "logs"),
        count(sugar._Sink, "write", "logs")]
    folder = tempfile.mkdtemp(prefix="sugar-bench-share-")
    server = sugar.Server(8, 0, host="127.0.0.1", token=TOKEN, ssh_key=key,
                          registry=os.path.join(folder, "registry"),
                          jobs=os.path.join(folder, "jobs"),
                          log_dir=os.path.join(folder, "logs"))
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        sugar_client = Api(server.address[1])
        sugar_client.register(hosts)
        sugar_client.run("true")
        sugar_client.run("true")
        for part in spent:
            spent[part] = 0.0
        clock = time.process_time()
        for _ in range(runs):
            sugar_client.run("true")
        total = time.process_time() - clock
    finally:
        server.shutdown()
        server.close(1)
        for owner, name, method in originals:
            setattr(owner, name, method)
        shutil.rmtree(folder, ignore_errors=True)
    return {part: cpu / total for part, cpu in spent.items()}, total / runs


def row(name, cold, warm):
    show = (lambda x: "%.2f" % x if x else "-")
    return "| %s | %s | %s |" % (name, show(cold), show(warm))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seq-runs", type=int, default=3,
                        help="runs of `seq 1 100000` (slow for some peers)")
    parser.add_argument("--fleet", default="/tmp/sugar-bench-fleet")
    parser.add_argument("--sizes", default="200,50")
    parser.add_argument("--load-only", action="store_true",
                        help="measure only /register and a run beside it")
    parser.add_argument("--workers", default="8,32")
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="sugar-bench-out-")
    sizes = [int(n) for n in args.sizes.split(",")]
    key = os.path.join(args.fleet, "key")
    lines = ["Measured %s on %d cores; medians of %d runs (%d for seq), "
             "seconds." % (datetime.date.today(), os.cpu_count(), args.runs,
                           args.seq_runs), ""]
    try:
        fleet("up", str(max(sizes)), "--dir", args.fleet)
        handshake, exec_cost = handshake_costs(args.fleet, out)
        if args.load_only:
            sizes = []
        lines.append("CPU per new connection %.1f ms, per command on an "
                     "open one %.1f ms (paramiko client + sshd)."
                     % (handshake * 1000, exec_cost * 1000))
        for size in sizes:
            fleet("up", str(size), "--dir", args.fleet)
            hosts = fleet_hosts(args.fleet)
            commands = [("true", w) for w in map(int,
                                                  args.workers.split(","))]
            if size == 50:
                commands.append(("seq 1 100000", 8))
            for command, workers in commands:
                runs = args.runs if command == "true" else args.seq_runs
                (cold, warm, memory), peers = side_by_side(
                    args.fleet, hosts, workers, command, runs, key, out)
                cores = os.cpu_count()
                lines += ["", "N=%d WORKERS=%d `%s`" % (size, workers,
                                                        command), "",
                          "| tool | cold | warm |", "|---|---|---|",
                          row("sugar", cold, warm)]
                lines += [row(tool, c, w) for tool, (c, w) in
                          sorted(peers.items())]
                if command == "true":
                    bound = size * handshake / cores
                    warm_bound = size * exec_cost / cores
                    lines.append(row("lower bound", bound, warm_bound))
                    lines.append("")
                    lines.append("sugar / lower bound: cold %.2f, warm %.2f"
                                 % (cold / bound, warm / warm_bound))
                # A peer that failed every round (timed out) has no time.
                best = min(c for c, _ in peers.values() if c is not None)
                warms = [w for _, w in peers.values() if w]
                lines.append("sugar / fastest peer: cold %.2f%s" % (
                    cold / best, ", warm %.2f" % (warm / min(warms))
                    if warms else ""))
                if command == "true":
                    lines.append("server memory per kept connection: "
                                 "%.0f KiB" % (memory / 1024))
                print("\n".join(lines[-12:]), flush=True)
            if size == 50:
                memory_runs = 10
                settled = memory_over_runs(args.fleet, hosts, key,
                                           "seq 1 100000", memory_runs)
                lines.append("")
                lines += ["server memory (RSS) on %d hosts, %s: %.0f MiB "
                          "registered, %.0f MiB after one run of `seq 1 "
                          "100000`, %.0f MiB after %d"
                          % ((size, "MALLOC_ARENA_MAX=" + arenas if arenas
                              else "as launched (two malloc arenas)")
                             + tuple(r / 2 ** 20 for r in rss)
                             + (memory_runs,))
                          for arenas, rss in settled.items()]
                print("\n".join(lines[-2:]), flush=True)
        fleet("up", str(max(sizes or [200])), "--dir", args.fleet)
        hosts = fleet_hosts(args.fleet)
        wait_idle(args.fleet)
        shares, per_run = cost_shares(hosts, key)
        lines += ["", "Server CPU of a warm run on %d hosts: %.0f ms, of "
                  "which the HTTP request (parsing, token, registry read, "
                  "job start, reply) %.1f %% (registry read alone %.1f %%), "
                  "the job's end (record, registry notes) %.1f %%, the "
                  "client logs %.1f %%; the rest is SSH."
                  % (len(hosts), per_run * 1000, 100 * shares["http"],
                     100 * shares["registry"], 100 * shares["finish"],
                     100 * shares["logs"])]
        print(lines[-1], flush=True)
        load = register_load(args.fleet, hosts, key)
        if load:
            sugar_rate, bare_rate, run, count, during = load
            lines += ["", "/register with 50 concurrent callers (ab): "
                      "%.0f/s, bare http.server %.0f/s: ratio %.2f"
                      % (sugar_rate, bare_rate, sugar_rate / bare_rate),
                      "/run on %d hosts while registering (%.0f/s "
                      "meanwhile): %.2f s, every host ok"
                      % (count, during[0] if during else 0, run)]
    finally:
        fleet("down", "--dir", args.fleet)
        shutil.rmtree(out, ignore_errors=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
