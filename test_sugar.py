"""Tests of Sugar against real OpenSSH servers on loopback addresses.

Each simulated client is its own /usr/sbin/sshd on 127.0.0.x with its own
host key; the test's user key is authorised there.  The Sugar server is
real too, on a free port, and every request goes over real HTTP.
"""

import base64
import contextlib
import getpass
import hashlib
import http.client
import io
import json
import logging
import os
import pwd
import re
import resource
import shelve
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

import sugar

HERE = os.path.dirname(os.path.abspath(__file__))
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
USER = getpass.getuser()
LOGIN_SHELL = os.path.basename(pwd.getpwnam(USER).pw_shell)
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
TOKEN = "test-token-0123456789"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
AUTHORISED = dict(FORM, Authorization="Bearer " + TOKEN)


# ---------------------------------------------------------------------------
# Fixtures: real sshd clients, a real Sugar server
# ---------------------------------------------------------------------------

def free_port(host="127.0.0.1"):
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class Sshd:
    """One real sshd on a loopback address: a simulated client machine."""

    def __init__(self, folder, ip, user_key, extra=()):
        self.folder = folder
        self.ip = ip
        self.port = free_port(ip)
        self.address = "%s:%d" % (ip, self.port)
        os.makedirs(folder, exist_ok=True)
        self.host_key = os.path.join(folder, "host_key")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "",
                        "-f", self.host_key], check=True)
        self.authorized = os.path.join(folder, "authorized_keys")
        shutil.copy(user_key + ".pub", self.authorized)
        self.config = os.path.join(folder, "sshd_config")
        with open(self.config, "w") as config:
            config.write("\n".join([
                "ListenAddress %s" % self.address,
                "HostKey %s" % self.host_key,
                "AuthorizedKeysFile %s" % self.authorized,
                "PidFile %s" % os.path.join(folder, "sshd.pid"),
                "UsePAM no", "StrictModes no",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "MaxStartups 100", "LogLevel ERROR",
                "Subsystem sftp internal-sftp",
                # Keeps bash from reading ~/.bashrc in each command.
                "SetEnv SHLVL=1",
            ] + list(extra) + [""]))
        self.process = None
        self.start()

    def start(self):
        self.process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", self.config],
            stderr=open(os.path.join(self.folder, "sshd.log"), "ab"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.ip, self.port), 1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sshd on %s did not start" % self.address)

    def stop(self):
        """Stop the listener and every session, as a machine going down."""
        if self.process and self.process.poll() is None:
            self.kill_sessions()
            self.process.terminate()
            self.process.wait(10)

    def sessions(self):
        """Pids of the per-connection sshd processes of this listener."""
        pids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open("/proc/%s/stat" % pid) as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == self.process.pid:
                pids.append(int(pid))
        return pids

    def kill_sessions(self):
        for pid in self.sessions():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def public_host_key(self):
        with open(self.host_key + ".pub") as public:
            return public.read().strip()

    def swap_host_key(self):
        """Restart with a new host key, as a re-installed machine would."""
        self.stop()
        os.remove(self.host_key)
        os.remove(self.host_key + ".pub")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "",
                        "-f", self.host_key], check=True)
        self.start()


@pytest.fixture(scope="session")
def user_key(tmp_path_factory):
    if not os.path.exists(SSHD):
        pytest.fail("OpenSSH server missing: run the README's test command")
    os.makedirs("/run/sshd", exist_ok=True) if os.geteuid() == 0 else None
    key = str(tmp_path_factory.mktemp("key") / "id_ed25519")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    key], check=True)
    return key


_next_ip = iter(range(2, 250))


@pytest.fixture
def make_sshd(tmp_path, user_key):
    started = []

    def make(extra=()):
        ip = "127.0.0.%d" % next(_next_ip)
        host = Sshd(str(tmp_path / ("sshd-" + ip)), ip, user_key, extra)
        started.append(host)
        return host

    yield make
    for host in started:
        host.stop()


@pytest.fixture
def fleet(make_sshd):
    return [make_sshd() for _ in range(3)]


class Running:
    """A Sugar server serving in a thread, with helpers to talk to it."""

    def __init__(self, folder, user_key, **options):
        self.folder = folder
        self.log_dir = os.path.join(folder, "logs")
        os.makedirs(folder, exist_ok=True)
        self.registry = os.path.join(folder, "registry")
        self.jobs = os.path.join(folder, "jobs")
        self.options = dict(host="127.0.0.1", registry=self.registry,
                            jobs=self.jobs, log_dir=self.log_dir,
                            ssh_key=user_key, connect_timeout=5,
                            token=TOKEN)
        self.options.update(options)
        self.start()

    def start(self):
        self.server = sugar.Server(port=0, **self.options)
        self.host, self.port = self.server.address
        self.url = "%s:%d" % (self.host, self.port)
        self.thread = threading.Thread(target=self.server.serve)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.thread.join(10)

    def restart(self):
        self.stop()
        self.start()

    def request(self, method, path, body=None, headers=None):
        """Send a request with the API token unless *headers* say otherwise.
        """
        headers = dict(headers or {})
        headers.setdefault("Authorization", "Bearer " + TOKEN)
        connection = http.client.HTTPConnection(self.host, self.port,
                                                timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.headers, \
                response.read().decode("utf-8")
        finally:
            connection.close()

    def post(self, path, headers=None, **fields):
        headers = dict(headers or {})
        headers.setdefault("Content-Type",
                           "application/x-www-form-urlencoded")
        return self.request("POST", path, urllib.parse.urlencode(fields),
                            headers)

    def register(self, sshd, client_id=None, **fields):
        fields.setdefault("username", USER)
        status, _, body = self.post(
            "/register", id=client_id or "id-%s" % sshd.ip.replace(".", "-"),
            address=sshd.address, **fields)
        assert status in (200, 201), body
        return body

    def run_json(self, command, **fields):
        status, _, body = self.post(
            "/run", {"Accept": "application/json"}, command=command,
            **fields)
        assert status == 200, body
        return json.loads(body)

    def log_files(self):
        return sorted(os.listdir(self.log_dir))

    def read_log(self, sshd):
        name = sshd.address.replace(":", "_") + ".txt"
        with open(os.path.join(self.log_dir, name), encoding="utf-8") as f:
            return f.read()


@pytest.fixture
def server(tmp_path, user_key):
    running = Running(str(tmp_path / "server"), user_key)
    yield running
    running.stop()


def launch(tmp_path, env=None, wait_for_line=True):
    """Start ./sugar_server in *tmp_path* with *env* added."""
    environ = dict(os.environ, PYTHONUNBUFFERED="1", TOKEN=TOKEN)
    environ.update(env or {})
    process = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "sugar_server")],
        cwd=str(tmp_path), env=environ, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    if wait_for_line:
        process.first_line = process.stdout.readline()
    return process


# ---------------------------------------------------------------------------
# The README's own lines
# ---------------------------------------------------------------------------

def readme_line(start):
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as readme:
        lines = [line.strip() for line in readme if line.strip()
                 .startswith(start)]
    assert lines, "README has no line starting %r" % start
    return lines[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="the README registers root")
def test_readme_curl_lines_register_and_run_as_written(
        server, fleet, tmp_path):
    register = readme_line('curl -d "address=client.fqdn&id=')
    run = readme_line('curl -u ":$TOKEN" -d "command=whoami"')
    for number, sshd in enumerate(fleet):
        machine_id = tmp_path / ("machine-id-%d" % number)
        machine_id.write_text("%032x\n" % (number + 1))
        line = (register.replace("client.fqdn", sshd.address)
                .replace("/etc/machine-id", str(machine_id))
                .replace("server:9999", server.url))
        answer = subprocess.run(["bash", "-c", line], capture_output=True,
                                text=True, check=True).stdout
        assert answer == "added client %032x at %s as root\n" % (
            number + 1, sshd.address)

    answer = subprocess.run(
        ["bash", "-c", run.replace("server:9999", server.url)],
        capture_output=True, text=True, check=True,
        env=dict(os.environ, TOKEN=TOKEN)).stdout

    width = max(len(sshd.address) for sshd in fleet)
    expected = ["%-*s  exit code 0" % (width, sshd.address)
                for sshd in sorted(fleet, key=lambda s: s.ip)]
    expected += ["--- %s stdout:" % ", ".join(
        sshd.address for sshd in sorted(fleet, key=lambda s: s.ip)), "root"]
    expected += ["3 clients: 3 ok", "job 1"]
    assert answer == "\n".join(expected) + "\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="the README registers root")
def test_readme_target_line_runs_in_an_interactive_shell(server, make_sshd):
    # History expansion, on in an interactive bash, would take "!web3"
    # in double quotes for an event and run nothing.
    server.post("/register", id="web3", address=make_sshd().address)
    line = readme_line('curl -u ":$TOKEN" \'server:9999/clients?target=')

    shell = subprocess.run(
        ["bash", "-i"], input=line.replace("server:9999", server.url) + "\n",
        capture_output=True, text=True, env=dict(os.environ, TOKEN=TOKEN))

    assert shell.stdout == ("target 'web*,!web3' matches no registered "
                            "client\n")


# ---------------------------------------------------------------------------
# Registering
# ---------------------------------------------------------------------------

def test_register_answers_added_then_updated_with_the_old_address(
        server, make_sshd):
    first, second = make_sshd(), make_sshd()
    status, _, body = server.post("/register", id="abc",
                                  address=first.address, username=USER)
    assert (status, body) == (201, "added client abc at %s as %s\n" % (
        first.address, USER))

    status, _, body = server.post("/register", id="abc",
                                  address=second.address, username=USER)

    assert (status, body) == (200, (
        "updated client abc at %s as %s (was %s as %s)\n"
        % (second.address, USER, first.address, USER)))
    assert [(e["id"], e["host"], e["port"])
            for e in server.server.registry.clients()] == [
        ("abc", second.ip, second.port)]


def test_register_without_address_takes_the_requesters_address(server):
    status, _, body = server.post("/register", id="m1")

    assert (status, body) == (201, "added client m1 at 127.0.0.1 as root\n")


def test_registry_survives_a_restart(server, fleet):
    for sshd in fleet:
        server.register(sshd)

    server.restart()

    assert sorted(e["id"] for e in server.server.registry.clients()) == \
        sorted("id-%s" % s.ip.replace(".", "-") for s in fleet)
    assert server.run_json("true")["totals"] == {"clients": 3, "ok": 3}


BAD_REGISTRATIONS = [
    ({"address": "a"}, "field 'id' is missing; send the machine's id, "
     "such as id=$(</etc/machine-id)"),
    ({"id": ""}, "field 'id': '' is not a machine id; send up to 128 "
     "letters, digits, '.', '_' or '-', starting with a letter or "
     "digit, without '..', such as the content of /etc/machine-id"),
    ({"id": "../etc"}, "field 'id': '../etc' is not a machine id; send up "
     "to 128 letters, digits, '.', '_' or '-', starting with a letter or "
     "digit, without '..', such as the content of /etc/machine-id"),
    ({"id": "a b"}, "field 'id': 'a b' is not a machine id; send up to 128 "
     "letters, digits, '.', '_' or '-', starting with a letter or "
     "digit, without '..', such as the content of /etc/machine-id"),
    ({"id": "x" * 129}, None),
]
NOT_A_HOST = ("field 'address': %r is not a host name or IP address; send "
              "a name such as web1.example.com (letters, digits and '-' "
              "between dots), an IPv4 address or an IPv6 address")
for bad in ["a/b", "../../etc/passwd", "a..b", "root@host", "a b", "a\nb",
            "a\x00b", "-host", "host-", "", "300.1.1.1", "[web1]:22"]:
    message = NOT_A_HOST % bad
    if bad == "[web1]:22":
        message = "field 'address': '[web1]:22': only IPv6 addresses go " \
            "in brackets"
    BAD_REGISTRATIONS.append(({"id": "m", "address": bad}, message))
for bad in ["host:0", "host:65536", "host:abc", "host:", "[::1]:x"]:
    BAD_REGISTRATIONS.append((
        {"id": "m", "address": bad},
        "field 'address': port %r is not a number from 1 to 65535"
        % bad.rsplit(":", 1)[1]))
BAD_REGISTRATIONS += [
    ({"id": "m", "address": "a" * 254},
     "field 'address': %r is not a host name or IP address; send a name "
     "such as web1.example.com (letters, digits and '-' between dots), an "
     "IPv4 address or an IPv6 address"
     % ("a" * 254)),
    ({"id": "m", "address": ("a" * 60 + ".") * 5},
     "field 'address': 305 characters is too long; a host name has at "
     "most 253"),
    ({"id": "m", "address": "http://127.0.0.1"},
     "field 'address': 'http://127.0.0.1' is not a host name or IP "
     "address; send the host alone (web1.example.com, 10.0.0.5, "
     "web1:2222), not a URL"),
]
for bad in ["", "1root", "-x", "ro ot", "a/b", "a" * 33, "r\u00f6ot"]:
    BAD_REGISTRATIONS.append((
        {"id": "m", "username": bad},
        "field 'username': %r is not a user name; use up to 32 letters, "
        "digits, '.', '_' or '-', not starting with '-' or a digit" % bad))
BAD_REGISTRATIONS += [
    ({"id": "m", "colour": "red"}, "field 'colour' is unknown; this "
     "endpoint takes id, address, username, hostkey, token"),
]


@pytest.mark.parametrize("fields,message", BAD_REGISTRATIONS)
def test_bad_registration_is_refused_and_nothing_is_stored(
        server, fields, message):
    status, _, body = server.post("/register", **fields)

    assert status == 400
    if message is not None:
        assert body == message + "\n"
    else:
        assert body.startswith("field 'id': ")
    assert server.server.registry.clients() == []
    assert server.log_files() == []


def test_a_field_given_twice_is_refused(server):
    status, _, body = server.request(
        "POST", "/register", "id=a&id=b",
        {"Content-Type": "application/x-www-form-urlencoded"})

    assert (status, body) == (400, "field 'id' is given twice; send it "
                              "once\n")
    assert server.server.registry.clients() == []


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------

def test_run_appends_the_exact_entry_to_the_clients_log(server, make_sshd):
    sshd = make_sshd()
    server.register(sshd)

    document = server.run_json("echo out; echo err >&2; exit 3")
    server.run_json("echo again")

    [result] = document["clients"]
    assert result["status"] == "failed"
    assert result["exit_code"] == 3
    assert (result["stdout"], result["stderr"]) == ("out\n", "err\n")
    assert server.log_files() == [sshd.address.replace(":", "_") + ".txt"]
    assert re.fullmatch(
        "=== (%s)\ncommand: echo out; echo err >&2; exit 3\n"
        "--- stdout ---\nout\n--- stderr ---\nerr\nresult: exit code 3\n"
        "=== end\n\n"
        "=== %s\ncommand: echo again\n--- stdout ---\nagain\n"
        "--- stderr ---\nresult: exit code 0\n=== end\n\n" % (STAMP, STAMP),
        server.read_log(sshd)).group(1) == result["started"]


def test_run_answers_one_line_per_client_then_output_then_totals(
        server, make_sshd):
    sshd = make_sshd()
    server.register(sshd)

    status, headers, body = server.post("/run", command="echo hi; false")

    assert status == 200
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert body == ("%s  exit code 1\n--- %s stdout:\nhi\n"
                    "1 client: 1 failed\nfailed: %s\njob 1\n"
                    % (sshd.address, sshd.address, sshd.address))


def test_run_as_json_has_every_field(server, make_sshd):
    sshd = make_sshd()
    server.register(sshd)

    document = server.run_json("printf hello")

    [client] = document["clients"]
    assert set(client) == {"id", "address", "username", "status",
                           "exit_code", "error", "stdout", "stderr",
                           "stdout_cut", "stderr_cut", "digest",
                           "started", "duration", "log"}
    assert (client["id"], client["address"], client["username"],
            client["status"], client["exit_code"], client["error"],
            client["stdout"], client["stderr"]) == (
        "id-%s" % sshd.ip.replace(".", "-"), sshd.address, USER, "ok", 0,
        None, "hello", "")
    assert (client["stdout_cut"], client["stderr_cut"]) == (0, 0)
    assert client["digest"] == hashlib.sha256(
        hashlib.sha256(b"hello").digest()
        + hashlib.sha256(b"").digest()).hexdigest()
    assert re.fullmatch(STAMP, client["started"])
    assert 0 < client["duration"] < 60
    assert client["log"] == os.path.join(
        os.path.realpath(server.log_dir),
        sshd.address.replace(":", "_") + ".txt")
    assert (document["job"], document["command"]) == (1, "printf hello")
    assert document["totals"] == {"clients": 1, "ok": 1}
    assert document["summary"] == {"ok": [sshd.address]}
    assert document["groups"] == [{"clients": [sshd.address], "status": "ok",
                                   "exit_code": 0,
                                   "digest": client["digest"]}]


def test_run_with_no_clients_says_there_were_none(server):
    status, _, body = server.post("/run", command="true")

    assert (status, body) == (200, (
        "no clients are registered, so nothing ran; register one with: "
        "curl -d \"id=$(</etc/machine-id)\" SERVER/register\njob 1\n"))


def test_unreachable_clients_do_not_stop_the_others(
        server, make_sshd, monkeypatch):
    good, stopped, failing = make_sshd(), make_sshd(), make_sshd()
    for sshd in (good, stopped, failing):
        server.register(sshd)
    server.post("/register", id="nowhere", address="no-such-host.invalid",
                username=USER)
    stopped.stop()
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        # The name server is not on loopback; tests never ask it.
        if host == "no-such-host.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name not known")
        return real_getaddrinfo(host, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)

    document = server.run_json(
        "case \"$SSH_CONNECTION\" in *' %s '*) exit 7;; esac" % failing.ip)

    outcomes = {c["address"]: (c["status"], c["exit_code"], c["error"])
                for c in document["clients"]}
    assert outcomes == {
        good.address: ("ok", 0, None),
        failing.address: ("failed", 7, None),
        stopped.address: ("unreachable", None, (
            "connection refused by %s port %d; check that sshd runs there "
            "and the registered address" % (stopped.ip, stopped.port))),
        "no-such-host.invalid": ("unreachable", None, (
            "cannot resolve host name 'no-such-host.invalid'; check the "
            "address registered for it")),
    }
    assert document["totals"] == {"clients": 4, "failed": 1, "ok": 1,
                                  "unreachable": 2}
    # No output, as for an ok run that printed nothing.
    assert {c["digest"] for c in document["clients"]} == {
        hashlib.sha256(hashlib.sha256(b"").digest() * 2).hexdigest()}


def test_each_exit_code_is_reported_per_client(server, fleet):
    for sshd in fleet:
        server.register(sshd)

    document = server.run_json(
        "exit $(echo $SSH_CONNECTION | cut -d' ' -f3 | cut -d. -f4)")

    assert sorted((c["address"], c["exit_code"], c["status"])
                  for c in document["clients"]) == sorted(
        (s.address, int(s.ip.split(".")[3]), "failed") for s in fleet)


def test_a_refused_key_is_reported_as_auth(server, make_sshd):
    sshd = make_sshd()
    open(sshd.authorized, "w").close()
    server.register(sshd)

    [client] = server.run_json("true")["clients"]

    assert (client["status"], client["error"]) == ("auth", (
        "authentication failed for %s@%s; add the server's key to the "
        "client's authorized_keys (ssh-copy-id)" % (USER, sshd.ip)))


def test_a_command_reading_stdin_gets_end_of_file_at_once(
        server, make_sshd):
    sshd = make_sshd()
    server.register(sshd)

    [client] = server.run_json("cat; read line; echo read=$?")["clients"]

    assert (client["stdout"], client["exit_code"]) == ("read=1\n", 0)


def test_output_that_is_not_utf8_is_logged_as_escapes(server, make_sshd):
    sshd = make_sshd()
    server.register(sshd)

    [client] = server.run_json(r"printf 'ok \377\376 end\n'")["clients"]

    assert client["stdout"] == "ok \\xff\\xfe end\n"
    assert "--- stdout ---\nok \\xff\\xfe end\n" in server.read_log(sshd)


def test_multibyte_output_across_read_boundaries_is_kept_whole(
        server, make_sshd):
    sshd = make_sshd()
    server.register(sshd)
    # 999 bytes, then two-byte characters straddling every later boundary.
    command = "head -c 999 /dev/zero | tr '\\0' a; " \
        "for i in $(seq 3000); do printf '\\303\\251'; done"

    [client] = server.run_json(command)["clients"]

    expected = "a" * 999 + "\u00e9" * 3000
    assert client["stdout"] == expected
    assert "\ufffd" not in server.read_log(sshd)
    assert "--- stdout ---\n%s\n" % expected in server.read_log(sshd)


def test_split_characters_are_decoded_whole_at_any_split():
    data = ("a\u00e9\u20ac\U0001f600" * 3).encode("utf-8")
    for size in range(1, 8):
        log = io.StringIO()
        stream = sugar._Stream(sugar._Sink(log), 1024)
        for start in range(0, len(data), size):
            stream.feed(data[start:start + size])
        assert stream.finish()[0] == log.getvalue() == data.decode("utf-8")


def test_a_cut_tail_starts_at_a_whole_character():
    data = ("\u20ac" * 2000).encode("utf-8")
    for limit in (1024, 1025, 1026):
        stream = sugar._Stream(sugar._Sink(io.StringIO()), limit)
        stream.feed(data)
        tail, _ = stream.finish()
        assert set(tail) == {"\u20ac"}
        assert stream.cut + len(tail.encode("utf-8")) == len(data)


def most_at_once(spans):
    """The most commands running at once, from their start and end lines
    in the file *spans*.
    """
    events = sorted((float(t), kind == "start") for kind, t in
                    (line.split() for line in spans.read_text().splitlines()))
    open_now = most = 0
    for _, starting in events:
        open_now += 1 if starting else -1
        most = max(most, open_now)
    return most


def test_workers_caps_new_sessions_and_kept_ones_run_wider(
        tmp_path, user_key, make_sshd):
    running = Running(str(tmp_path / "capped"), user_key, workers=2)
    cold, warm = tmp_path / "cold", tmp_path / "warm"
    try:
        hosts = [make_sshd() for _ in range(6)]
        for sshd in hosts:
            running.register(sshd)
        documents = [running.run_json(
            "echo start $(date +%%s.%%N) >> %s; sleep 0.5; "
            "echo end $(date +%%s.%%N) >> %s" % (spans, spans))
            for spans in (cold, warm)]
    finally:
        running.stop()

    assert [d["totals"] for d in documents] == [{"clients": 6, "ok": 6}] * 2
    assert (most_at_once(cold), most_at_once(warm)) == (2, 6)


def test_library_client_runs_a_command_and_logs_it(tmp_path, user_key,
                                                    make_sshd):
    sshd = make_sshd()
    client = sugar.Client(sshd.address, USER, log_dir=str(tmp_path),
                          ssh_key=user_key)

    result = client.run_command("echo library")

    assert (result.status, result.exit_code, result.stdout,
            result.stderr) == ("ok", 0, "library\n", "")
    assert result.ok
    with open(os.path.join(tmp_path, sshd.address.replace(":", "_")
                           + ".txt"), encoding="utf-8") as log:
        assert "command: echo library\n--- stdout ---\nlibrary\n" \
            "--- stderr ---\nresult: exit code 0\n" in log.read()


def test_key_exchange_prefers_p256_and_falls_back_to_what_sshd_allows(
        tmp_path, user_key, make_sshd, caplog):
    caplog.set_level(logging.DEBUG, logger="paramiko.transport")
    default = make_sshd()
    curve_only = make_sshd(["KexAlgorithms curve25519-sha256@libssh.org"])

    results = [sugar.Client(sshd.address, USER, log_dir=str(tmp_path),
                            ssh_key=user_key).run_command("true").status
               for sshd in (default, curve_only)]

    assert results == ["ok", "ok"]
    assert [r.getMessage() for r in caplog.records
            if r.getMessage().startswith("Kex: ")] == [
        "Kex: ecdh-sha2-nistp256", "Kex: curve25519-sha256@libssh.org"]


def test_a_replaced_ssh_key_file_is_read_again(tmp_path, user_key,
                                                make_sshd):
    sshd = make_sshd()
    key = str(tmp_path / "key")
    shutil.copy(user_key, key)

    def run():
        return sugar.Client(sshd.address, USER, log_dir=str(tmp_path),
                            ssh_key=key).run_command("true").status

    first = run()
    os.remove(key)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    key], check=True)

    assert (first, run()) == ("ok", "auth")


@pytest.mark.parametrize("change, why", [
    ("remove", "No such file or directory"),
    ("garble", "not a private key Sugar can read")])
def test_an_ssh_key_that_cannot_be_read_any_more_is_said_for_runs_and_pubkey(
        tmp_path, user_key, make_sshd, change, why):
    key = str(tmp_path / "key")
    shutil.copy(user_key, key)
    running = Running(str(tmp_path / "server"), key)
    sshd = make_sshd()
    try:
        running.register(sshd)
        if change == "remove":
            os.remove(key)
        else:
            with open(key, "w") as garbled:
                garbled.write("-----BEGIN OPENSSH PRIVATE KEY-----\nxyz\n")
        [result] = running.run_json("true")["clients"]
        pubkey = running.request("GET", "/pubkey")
    finally:
        running.stop()

    problem = ("the server's SSH key %s cannot be used (%s); restore it, or "
               "restart the server with SSH_KEY naming an unencrypted "
               "private key" % (key, why))
    assert (result["status"], result["error"]) == (
        "auth", problem + ", so the command did not run")
    assert pubkey[0::2] == (404, problem + "\n")


def test_a_server_without_any_ssh_key_says_so_for_each_client(
        tmp_path, make_sshd, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    sshd = make_sshd()
    client = sugar.Client(sshd.address, USER, log_dir=str(tmp_path))

    result = client.run_command("true")

    assert (result.status, result.error) == ("auth", (
        "the server has no SSH key to log in to %s@%s port %d with; set "
        "SSH_KEY, or create one with ssh-keygen -t ed25519, and give it to "
        "the client (ssh-copy-id)" % (USER, sshd.ip, sshd.port)))


def test_log_file_names_stay_inside_the_log_folder():
    assert sugar._log_name("::1") == "__1.txt"
    assert sugar._log_name("[fe80::1]:2222") == "_fe80__1__2222.txt"
    assert sugar._log_name("web1.example.com:22") == "web1.example.com_22.txt"
    for bad in ["../x", "a/b", "..", ".", "x/../../y"]:
        with pytest.raises(sugar._BadField):
            sugar._parse_address(bad)


def test_addresses_are_parsed_in_every_form():
    assert sugar._parse_address("web1") == ("web1", 22)
    assert sugar._parse_address("web1.example.com.:2200") == (
        "web1.example.com.", 2200)
    assert sugar._parse_address("10.0.0.1:2222") == ("10.0.0.1", 2222)
    assert sugar._parse_address("::1") == ("::1", 22)
    assert sugar._parse_address("[::1]:2222") == ("::1", 2222)
    assert sugar._parse_address("fe80::1%eth0") == ("fe80::1%eth0", 22)


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------

def test_a_trailing_slash_names_the_same_path(server, make_sshd):
    server.register(make_sshd(), "web1")

    listed = server.request("GET", "/clients/")[0::2]
    shown = server.request("GET", "/clients/web1/")[0::2]

    assert listed == server.request("GET", "/clients")[0::2]
    assert listed[0] == 200 and "web1" in listed[1]
    assert shown == server.request("GET", "/clients/web1")[0::2]
    assert shown[0] == 200


def test_unknown_path_is_404_naming_it(server):
    status, _, body = server.request("GET", "/nope")

    assert (status, body) == (404, "no such path: '/nope'; Sugar answers "
                              "/, /register, /run, /clients, /clients/<id>, "
                              "/jobs, /jobs/<id>, /pubkey\n")


def test_wrong_method_is_405_with_allow(server):
    status, headers, body = server.request("GET", "/run")

    assert (status, headers["Allow"], body) == (
        405, "POST", "GET is not allowed on /run; use POST\n")


def test_body_that_is_not_a_form_is_415(server):
    status, _, body = server.request(
        "POST", "/run", '{"command": "true"}',
        {"Content-Type": "application/json"})

    assert (status, body) == (415, (
        "Content-Type 'application/json' is not "
        "application/x-www-form-urlencoded; send the fields as with "
        "curl -d\n"))


def test_body_over_64_kib_is_413(server):
    status, _, body = server.post("/run", command="x" * 65536)

    assert status == 413
    assert body == ("body of 65544 bytes is over the limit of 65536 "
                    "bytes (64 KiB for a form); send less\n")


def raw_answer(server, data):
    """The status and body *server* answers to *data*, sent as it is."""
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(data)
        head, _, body = sock.makefile("rb").read().decode().partition(
            "\r\n\r\n")
    return int(head.split()[1]), body


def test_a_path_sent_in_utf8_is_read_as_utf8(server):
    answer = raw_answer(server, ("GET /clients/é HTTP/1.1\r\nHost: x\r\n"
                        "Authorization: Bearer %s\r\nConnection: close"
                        "\r\n\r\n" % TOKEN).encode())

    assert answer == (404, "no client 'é'; GET /clients lists them\n")


def test_missing_content_length_is_411(server):
    answer = raw_answer(server, b"POST /run HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Type: application/x-www-form-urlencoded"
                        b"\r\nAuthorization: Bearer %s\r\n\r\n"
                        % TOKEN.encode())

    assert answer == (411, "Content-Length is missing; send the form with "
                      "a length (curl -d does)\n")


def test_invalid_content_length_is_400(server):
    status, _, body = server.request("POST", "/run", None, dict(
        FORM, **{"Content-Length": "-5"}))

    assert (status, body) == (400, "Content-Length '-5' is not a count of "
                              "bytes; send the body's length\n")


@pytest.mark.parametrize("name, value", [
    ("Content-Length", b"9"), ("Idempotency-Key", b"deploy-2"),
    ("Authorization", b"Bearer wrong"), ("Content-Type", b"text/plain")])
def test_a_header_given_twice_is_400(server, name, value):
    answer = raw_answer(server, b"POST /run HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Type: application/x-www-form-urlencoded"
                        b"\r\nAuthorization: Bearer %s\r\nIdempotency-Key: "
                        b"deploy-1\r\nContent-Length: 9\r\n%s: %s\r\n\r\n"
                        b"command=:" % (TOKEN.encode(), name.encode(), value))

    assert answer == (400, "header %r is given more than once; send it "
                      "once\n" % name)


@pytest.mark.parametrize("line, status, message", [
    (b"GET /", 400, "the request line has no HTTP version; send HTTP/1.1 "
     "(as curl does)"),
    (b"HELLO", 400, "the request line 'HELLO' is not a method, a path and "
     "an HTTP version; send one such as GET / HTTP/1.1 (as curl does)"),
    (b"FOO / HTTP/1.1", 501, "method 'FOO' is not one Sugar answers; use "
     "GET, POST or DELETE (GET / lists the endpoints)"),
    (b"GET / HTTP/2.0", 505, "HTTP version 'HTTP/2.0' is not one Sugar "
     "speaks; use HTTP/1.1 (as curl does)"),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1", 414, "the request line is over "
     "64 KiB; send a shorter path and query"),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 70000, 431, "a header line is over 64 "
     "KiB, or there are over 100 headers; send fewer and shorter headers"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, "this port "
     "speaks plain HTTP, not HTTPS; use http://, or start Sugar with "
     "TLS_CERT and TLS_KEY")])
def test_a_request_line_sugar_cannot_take_gets_a_status_and_one_line(
        server, line, status, message):
    answer = raw_answer(server, line + b"\r\n\r\n")

    assert answer == (status, message + "\n")


def test_a_header_line_without_a_colon_is_400(server):
    answer = raw_answer(server, b"POST /run HTTP/1.1\r\nHost: x\r\n"
                        b"Authorization: Bearer %s\r\nNo colon here\r\n"
                        b"Content-Type: application/x-www-form-urlencoded"
                        b"\r\nContent-Length: 9\r\n\r\ncommand=:"
                        % TOKEN.encode())

    assert answer == (400, "a header line has no colon; send each header "
                      "as Name: value\n")
    assert server.request("GET", "/jobs")[2] == "no jobs yet\n"


def test_a_body_on_a_request_that_takes_none_is_400(server):
    status, _, body = server.request("GET", "/clients", b"x=1", FORM)

    assert (status, body) == (400, "GET /clients takes no body; send it "
                              "without one\n")


@pytest.mark.parametrize("body, message", [
    (b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n",
     "a part of the body has no field name; send the fields as with curl -F "
     "name=value"),
    (b'--b\r\nContent-Disposition: form-data; name="command"\r\n\r\n'
     b'echo cut', "the multipart body has no closing boundary, so it may be "
     "cut short; send it whole, as curl -F does")])
def test_a_multipart_body_sugar_cannot_read_is_400(server, body, message):
    status, _, answer = server.request("POST", "/run", body, {
        "Content-Type": "multipart/form-data; boundary=b"})

    assert (status, answer) == (400, message + "\n")
    assert server.request("GET", "/jobs")[2] == "no jobs yet\n"


def test_blanks_around_a_header_value_are_allowed(server, make_sshd):
    server.register(make_sshd())

    status, _, body = server.request("POST", "/run", b"command=true", {
        "Content-Type": " %s " % FORM["Content-Type"],
        "Content-Length": "12 "})

    assert (status, body.splitlines()[-2:]) == (200, ["1 client: 1 ok",
                                                     "job 1"])


@pytest.mark.parametrize("method, path, body, message", [
    ("POST", "/run", b"command=%ff",
     "field 'command' is not valid UTF-8; send it in UTF-8"),
    ("POST", "/run", b"%ff=1", "the body has a name that is not valid "
     "UTF-8; send names and values in UTF-8"),
    ("POST", "/run", b"command", "the body has 'command' without '='; "
     "send name=value pairs, and a value holding &, + or % with curl "
     "--data-urlencode"),
    ("POST", "/run", b"command=df -h / && date", "the body has ' date' "
     "without '='; send name=value pairs, and a value holding &, + or % "
     "with curl --data-urlencode"),
    ("GET", "/jobs?target=%ff", None,
     "query 'target' is not valid UTF-8; send it in UTF-8"),
    ("GET", "/jobs?bogus", None, "the query string has 'bogus' without "
     "'='; send name=value pairs"),
    ("POST", "/register", b"&".join(b"id=%d" % n for n in range(20)),
     "the body has too many fields; this endpoint takes id, address, "
     "username, hostkey, token, each once"),
    ("GET", "/clients?target=a&b=1&c=2", None, "the query string has too "
     "many fields; this endpoint takes target, each once")])
def test_a_form_that_is_not_utf8_or_not_urlencoded_is_400(
        server, method, path, body, message):
    status, _, answer = server.request(method, path, body, FORM)

    assert (status, answer) == (400, message + "\n")


def test_missing_and_empty_command_are_400(server):
    assert server.post("/run")[0::2] == (
        400, "field 'command' is missing; send the shell command to run (or "
        "'url', 'script' or 'rerun')\n")
    assert server.post("/run", command=" ")[0::2] == (
        400, "field 'command' is empty; send the shell command to run\n")


def test_errors_are_json_when_json_is_asked_for(server):
    status, headers, body = server.post(
        "/run", {"Accept": "application/json"})

    assert (status, headers["Content-Type"], json.loads(body)) == (
        400, "application/json", {"error": "field 'command' is missing; "
                                  "send the shell command to run (or 'url', "
                                  "'script' or 'rerun')"})


def test_an_unexpected_error_is_500_and_the_server_goes_on(
        server, monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(server.server.registry, "register", broken)

    status, _, body = server.post("/register", id="m")
    monkeypatch.undo()

    assert (status, body) == (500, "internal error in Sugar; the server "
                              "log has the details\n")
    assert "RuntimeError: disk on fire" in caplog.text
    assert server.post("/register", id="m")[0] == 201


def test_requests_are_logged_through_the_sugar_logger(server, caplog):
    with caplog.at_level("INFO", logger="sugar"):
        server.request("GET", "/")

    assert any(r.name == "sugar" and '"GET / HTTP/1.1" 200' in r.message
               for r in caplog.records)


# ---------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("env,line", [
    ({"PORT": "abc"}, "PORT='abc' is not allowed; use a whole number from "
     "1 to 65535"),
    ({"PORT": "70000"}, "PORT='70000' is not allowed; use a whole number "
     "from 1 to 65535"),
    ({"WORKERS": "0"}, "WORKERS='0' is not allowed; use a whole number "
     "from 1 to 1024"),
    ({"WORKERS": "many"}, "WORKERS='many' is not allowed; use a whole "
     "number from 1 to 1024"),
    ({"LOGGING": "LOUD"}, "LOGGING='LOUD' is not allowed; use one of DEBUG, "
     "INFO, WARNING, ERROR, CRITICAL"),
    ({"CONNECT_TIMEOUT": "-1"}, "CONNECT_TIMEOUT='-1' is not allowed; use "
     "a number from 0.1 to 3600 seconds"),
    ({"HOST": "a/b"}, "HOST='a/b' is not allowed; use an IP address or "
     "host name of this machine, or leave it unset for all"),
    ({"HOST": "192.0.2.1", "PORT": "0"}, "PORT='0' is not allowed; use a "
     "whole number from 1 to 65535"),
    ({"SSH_KEY": "/nonexistent"}, "SSH_KEY='/nonexistent' cannot be read; "
     "name a private key file this user can read"),
])
def test_bad_launcher_setting_stops_with_one_line(tmp_path, env, line):
    process = launch(tmp_path, env, wait_for_line=False)
    out, err = process.communicate(timeout=30)

    assert (process.returncode, out, err) == (2, "", "sugar: %s\n" % line)


def test_launcher_refuses_a_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = launch(tmp_path, {"PORT": str(port), "HOST": "127.0.0.1"},
                         wait_for_line=False)
        out, err = process.communicate(timeout=30)

    assert (process.returncode, err) == (2, (
        "sugar: PORT=%d: port %d is already in use; stop what listens "
        "there or set PORT to a free port\n" % (port, port)))


@pytest.mark.parametrize("signum,said", [
    (signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
def test_launcher_starts_in_its_folder_and_stops_cleanly(
        tmp_path, signum, said):
    port = free_port()
    process = launch(tmp_path, {"PORT": str(port), "HOST": "127.0.0.1"})
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=9)
        connection.request("POST", "/register", "id=m1", FORM)
        assert connection.getresponse().status == 201
    finally:
        process.send_signal(signum)
        out, err = process.communicate(timeout=30)

    assert process.first_line == (
        "sugar: listening on 127.0.0.1 port %d (registry %s, logs in %s); "
        "press Ctrl-C or send SIGTERM to stop\n"
        % (port, tmp_path / "sugar-registry", tmp_path))
    assert (process.returncode, out) == (0, (
        "sugar: stopping on %s; running jobs get 30s to finish\n"
        "sugar: stopped\n" % said))
    assert "Traceback" not in err
    assert any(name.startswith("sugar-registry")
               for name in os.listdir(tmp_path))


def test_importing_sugar_starts_nothing(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, %r); "
         "import sugar, threading; print(threading.active_count())" % HERE],
        cwd=str(tmp_path), capture_output=True, text=True, check=True)

    assert (out.stdout, out.stderr) == ("1\n", "")
    assert os.listdir(tmp_path) == []


def test_all_names_the_public_surface():
    assert sorted(sugar.__all__) == sorted(
        name for name in vars(sugar) if not name.startswith("_")
        and getattr(getattr(sugar, name), "__module__", None) == "sugar")


# ---------------------------------------------------------------------------
# Statuses, timeouts, bounded output, grouping, streaming
# ---------------------------------------------------------------------------

def running_as(*argv):
    """Pids of processes whose command line is exactly *argv*."""
    wanted = "".join(arg + "\0" for arg in argv).encode()
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as cmdline:
                if cmdline.read() == wanted:
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def wait_while(busy, seconds=5):
    """Wait until ``busy()`` is false, at most *seconds*."""
    deadline = time.monotonic() + seconds
    while busy() and time.monotonic() < deadline:
        time.sleep(0.1)


def sleeping(marker):
    """Pids of processes whose command line is exactly ``sleep <marker>``."""
    return running_as("sleep", marker)


@contextlib.contextmanager
def left_running(server, command, marker):
    """Run *command*, which leaves ``sleep <marker>`` running on the
    client; kill what is left of it at the end.
    """
    server.run_json(command)
    try:
        yield
    finally:
        for pid in sleeping(marker):
            os.kill(pid, signal.SIGKILL)


def test_timeout_stops_the_slow_command_and_not_the_others(server, fleet):
    for sshd in fleet:
        server.register(sshd)
    slow = fleet[1]
    command = "case \"$SSH_CONNECTION\" in *' %s '*) sleep 600.25;; esac; " \
        "echo done" % slow.ip
    clock = time.monotonic()

    status, _, body = server.post("/run", {"Accept": "application/json"},
                                  command=command, timeout="2")

    took = time.monotonic() - clock
    print("timeout=2 run took %.2fs" % took)
    outcomes = {c["address"]: (c["status"], c["exit_code"], c["error"],
                               c["stdout"])
                for c in json.loads(body)["clients"]}
    expected = {sshd.address: ("ok", 0, None, "done\n") for sshd in fleet}
    expected[slow.address] = ("timeout", None, "ran past its 2s limit and "
                              "was stopped", "")
    assert outcomes == expected
    assert 2 <= took < 8, took
    wait_while(lambda: sleeping("600.25"))
    assert sleeping("600.25") == []
    assert "result: timeout: ran past its 2s limit and was stopped\n" in \
        server.read_log(slow)


@pytest.mark.parametrize("pool", [True, False])
def test_a_command_flooding_output_is_still_stopped_at_its_limit(
        tmp_path, user_key, make_sshd, pool):
    # Output always waiting to be read must not hide the time limit.
    running = Running(str(tmp_path / "flood"), user_key, pool=pool)
    sshd = make_sshd()
    try:
        running.register(sshd)
        [flood] = running.run_json("yes", timeout="1")["clients"]
        [after] = running.run_json("echo after")["clients"]
    finally:
        running.stop()

    assert (flood["status"], flood["error"], flood["stdout_cut"] > 0) == (
        "timeout", "ran past its 1s limit and was stopped", True)
    # The limit, the 2 s between TERM and KILL, and slack for a busy host.
    assert flood["duration"] < 8, flood["duration"]
    assert (after["status"], after["stdout"]) == ("ok", "after\n")


def test_command_timeout_setting_is_the_default_limit(
        tmp_path, user_key, make_sshd):
    running = Running(str(tmp_path / "t"), user_key, command_timeout=1)
    try:
        running.register(make_sshd())
        [client] = running.run_json("sleep 30.5")["clients"]
    finally:
        running.stop()

    assert (client["status"], client["error"]) == (
        "timeout", "ran past its 1s limit and was stopped")


def test_a_command_that_ignores_sigterm_is_killed_at_its_limit(
        server, make_sshd):
    sshd = make_sshd()
    server.register(sshd)

    status, _, body = server.post(
        "/run", {"Accept": "application/json"}, timeout="1",
        command="trap '' TERM; echo started; sleep 600.75")

    [client] = json.loads(body)["clients"]
    assert (client["status"], client["stdout"]) == ("timeout", "started\n")
    wait_while(lambda: sleeping("600.75"))
    assert sleeping("600.75") == []


def test_the_shell_reports_a_syntax_error_as_over_plain_ssh(
        server, make_sshd):
    server.register(make_sshd())

    [client] = server.run_json("true\necho (")["clients"]

    assert (client["status"], client["exit_code"], client["stderr"]) == (
        "failed", 2, "bash: -c: line 2: syntax error near unexpected token "
        "`newline'\nbash: -c: line 2: `echo ('\n")


@pytest.mark.parametrize("greeting, error", [
    (b"", "no SSH server answered at 127.0.0.1 port %d within 1.5s; check "
     "that sshd listens there"),
    (b"SSH-2.0-OpenSSH_9.2p1\r\n", "sshd at 127.0.0.1 port %d answered, but "
     "the SSH handshake did not finish within 1.5s; check that it is not "
     "overloaded, or raise CONNECT_TIMEOUT")])
def test_a_client_that_stalls_before_logging_in_is_unreachable(
        tmp_path, user_key, greeting, error):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    accepted = []

    def greet():
        with contextlib.suppress(OSError):
            while True:
                accepted.append(listener.accept()[0])
                accepted[-1].sendall(greeting)
    threading.Thread(target=greet, daemon=True).start()
    running = Running(str(tmp_path / "silent"), user_key,
                      connect_timeout=1.5)
    try:
        running.post("/register", id="silent", address="127.0.0.1:%d" % port)
        clock = time.monotonic()
        [client] = running.run_json("true")["clients"]
        took = time.monotonic() - clock
    finally:
        running.stop()
        listener.close()
        for connection in accepted:
            connection.close()

    assert (client["status"], client["error"]) == ("unreachable",
                                                   error % port)
    assert took < 6, took


def test_every_status_is_counted_and_listed_in_the_recap(
        server, make_sshd):
    good, bad, refused, stopped = (make_sshd() for _ in range(4))
    for sshd in (good, bad, refused, stopped):
        server.register(sshd)
    open(refused.authorized, "w").close()
    stopped.stop()

    status, _, body = server.post(
        "/run", command="case \"$SSH_CONNECTION\" in *' %s '*) exit 4;; "
        "esac" % bad.ip)

    assert status == 200
    assert body.endswith(
        "4 clients: 1 ok, 1 failed, 1 unreachable, 1 auth\n"
        "ok: %s\nfailed: %s\nunreachable: %s\nauth: %s\njob 1\n"
        % (good.address, bad.address, stopped.address, refused.address))


def test_identical_output_is_shown_once_under_its_clients(server, fleet):
    for sshd in fleet:
        server.register(sshd)
    odd = fleet[2]
    command = "echo same; case \"$SSH_CONNECTION\" in *' %s '*) " \
        "echo other >&2;; esac" % odd.ip

    text = server.post("/run", command=command)[2]
    document = server.run_json(command)

    together = ", ".join(s.address for s in fleet[:2])
    assert text.split("\n")[3:] == [
        "--- %s stdout:" % together, "same",
        "--- %s stdout:" % odd.address, "same",
        "--- %s stderr:" % odd.address, "other",
        "3 clients: 3 ok", "job 1", ""]
    same = [c["digest"] for c in document["clients"]]
    assert same[0] == same[1] != same[2]
    assert document["groups"] == [
        {"clients": [s.address for s in fleet[:2]], "status": "ok",
         "exit_code": 0, "digest": same[0]},
        {"clients": [odd.address], "status": "ok", "exit_code": 0,
         "digest": same[2]}]
    assert len(document["clients"]) == 3


def test_output_over_the_limit_keeps_the_tail_and_says_so(
        tmp_path, user_key, make_sshd):
    running = Running(str(tmp_path / "cap"), user_key, max_output=1024)
    sshd = make_sshd()
    try:
        running.register(sshd)
        command = "seq 1 2000"
        [client] = running.run_json(command)["clients"]
        text = running.post("/run", command=command)[2]
        log = running.read_log(sshd)
    finally:
        running.stop()

    whole = "".join("%d\n" % n for n in range(1, 2001))
    assert client["stdout"] == whole[-1024:]
    assert client["stdout_cut"] == len(whole) - 1024
    assert "--- %s stdout:\n[... %d bytes cut here; the log has them " \
        "all]\n%s" % (sshd.address, len(whole) - 1024,
                      whole[-1024:]) in text
    assert log.count("--- stdout ---\n%s--- stderr ---\n" % whole) == 2


def read_rss(pid, field):
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024


def test_50_mb_from_two_clients_stays_out_of_memory_and_whole_in_logs(
        tmp_path, user_key, make_sshd):
    hosts = [make_sshd(), make_sshd()]
    port = free_port()
    process = launch(tmp_path, {
        "PORT": str(port), "HOST": "127.0.0.1", "SSH_KEY": user_key,
        "LOG_DIR": "logs", "LOGGING": "WARNING"})
    try:
        for sshd in hosts:
            connection = http.client.HTTPConnection("127.0.0.1", port)
            connection.request("POST", "/register", urllib.parse.urlencode(
                {"id": "id-" + sshd.ip.replace(".", "-"),
                 "address": sshd.address, "username": USER}), FORM)
            assert connection.getresponse().status == 201
        before = read_rss(process.pid, "VmRSS")
        line = "0123456789abcdefghijklmnopqrstuvwxyz" * 2 + "\n"
        copies = 50 * 1000 * 1000 // len(line)
        connection = http.client.HTTPConnection("127.0.0.1", port,
                                                timeout=300)
        connection.request("POST", "/run", urllib.parse.urlencode({
            "command": "yes %s | head -n %d" % (line.strip(), copies)}),
            dict(AUTHORISED, Accept="application/json"))
        document = json.loads(connection.getresponse().read())
        peak = read_rss(process.pid, "VmHWM")
    finally:
        process.terminate()
        process.communicate(timeout=30)

    growth = peak - before
    print("peak memory growth for 2 x %d bytes: %.1f MiB"
          % (len(line) * copies, growth / 2 ** 20))
    assert growth < 64 * 2 ** 20
    assert document["totals"] == {"clients": 2, "ok": 2}
    expected = (line * copies).encode()
    for client in document["clients"]:
        assert client["stdout_cut"] == len(expected) - 2 ** 20
        assert client["digest"] == hashlib.sha256(
            hashlib.sha256(expected).digest()
            + hashlib.sha256(b"").digest()).hexdigest()
        with open(client["log"], "rb") as log:
            content = log.read()
        start = content.index(b"--- stdout ---\n") + len("--- stdout ---\n")
        end = content.index(b"--- stderr ---\n", start)
        assert content[start:end] == expected


def test_3000_accented_characters_are_logged_without_replacement(
        server, make_sshd):
    sshd = make_sshd()
    server.register(sshd)

    server.run_json("for i in $(seq 3000); do printf '\\303\\251'; done")

    log = server.read_log(sshd)
    assert "\ufffd" not in log
    assert "--- stdout ---\n%s\n--- stderr ---" % ("\u00e9" * 3000) in log


def test_streamed_run_shows_the_fast_client_before_the_slow_one_ends(
        server, make_sshd, tmp_path):
    fast, slow = make_sshd(), make_sshd()
    server.register(fast)
    server.register(slow)
    ended = tmp_path / "slow-ended"
    connection = http.client.HTTPConnection(server.host, server.port,
                                            timeout=60)
    connection.request("POST", "/run", urllib.parse.urlencode({
        "command": "case \"$SSH_CONNECTION\" in *' %s '*) sleep 3; "
        "date +%%s.%%N > %s;; esac; echo hi" % (slow.ip, ended),
        "stream": "1"}), AUTHORISED)
    response = connection.getresponse()

    first = response.readline().decode()
    first_at = time.time()
    rest = response.read().decode()

    width = max(len(fast.address), len(slow.address))
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert first == "%-*s  exit code 0\n" % (width, fast.address)
    assert first_at < float(ended.read_text())
    assert rest == "%-*s  exit code 0\n--- %s, %s stdout:\nhi\n" \
        "2 clients: 2 ok\njob 1\n" % (width, slow.address, fast.address,
                                      slow.address)


def test_streamed_run_as_json_lines(server, make_sshd):
    sshd = make_sshd()
    server.register(sshd)

    status, headers, body = server.post(
        "/run", {"Accept": "application/x-ndjson"}, command="echo x",
        stream="1")

    lines = [json.loads(line) for line in body.splitlines()]
    assert (status, headers["Content-Type"]) == (200,
                                                  "application/x-ndjson")
    assert [(line.get("address"), line.get("stdout")) for line in lines] \
        == [(sshd.address, "x\n"), (None, None)]
    assert lines[1]["totals"] == {"clients": 1, "ok": 1}
    assert lines[1]["summary"] == {"ok": [sshd.address]}


@pytest.mark.parametrize("fields,message", [
    ({"timeout": "abc"}, "field 'timeout': 'abc' is not a number of "
     "seconds from 0.1 to 604800"),
    ({"timeout": "0"}, "field 'timeout': '0' is not a number of seconds "
     "from 0.1 to 604800"),
    ({"timeout": "nan"}, "field 'timeout': 'nan' is not a number of "
     "seconds from 0.1 to 604800"),
    ({"stream": "yes"}, "field 'stream': 'yes' is not allowed; send 1 or "
     "0"),
])
def test_bad_run_fields_are_refused(server, make_sshd, fields, message):
    sshd = make_sshd()
    server.register(sshd)

    status, _, body = server.post("/run", command="touch /tmp/ran", **fields)

    assert (status, body) == (400, message + "\n")
    assert server.log_files() == []


# ---------------------------------------------------------------------------
# Inventory: clients, targets, stale clients
# ---------------------------------------------------------------------------

def client_id(sshd):
    return "id-%s" % sshd.ip.replace(".", "-")


def test_clients_are_listed_shown_and_deleted(server, make_sshd):
    first, second = make_sshd(), make_sshd()
    server.register(first)
    server.register(second)
    server.run_json("false")

    status, _, table = server.request("GET", "/clients")
    document = json.loads(server.request(
        "GET", "/clients", headers={"Accept": "application/json"})[2])
    shown = json.loads(server.request(
        "GET", "/clients/" + client_id(first),
        headers={"Accept": "application/json"})[2])
    text = server.request("GET", "/clients/" + client_id(first))[2]
    deleted = server.request("DELETE", "/clients/" + client_id(first))
    after = server.request("GET", "/clients/" + client_id(first))

    assert status == 200
    lines = table.splitlines()
    assert lines[0].split() == ["ID", "ADDRESS", "USERNAME", "REGISTERED",
                                "LAST", "SEEN", "LAST", "RUN"]
    for line, sshd in zip(lines[1:], (first, second)):
        assert re.fullmatch(
            r"%s +%s +%s +%s +%s +exit code 1 \(job 1\) at %s" % (
                client_id(sshd), re.escape(sshd.address), USER, STAMP,
                STAMP, STAMP), line)
    assert [c["id"] for c in document["clients"]] == [
        client_id(first), client_id(second)]
    assert shown == document["clients"][0]
    assert set(shown) == {"id", "address", "username", "registered",
                          "last_seen", "stale", "last_run", "hostkey"}
    assert (shown["address"], shown["username"], shown["stale"],
            shown["hostkey"]) == (first.address, USER, False,
                                  "ssh-ed25519 " + sshd_key(first).fingerprint)
    assert "\nhostkey: ssh-ed25519 %s\n" % sshd_key(first).fingerprint in text
    assert shown["last_run"]["job"] == 1
    assert (shown["last_run"]["status"], shown["last_run"]["outcome"]) == (
        "failed", "exit code 1")
    assert text.splitlines()[:3] == [
        "id: " + client_id(first), "address: " + first.address,
        "username: " + USER]
    assert deleted[0::2] == (200, "removed client %s at %s; its log stays "
                             "in %s\n" % (client_id(first), first.address,
                                          os.path.join(os.path.realpath(
                                              server.log_dir),
                                              first.address.replace(
                                                  ":", "_") + ".txt")))
    assert after[0::2] == (404, "no client %r; GET /clients lists them\n"
                           % client_id(first))
    assert [e["id"] for e in server.server.registry.clients()] == [
        client_id(second)]
    assert first.address.replace(":", "_") + ".txt" in server.log_files()
    assert server.request("DELETE", "/clients/nobody")[0::2] == (
        404, "no client 'nobody'; GET /clients lists them\n")
    never_ran = make_sshd()
    server.register(never_ran)
    assert server.request("DELETE", "/clients/" + client_id(never_ran))[
        0::2] == (200, "removed client %s at %s; it has no log\n" % (
            client_id(never_ran), never_ran.address))


def test_registering_again_is_a_heartbeat(server, make_sshd):
    sshd = make_sshd()
    server.register(sshd)
    first = server.server.registry.get(client_id(sshd))
    time.sleep(0.01)

    server.register(sshd)

    again = server.server.registry.get(client_id(sshd))
    assert again["registered"] == first["registered"]
    assert again["last_seen"] > first["last_seen"]


def ran_on(document):
    return sorted(c["address"] for c in document["clients"])


def test_target_globs_lists_and_exclusions_pick_clients(server, fleet):
    for sshd in fleet:
        server.register(sshd)
    a, b, c = fleet

    def run(target):
        status, _, body = server.post(
            "/run", {"Accept": "application/json"}, command="true",
            target=target)
        assert status == 200, body
        return ran_on(json.loads(body))

    assert run(client_id(a)) == [a.address]
    assert run(b.address) == [b.address]
    assert run(c.ip) == [c.address]
    assert run("%s,%s" % (client_id(a), c.ip)) == sorted(
        [a.address, c.address])
    assert run("127.0.0.*") == sorted(s.address for s in fleet)
    assert run("id-*,!%s" % client_id(b)) == sorted([a.address, c.address])
    assert run("!%s" % a.ip) == sorted([b.address, c.address])


def test_a_target_matching_nothing_is_404_and_runs_nothing(server, fleet):
    for sshd in fleet:
        server.register(sshd)

    status, _, body = server.post("/run", command="true", target="web*")
    empty = server.post("/run", command="true", target="a,,b")

    assert (status, body) == (404, "target 'web*' matches no registered "
                              "client; nothing ran (GET /clients lists "
                              "them)\n")
    assert empty[0::2] == (400, "field 'target': 'a,,b' has an empty "
                           "pattern; send comma-separated globs such as "
                           "web*,10.0.0.*,!web3\n")
    assert server.log_files() == []
    assert server.request("GET", "/jobs")[2] == "no jobs yet\n"


def test_clients_target_previews_what_a_run_would_reach(server, fleet):
    for sshd in fleet:
        server.register(sshd)

    status, _, body = server.request(
        "GET", "/clients?target=" + urllib.parse.quote(
            "*,!%s" % client_id(fleet[0])),
        headers={"Accept": "application/json"})
    none = server.request("GET", "/clients?target=web*")

    assert status == 200
    assert [c["id"] for c in json.loads(body)["clients"]] == [
        client_id(s) for s in fleet[1:]]
    assert none[0::2] == (404, "target 'web*' matches no registered "
                          "client\n")
    assert server.log_files() == []


def test_stale_clients_are_skipped_unless_named_or_asked_for(
        tmp_path, user_key, make_sshd):
    running = Running(str(tmp_path / "stale"), user_key, stale=1)
    fresh, old = make_sshd(), make_sshd()
    try:
        running.register(old)
        time.sleep(1.5)
        running.register(fresh)
        skipped = running.run_json("true")
        named = json.loads(running.post(
            "/run", {"Accept": "application/json"}, command="true",
            target=client_id(old))[2])
        forced = json.loads(running.post(
            "/run", {"Accept": "application/json"}, command="true",
            stale="1")[2])
        listed = json.loads(running.request(
            "GET", "/clients", headers={"Accept": "application/json"})[2])
        text = running.post("/run", command="true")[2]
    finally:
        running.stop()

    outcomes = {c["address"]: c["status"] for c in skipped["clients"]}
    assert outcomes == {fresh.address: "ok", old.address: "stale"}
    [stale] = [c for c in skipped["clients"] if c["status"] == "stale"]
    assert re.fullmatch(r"not seen for \ds \(STALE is 1s\), so not tried; "
                        r"name it in target or send stale=1", stale["error"])
    assert skipped["totals"] == {"clients": 2, "ok": 1, "stale": 1}
    assert [(c["address"], c["status"]) for c in named["clients"]] == [
        (old.address, "ok")]
    assert forced["totals"] == {"clients": 2, "ok": 2}
    assert [c["stale"] for c in listed["clients"]] == [
        c["address"] == old.address for c in listed["clients"]]
    assert "stale: %s\n" % old.address in text


# ---------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------

def test_jobs_are_listed_shown_and_kept_across_a_restart(
        server, make_sshd):
    sshd = make_sshd()
    server.register(sshd)
    server.post("/run", command="echo one")
    server.post("/run", command="echo two; exit 2", target=sshd.ip,
                timeout="30")

    server.restart()
    listing = server.request("GET", "/jobs")[2]
    listed = json.loads(server.request(
        "GET", "/jobs", headers={"Accept": "application/json"})[2])
    text = server.request("GET", "/jobs/2")[2]
    shown = json.loads(server.request(
        "GET", "/jobs/2", headers={"Accept": "application/json"})[2])

    lines = listing.splitlines()
    assert re.fullmatch(r"2  finished  %s  1 client: 1 failed  echo two; "
                        r"exit 2" % STAMP, lines[0])
    assert re.fullmatch(r"1  finished  %s  1 client: 1 ok  echo one"
                        % STAMP, lines[1])
    assert [(j["id"], j["command"], j["target"], j["timeout"],
             j["requester"], j["state"], j["totals"])
            for j in listed["jobs"]] == [
        (2, "echo two; exit 2", sshd.ip, 30.0, "127.0.0.1", "finished",
         {"clients": 1, "failed": 1}),
        (1, "echo one", None, 300.0, "127.0.0.1", "finished",
         {"clients": 1, "ok": 1})]
    assert re.fullmatch(
        "job 2: finished\ncommand: echo two; exit 2\ntarget: %s\n"
        "requested by 127.0.0.1 at %s, ended %s\n%s  exit code 2\n"
        "--- %s stdout:\ntwo\n1 client: 1 failed\nfailed: %s\n" % (
            re.escape(sshd.ip), STAMP, STAMP, re.escape(sshd.address),
            re.escape(sshd.address), re.escape(sshd.address)), text)
    assert shown["job"] == shown["id"] == 2
    assert [(c["address"], c["exit_code"], c["stdout"])
            for c in shown["clients"]] == [(sshd.address, 2, "two\n")]
    assert shown["totals"] == {"clients": 1, "failed": 1}
    assert server.request("GET", "/jobs/99")[0::2] == (
        404, "no job '99'; GET /jobs lists them\n")
    assert server.request("GET", "/jobs/02")[0::2] == (
        404, "no job '02'; GET /jobs lists them\n")


def test_jobs_list_a_long_or_multiline_command_on_one_line(
        server, make_sshd):
    server.register(make_sshd())
    server.post("/run", command="echo a\necho b")
    server.post("/run", command="echo " + "x" * 200)

    lines = server.request("GET", "/jobs")[2].splitlines()

    assert [line.split("  ")[-1] for line in lines] == [
        "echo " + "x" * 115 + " ...", "echo a ..."]


def test_jobs_past_keep_jobs_are_pruned(tmp_path, user_key, make_sshd):
    running = Running(str(tmp_path / "keep"), user_key, keep_jobs=3)
    try:
        running.register(make_sshd())
        for number in range(5):
            running.post("/run", command="echo %d" % number)
        listed = json.loads(running.request(
            "GET", "/jobs", headers={"Accept": "application/json"})[2])
        gone = running.request("GET", "/jobs/2")
    finally:
        running.stop()

    assert [j["id"] for j in listed["jobs"]] == [5, 4, 3]
    assert gone[0] == 404


def test_an_async_run_answers_at_once_and_is_polled_until_finished(
        server, make_sshd):
    sshd = make_sshd()
    server.register(sshd)

    status, headers, body = server.post("/run", command="sleep 1; echo up",
                                        **{"async": "1"})
    running = json.loads(server.request(
        "GET", "/jobs/1", headers={"Accept": "application/json"})[2])
    listed = server.request("GET", "/jobs")[2]
    polls = 1
    while True:
        document = json.loads(server.request(
            "GET", "/jobs/1", headers={"Accept": "application/json"})[2])
        if document["state"] != "running" or polls > 300:
            break
        polls += 1
        time.sleep(0.1)

    assert (status, headers["Location"], body) == (
        202, "/jobs/1", "job 1 started on 1 client; see GET /jobs/1\n")
    assert (running["state"], running["clients"]) == ("running", [])
    assert re.fullmatch(r"1  running  %s  0 of 1 clients done  sleep 1; "
                        r"echo up\n" % STAMP, listed)
    assert document["state"] == "finished"
    assert [(c["address"], c["stdout"]) for c in document["clients"]] == [
        (sshd.address, "up\n")]


def test_rerun_only_failed_runs_the_command_where_it_did_not_end_ok(
        server, fleet, tmp_path):
    for sshd in fleet:
        server.register(sshd)
    bad = fleet[1]
    marker = tmp_path / "bad-ip"
    marker.write_text(bad.ip)
    command = "echo $SSH_CONNECTION >> %s; case \"$SSH_CONNECTION\" in " \
        "*\" $(cat %s) \"*) exit 5;; esac" % (tmp_path / "ran", marker)
    first = server.run_json(command)

    marker.write_text("none")
    status, headers, body = server.post(
        "/run", {"Accept": "application/json"}, rerun="1", only="failed")

    document = json.loads(body)
    assert first["totals"] == {"clients": 3, "ok": 2, "failed": 1}
    assert status == 200
    assert (document["job"], document["command"]) == (2, command)
    assert [(c["address"], c["status"]) for c in document["clients"]] == [
        (bad.address, "ok")]
    assert len((tmp_path / "ran").read_text().splitlines()) == 4
    assert server.post("/run", rerun="2", only="failed")[0::2] == (
        404, "job 2 has no client that did not end ok; nothing ran\n")
    assert server.post("/run", rerun="7")[0::2] == (
        400, "field 'rerun': no job '7'; GET /jobs lists them\n")
    assert server.post("/run", rerun="1", command="x")[0::2] == (
        400, "fields 'command' and 'rerun' exclude each other; send one of "
        "them\n")
    assert server.post("/run", rerun="1", target="x")[0::2] == (
        400, "field 'target' does not go with 'rerun', which runs that "
        "job's command on its clients; send one or the other\n")


def test_an_idempotency_key_runs_a_command_once(server, make_sshd, tmp_path):
    sshd = make_sshd()
    server.register(sshd)
    counter = tmp_path / "count"
    command = "echo ran >> %s; wc -l < %s" % (counter, counter)
    key = {"Idempotency-Key": "deploy-2026-12-03",
           "Accept": "application/json"}

    first = server.post("/run", key, command=command)
    again = server.post("/run", key, command=command)
    other = server.post("/run", key, command="reboot")

    assert first[0] == again[0] == 200
    assert json.loads(first[2]) == json.loads(again[2])
    assert json.loads(again[2])["clients"][0]["stdout"] == "1\n"
    assert again[1]["Idempotent-Replayed"] == "true"
    assert counter.read_text() == "ran\n"
    server.restart()
    after_restart = server.post("/run", key, command=command)
    assert json.loads(after_restart[2]) == json.loads(first[2])
    assert counter.read_text() == "ran\n"
    assert other[0] == 422
    assert json.loads(other[2]) == {"error": (
        "Idempotency-Key 'deploy-2026-12-03' was used for another request "
        "(job 1); use a new key for a new request")}


# ---------------------------------------------------------------------------
# Security: tokens, TLS, host keys, SSH identity, hostile HTTP
# ---------------------------------------------------------------------------

def basic(password):
    return "Basic " + base64.b64encode(b":" + password.encode()).decode()


def test_running_needs_the_api_token(server, make_sshd, tmp_path):
    sshd = make_sshd()
    server.register(sshd)
    marker = tmp_path / "ran"
    command = "echo x >> %s" % marker

    missing = server.post("/run", {"Authorization": ""}, command=command)
    wrong = server.post("/run", {"Authorization": "Bearer nope"},
                        command=command)
    wrong_basic = server.post("/run", {"Authorization": basic("nope")},
                              command=command)
    not_base64 = server.post("/run", {"Authorization": "Basic \xff\xfe"},
                             command=command)
    bearer = server.post("/run", command=command)
    with_basic = server.post("/run", {"Authorization": basic(TOKEN)},
                             command=command)

    refusal = ("this needs the API token; send it as Authorization: Bearer "
               "TOKEN, or with curl -u :TOKEN\n")
    refused = ("the token sent is not the API token; send it as "
               "Authorization: Bearer TOKEN, or with curl -u :TOKEN\n")
    assert [(status, body) for status, _, body in (
        missing, wrong, wrong_basic, not_base64)] == [
            (401, refusal), (401, refused), (401, refused), (401, refused)]
    for status, headers, body in (missing, wrong, wrong_basic):
        assert headers.get_all("WWW-Authenticate") == [
            'Bearer realm="sugar"', 'Basic realm="sugar"']
    assert bearer[0] == with_basic[0] == 200
    assert marker.read_text() == "x\nx\n"
    for path in ("/clients", "/jobs", "/jobs/1", "/"):
        assert server.request("GET", path, headers={
            "Authorization": ""})[0] == 401
    assert server.request("DELETE", "/clients/" + client_id(sshd),
                          headers={"Authorization": ""})[0] == 401
    assert server.server.registry.get(client_id(sshd)) is not None
    # Registering needs no token here: an unreadable one is no matter.
    assert server.post("/register", {"Authorization": "Basic \xc3\xa9"},
                       id="web2", address=sshd.address,
                       username=USER)[0] == 201


def test_curl_basic_auth_with_an_empty_user_works(server, make_sshd):
    server.register(make_sshd())

    answer = subprocess.run(
        ["curl", "-sS", "-u", ":" + TOKEN, "http://%s/clients" % server.url],
        capture_output=True, text=True, check=True).stdout

    assert answer.startswith("ID ")


def test_a_made_token_is_private_kept_and_announced(tmp_path):
    port = free_port()
    env = {"PORT": str(port), "HOST": "127.0.0.1", "TOKEN": ""}
    first = launch(tmp_path, env)
    first.terminate()
    first.communicate(timeout=30)
    token_file = tmp_path / "sugar-token"
    token = token_file.read_text()
    second = launch(tmp_path, env)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=9)
        connection.request("GET", "/jobs", headers={
            "Authorization": "Bearer " + token.strip()})
        status = connection.getresponse().status
    finally:
        second.terminate()
        second.communicate(timeout=30)

    assert first.first_line == second.first_line == (
        "sugar: the API token is in %s (send it with curl -u :TOKEN)\n"
        % token_file)
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    assert len(token.strip()) >= 40
    assert token_file.read_text() == token
    assert status == 200


def test_register_token_is_required_when_set(tmp_path, user_key):
    running = Running(str(tmp_path / "r"), user_key,
                      register_token="join-secret")
    try:
        none = running.post("/register", {"Authorization": ""}, id="a1")
        wrong = running.post("/register", {"Authorization": ""}, id="a2",
                             token="guess")
        field = running.post("/register", {"Authorization": ""}, id="a3",
                             token="join-secret")
        header = running.post("/register", {
            "Authorization": "Bearer join-secret"}, id="a4")
        api = running.post("/register", {"Authorization": ""}, id="a5",
                           token=running.server.token)
        ids = [e["id"] for e in running.server.registry.clients()]
    finally:
        running.stop()

    refusal = ("registering needs the register token; send it as the field "
               "token or as Authorization: Bearer TOKEN\n")
    assert none[0::2] == (401, refusal)
    assert wrong[0::2] == (401, "the token sent is not the register token; "
                           "send it as the field token or as Authorization: "
                           "Bearer TOKEN\n")
    assert field[0] == header[0] == api[0] == 201
    assert sorted(ids) == ["a3", "a4", "a5"]


def test_https_only_with_a_certificate(tmp_path, user_key):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
         "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    running = Running(str(tmp_path / "tls"), user_key, tls_cert=str(cert),
                      tls_key=str(key))
    try:
        secure = subprocess.run(
            ["curl", "-sS", "--cacert", str(cert), "-d", "id=m1",
             "https://%s/register" % running.url],
            capture_output=True, text=True)
        plain = subprocess.run(
            ["curl", "-sS", "-d", "id=m2", "http://%s/register"
             % running.url], capture_output=True, text=True)
        old = subprocess.run(
            ["curl", "-sS", "--tlsv1.1", "--tls-max", "1.1", "--cacert",
             str(cert), "https://%s/pubkey" % running.url],
            capture_output=True, text=True)
        ids = [e["id"] for e in running.server.registry.clients()]
    finally:
        running.stop()

    assert (secure.returncode, secure.stdout) == (
        0, "added client m1 at 127.0.0.1 as root\n")
    assert plain.returncode != 0 and plain.stdout == ""
    assert old.returncode != 0
    assert ids == ["m1"]


def test_bad_tls_files_stop_the_launcher(tmp_path):
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    cases = [
        ({"TLS_CERT": "/nonexistent.pem", "TLS_KEY": "/nonexistent.pem"},
         "sugar: TLS_CERT='/nonexistent.pem' cannot be read; name a PEM "
         "file this user can read\n"),
        ({"TLS_CERT": str(tmp_path / "cert.pem")},
         "sugar: TLS_CERT and TLS_KEY go together; set both (PEM files) "
         "for HTTPS, or neither\n"),
    ]
    for env, line in cases:
        process = launch(tmp_path, env, wait_for_line=False)
        out, err = process.communicate(timeout=30)
        assert (process.returncode, out, err) == (2, "", line)
    process = launch(tmp_path, {"TLS_CERT": str(tmp_path / "cert.pem"),
                                "TLS_KEY": str(tmp_path / "cert.pem")},
                     wait_for_line=False)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert err.startswith("sugar: TLS_CERT=%r and TLS_KEY=%r do not make a "
                          "certificate and its key: " % (
                              str(tmp_path / "cert.pem"),
                              str(tmp_path / "cert.pem")))
    assert err.count("\n") == 1


def test_a_pinned_host_key_that_matches_lets_the_command_run(
        server, make_sshd):
    sshd = make_sshd()
    server.register(sshd, hostkey=sshd.public_host_key())

    [client] = server.run_json("true")["clients"]

    assert client["status"] == "ok"


def test_the_first_host_key_is_trusted_and_pinned(server, make_sshd):
    sshd = make_sshd()
    server.register(sshd)
    assert server.server.registry.get(client_id(sshd))["hostkey"] is None
    before = server.request("GET", "/clients/" + client_id(sshd))[2]

    server.run_json("true")

    kind, data = sshd.public_host_key().split()[:2]
    assert server.server.registry.get(client_id(sshd))["hostkey"] == \
        "%s %s" % (kind, data)
    assert "\nhostkey: none\n" in before


def test_a_changed_host_key_is_refused_and_the_others_run(
        server, fleet, tmp_path):
    for sshd in fleet:
        server.register(sshd)
    server.run_json("true")
    swapped = fleet[0]
    old_key = sshd_key(swapped)
    swapped.swap_host_key()
    marker = tmp_path / "markers"

    document = server.run_json("echo $SSH_CONNECTION >> %s" % marker)

    outcomes = {c["address"]: (c["status"], c["error"])
                for c in document["clients"]}
    assert outcomes[swapped.address] == ("hostkey", (
        "host key of %s port %d changed: expected ssh-ed25519 %s, offered "
        "ssh-ed25519 %s, so the command did not run; if the machine was "
        "re-installed, register it again with its new hostkey and the API "
        "token" % (swapped.ip, swapped.port, old_key.fingerprint,
                   sshd_key(swapped).fingerprint)))
    assert [outcomes[s.address][0] for s in fleet[1:]] == ["ok", "ok"]
    ran = marker.read_text()
    assert swapped.ip + " " not in ran.replace(" %s " % swapped.ip, "@")
    assert len(ran.splitlines()) == 2


def sshd_key(sshd):
    kind, data = sshd.public_host_key().split()[:2]
    return sugar._hostkey_object("%s %s" % (kind, data))


def test_replacing_a_pinned_key_needs_the_api_token(server, make_sshd):
    sshd = make_sshd()
    server.register(sshd, hostkey=sshd.public_host_key())
    pinned = server.server.registry.get(client_id(sshd))["hostkey"]
    sshd.swap_host_key()
    fields = {"id": client_id(sshd), "address": sshd.address,
              "username": USER, "hostkey": sshd.public_host_key()}

    hijack = server.post("/register", {"Authorization": ""}, **fields)
    kept = server.server.registry.get(client_id(sshd))["hostkey"]
    admin = server.post("/register", {"Authorization": ""},
                        token=server.server.token, **fields)

    assert hijack[0::2] == (409, (
        "client %s has another pinned host key (%s); replacing it needs "
        "the API token (Authorization: Bearer TOKEN or the field token), "
        "as for a re-installed machine\n"
        % (client_id(sshd), sugar._hostkey_object(pinned).fingerprint)))
    assert kept == pinned
    assert admin[0::2] == (200, "updated client %s at %s as %s (was %s as "
                           "%s); its pinned host key is replaced\n" % (
                               client_id(sshd), sshd.address, USER,
                               sshd.address, USER))
    assert server.run_json("true")["clients"][0]["status"] == "ok"


def test_a_bad_hostkey_field_is_400(server):
    status, _, body = server.post("/register", id="m", hostkey="ssh-ed25519 "
                                  "not-base64!")

    assert (status, body) == (400, (
        "field 'hostkey': 'ssh-ed25519 not-base64!' is not an SSH public "
        "key line; send the content of /etc/ssh/ssh_host_ed25519_key.pub\n"))


def test_a_hostkey_of_several_lines_is_400(server, make_sshd):
    key = make_sshd().public_host_key()

    status, _, body = server.post("/register", id="m",
                                  hostkey=key + "\n" + key)

    assert (status, body) == (400, (
        "field 'hostkey': holds 2 lines; send one key line, such as the "
        "content of /etc/ssh/ssh_host_ed25519_key.pub\n"))
    assert server.request("GET", "/clients/m")[0] == 404


def test_a_trailing_or_doubled_ampersand_is_harmless(server):
    status, _, body = server.request("POST", "/register",
                                     b"id=amp&&address=127.0.0.9&", FORM)

    assert (status, body) == (201, "added client amp at 127.0.0.9 as root\n")


def test_a_hostkey_of_a_type_sugar_cannot_check_is_400(server):
    status, _, body = server.post("/register", id="m",
                                  hostkey="ssh-dss AAAAB3NzaC1kc3M=")

    assert (status, body) == (400, (
        "field 'hostkey': key type 'ssh-dss' is not one Sugar can check; "
        "send the content of /etc/ssh/ssh_host_ed25519_key.pub (or an ecdsa "
        "or rsa host key)\n"))
    assert server.request("GET", "/clients/m")[0] == 404


def test_ssh_key_alone_is_offered_despite_a_crowded_agent(
        server, make_sshd, tmp_path, monkeypatch):
    socket_path = str(tmp_path / "agent.sock")
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", socket_path],
                             stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(socket_path):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        environ = dict(os.environ, SSH_AUTH_SOCK=socket_path)
        for number in range(6):
            wrong = str(tmp_path / ("wrong%d" % number))
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "",
                            "-f", wrong], check=True)
            subprocess.run(["ssh-add", "-q", wrong], env=environ,
                           check=True, capture_output=True)
        listed = subprocess.run(["ssh-add", "-l"], env=environ,
                                capture_output=True, text=True).stdout
        monkeypatch.setenv("SSH_AUTH_SOCK", socket_path)
        sshd = make_sshd(extra=["MaxAuthTries 3"])
        server.register(sshd)

        [client] = server.run_json("true")["clients"]
    finally:
        agent.terminate()
        agent.wait(10)

    assert len(listed.splitlines()) == 6
    assert client["status"] == "ok"


def test_pubkey_gives_the_servers_public_key_without_a_token(
        server, user_key):
    status, _, body = server.request("GET", "/pubkey", headers={
        "Authorization": ""})

    with open(user_key + ".pub") as public:
        assert (status, body) == (200, public.read().strip() + "\n")


def test_idle_connections_do_not_hold_up_a_registration(server):
    idle = [socket.create_connection((server.host, server.port))
            for _ in range(200)]
    try:
        clock = time.monotonic()
        status = server.post("/register", id="busy")[0]
        took = time.monotonic() - clock
    finally:
        for connection in idle:
            connection.close()

    print("register with 200 idle connections open: %.3fs" % took)
    assert status == 201
    assert took < 5


def test_a_slow_body_is_dropped_after_the_request_timeout(
        tmp_path, user_key):
    running = Running(str(tmp_path / "slow"), user_key, request_timeout=1)
    try:
        with socket.create_connection((running.host, running.port)) as slow:
            slow.sendall(b"POST /register HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/x-www-form-urlencoded"
                         b"\r\nContent-Length: 100\r\n\r\nid=")
            clock = time.monotonic()
            closed_after = None
            for _ in range(40):
                try:
                    slow.sendall(b"a")
                    if slow.recv(1, socket.MSG_DONTWAIT) == b"":
                        closed_after = time.monotonic() - clock
                        break
                except BlockingIOError:
                    pass
                except OSError:
                    closed_after = time.monotonic() - clock
                    break
                time.sleep(0.25)
            other = running.post("/register", id="other")[0]
        ids = [e["id"] for e in running.server.registry.clients()]
    finally:
        running.stop()

    assert closed_after is not None and closed_after < 5
    assert other == 201
    assert ids == ["other"]


def test_a_content_length_beyond_the_body_does_not_hang(tmp_path, user_key):
    running = Running(str(tmp_path / "short"), user_key, request_timeout=1)
    try:
        with socket.create_connection((running.host, running.port)) as short:
            short.sendall(b"POST /register HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: application/x-www-form-urlencoded"
                          b"\r\nContent-Length: 60000\r\n\r\nid=m")
            short.settimeout(10)
            answer = short.makefile("rb").read()
    finally:
        running.stop()

    assert answer == b"" or answer.startswith(b"HTTP/1.1 400 ")


def test_stores_token_and_logs_are_private(tmp_path, user_key, make_sshd):
    folder = tmp_path / "private"
    running = Running(str(folder), user_key, token=None)
    sshd = make_sshd()
    try:
        authorised = {"Authorization": "Bearer " + (
            folder / "sugar-token").read_text().strip()}
        running.post("/register", authorised, id="p1", address=sshd.address,
                     username=USER)
        running.post("/run", authorised, command="true")
    finally:
        running.stop()
    log = folder / "logs" / (sshd.address.replace(":", "_") + ".txt")
    assert oct(log.stat().st_mode & 0o777) == "0o600"

    modes = {path.name: oct(path.stat().st_mode & 0o777)
             for path in folder.iterdir()}
    assert modes.pop("sugar-token") == "0o600"
    assert modes.pop("logs") == "0o700"
    assert set(modes.values()) == {"0o600"}, modes
    assert any(name.startswith("registry") for name in modes)
    assert any(name.startswith("jobs") for name in modes)


# ---------------------------------------------------------------------------
# Durability: stores, crashes, shutdown, log rotation, file descriptors
# ---------------------------------------------------------------------------

def http_post(port, path, fields, headers=None, timeout=30):
    connection = http.client.HTTPConnection("127.0.0.1", port,
                                            timeout=timeout)
    try:
        connection.request("POST", path, urllib.parse.urlencode(fields),
                           dict(AUTHORISED, **(headers or {})))
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def http_get_json(port, path):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers=dict(
            AUTHORISED, Accept="application/json"))
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def test_concurrent_registrations_all_land_and_survive_a_restart(
        server):
    ids = ["m%04d" % number for number in range(1000)]
    work = [(machine, "10.1.%d.%d" % (round_, number % 250))
            for round_ in (1, 2) for number, machine in enumerate(ids)]
    failures = []

    def register(share):
        for machine, address in share:
            status = server.post("/register", id=machine, address=address,
                                 username="root")[0]
            if status not in (200, 201):
                failures.append((machine, status))
    threads = [threading.Thread(target=register, args=(work[i::20],))
               for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    server.restart()

    entries = {e["id"]: e["host"] for e in server.server.registry.clients()}
    assert failures == []
    assert len(entries) == 1000
    assert entries == {machine: "10.1.2.%d" % (number % 250)
                       for number, machine in enumerate(ids)}


def test_a_killed_server_keeps_every_answered_registration(
        tmp_path, make_sshd, user_key):
    port = free_port()
    env = {"PORT": str(port), "HOST": "127.0.0.1", "LOGGING": "WARNING",
           "SSH_KEY": user_key, "GRACE": "0"}
    process = launch(tmp_path, env)
    answered, stop = [], threading.Event()

    def burst(worker):
        number = 0
        while not stop.is_set():
            machine = "k%d-%d" % (worker, number)
            try:
                status, _ = http_post(port, "/register", {"id": machine},
                                      timeout=5)
            except (OSError, http.client.HTTPException):
                # The kill cut this request, perhaps mid-answer.
                return
            if status == 201:
                answered.append(machine)
            number += 1
    sshd = make_sshd()
    http_post(port, "/register", {"id": "sleeper", "address": sshd.address,
                                  "username": USER})
    status, _ = http_post(port, "/run", {"command": "sleep 30",
                                         "async": "1"})
    wait_while(lambda: not sleeping("30"), 20)
    threads = [threading.Thread(target=burst, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    process.kill()
    process.wait(10)
    stop.set()
    for thread in threads:
        thread.join()

    again = launch(tmp_path, env)
    try:
        clients = http_get_json(port, "/clients")["clients"]
        job = http_get_json(port, "/jobs/1")
        rerun = http_post(port, "/run", {"rerun": "1", "only": "failed",
                                         "async": "1"})
    finally:
        again.terminate()
        again.communicate(timeout=30)

    print("registrations answered before SIGKILL: %d" % len(answered))
    assert status == 202
    assert len(answered) > 20
    assert set(answered) <= {c["id"] for c in clients}
    assert (job["state"], job["ended"]) == ("interrupted", None)
    assert [(c["id"], c["status"], c["error"]) for c in job["clients"]] == [
        ("sleeper", "interrupted",
         "the server stopped before the result was known")]
    assert [(c["last_run"]["job"], c["last_run"]["status"]) for c in clients
            if c["id"] == "sleeper"] == [(1, "interrupted")]
    assert rerun == (202, "job 2 started on 1 client; see GET /jobs/2\n")


def test_an_old_shelve_registry_is_carried_over(tmp_path):
    path = str(tmp_path / "sugar-registry")
    with shelve.open(path) as old:
        old["abc"] = {"id": "abc", "host": "10.0.0.5", "port": 22,
                      "username": "root",
                      "registered": "2026-01-01T00:00:00.000Z",
                      "last_seen": "2026-01-01T00:00:00.000Z"}
    port = free_port()
    process = launch(tmp_path, {"PORT": str(port), "HOST": "127.0.0.1"})
    try:
        clients = http_get_json(port, "/clients")["clients"]
    finally:
        process.terminate()
        out, err = process.communicate(timeout=30)

    assert [(c["id"], c["address"], c["last_run"]) for c in clients] == [
        ("abc", "10.0.0.5", None)]
    assert "WARNING REGISTRY: carried over 1 entries from the old store " \
        "sugar-registry; its files are kept with .old added\n" in err
    assert any(name.endswith(".old") for name in os.listdir(tmp_path))


def test_an_unreadable_registry_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "sugar-registry"
    path.write_bytes(b"these bytes are no registry\n")
    before = path.stat()

    process = launch(tmp_path, {}, wait_for_line=False)
    out, err = process.communicate(timeout=30)

    assert (process.returncode, out) == (2, "")
    assert err == ("sugar: REGISTRY='sugar-registry' cannot be opened "
                   "(not a store Sugar knows); it was left as it is: move "
                   "it away, or set REGISTRY to another file\n")
    assert path.read_bytes() == b"these bytes are no registry\n"
    assert path.stat().st_mtime_ns == before.st_mtime_ns
    assert sorted(os.listdir(tmp_path)) == ["sugar-registry"]


def test_sigterm_lets_running_commands_finish(tmp_path, fleet,
                                                   user_key):
    port = free_port()
    process = launch(tmp_path, {"PORT": str(port), "HOST": "127.0.0.1",
                                "SSH_KEY": user_key})
    for sshd in fleet:
        http_post(port, "/register", {"id": client_id(sshd),
                                      "address": sshd.address,
                                      "username": USER})
    http_post(port, "/run", {"command": "sleep 5; echo done",
                             "async": "1"})
    time.sleep(1)
    clock = time.monotonic()

    process.terminate()
    out, err = process.communicate(timeout=60)
    took = time.monotonic() - clock

    again = launch(tmp_path, {"PORT": str(port), "HOST": "127.0.0.1"})
    try:
        job = http_get_json(port, "/jobs/1")
    finally:
        again.terminate()
        again.communicate(timeout=30)
    assert process.returncode == 0
    assert 3 < took < 30
    assert job["state"] == "finished"
    assert [(c["status"], c["stdout"]) for c in job["clients"]] == [
        ("ok", "done\n")] * 3


def test_sigterm_past_the_grace_stops_remote_commands(tmp_path, fleet,
                                                      user_key):
    port = free_port()
    env = {"PORT": str(port), "HOST": "127.0.0.1", "GRACE": "2",
           "SSH_KEY": user_key}
    process = launch(tmp_path, env)
    for sshd in fleet:
        http_post(port, "/register", {"id": client_id(sshd),
                                      "address": sshd.address,
                                      "username": USER})
    http_post(port, "/run", {"command": "sleep 600.75", "async": "1"})
    wait_while(lambda: len(sleeping("600.75")) < 3, 20)
    started = len(sleeping("600.75"))
    clock = time.monotonic()

    process.terminate()
    out, err = process.communicate(timeout=60)
    took = time.monotonic() - clock
    time.sleep(0.5)

    again = launch(tmp_path, env)
    try:
        job = http_get_json(port, "/jobs/1")
    finally:
        again.terminate()
        again.communicate(timeout=30)
    print("exit after SIGTERM with GRACE=2: %.2fs" % took)
    assert started == 3
    assert process.returncode == 0
    assert took < 8
    assert sleeping("600.75") == []
    assert job["state"] == "interrupted"
    assert [(c["status"], c["error"]) for c in job["clients"]] == [
        ("interrupted", "stopped because the server shut down")] * 3


def test_client_logs_rotate_at_log_max_bytes(tmp_path, user_key,
                                             make_sshd):
    running = Running(str(tmp_path / "rotate"), user_key,
                      log_max_bytes=2048, log_backups=2)
    sshd = make_sshd()
    try:
        running.register(sshd)
        for number in range(8):
            running.post("/run", command="head -c 1500 /dev/zero | "
                         "tr '\\0' %d" % number)
    finally:
        running.stop()

    base = sshd.address.replace(":", "_") + ".txt"
    assert running.log_files() == [base, base + ".1", base + ".2"]
    # An entry of about 1,600 bytes: a log is rotated once two are in it.
    logs = [running.read_log(sshd)]
    for suffix in (".1", ".2"):
        with open(os.path.join(running.log_dir, base + suffix)) as older:
            logs.append(older.read())
    assert [log.count("=== end") for log in logs] == [2, 2, 2]
    assert ["".join(sorted(set(re.findall(r"(\d)\1{1499}", log))))
            for log in logs] == ["67", "45", "23"]


def open_descriptors(pid, settled_at=None):
    """Descriptors open in *pid*, once the count reaches *settled_at*
    (the last HTTP connection may take a moment to close), or after 5 s.
    """
    deadline = time.monotonic() + 5
    while True:
        count = len(os.listdir("/proc/%d/fd" % pid))
        if count == settled_at or settled_at is None or \
                time.monotonic() > deadline:
            return count
        time.sleep(0.05)


@pytest.mark.parametrize("pool", ["0", "1"])
def test_more_clients_than_open_files_allow_still_all_run(
        tmp_path, user_key, pool):
    hosts = []
    try:
        for number in range(150):
            ip = "127.0.%d.%d" % (100 + number // 200, 1 + number % 200)
            hosts.append(Sshd(str(tmp_path / ("h%d" % number)), ip,
                              user_key))
        port = free_port()
        environ = dict(os.environ, PYTHONUNBUFFERED="1", TOKEN=TOKEN,
                       PORT=str(port), HOST="127.0.0.1", WORKERS="20",
                       SSH_KEY=user_key, LOGGING="WARNING", POOL=pool,
                       IDLE_CLOSE="1")
        process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "sugar_server")],
            cwd=str(tmp_path), env=environ, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: resource.setrlimit(
                resource.RLIMIT_NOFILE, (128, 128)))
        process.stdout.readline()
        try:
            for sshd in hosts:
                http_post(port, "/register", {
                    "id": client_id(sshd), "address": sshd.address,
                    "username": USER})
            time.sleep(1)  # for the last request's connection to close
            start = open_descriptors(process.pid)
            counts, totals = [], []
            for _ in range(2):
                document = json.loads(http_post(
                    port, "/run", {"command": "true"},
                    {"Accept": "application/json"}, timeout=300)[1])
                totals.append(document["totals"])
                # Kept connections are closed once idle for IDLE_CLOSE.
                counts.append(open_descriptors(process.pid, start))
        finally:
            process.terminate()
            out, err = process.communicate(timeout=60)
    finally:
        for sshd in hosts:
            sshd.stop()

    assert totals == [{"clients": 150, "ok": 150}] * 2
    assert counts == [start, start]
    assert "WORKERS=20 needs about 168 open files but the limit is 128; " \
        "using 13 workers" in err


# ---------------------------------------------------------------------------
# Scripts: from a URL or uploaded
# ---------------------------------------------------------------------------

SHELL_SCRIPT = b"""#!/bin/sh
echo "shell on $(echo $SSH_CONNECTION | cut -d' ' -f3) with $# args"
for arg in "$@"; do echo "[$arg]"; done
exit 3
"""
PYTHON_SCRIPT = b"""#!/usr/bin/env python3
import sys
print("python", sys.argv[1:])
"""


@pytest.fixture
def script_site(tmp_path):
    """A real HTTP server on loopback serving scripts from a folder."""
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "deploy.sh").write_bytes(SHELL_SCRIPT)
    (folder / "report.py").write_bytes(PYTHON_SCRIPT)
    (folder / "big.sh").write_bytes(b"#" * (1024 * 1024 + 1))
    (folder / "slow.sh").write_bytes(b"sleep 600.5\n")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args):
            pass
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=site.serve_forever)
    thread.start()
    yield "http://127.0.0.1:%d/" % site.server_address[1]
    site.shutdown()
    site.server_close()
    thread.join()


def leftover_scripts():
    return sorted(name for name in os.listdir("/tmp")
                  if name.startswith("sugar-"))


def test_a_shell_and_a_python_script_from_urls_run_everywhere(
        server, fleet, script_site):
    for sshd in fleet:
        server.register(sshd)
    before = leftover_scripts()

    shell = json.loads(server.post(
        "/run", {"Accept": "application/json"}, url=script_site +
        "deploy.sh", args="one 'two words' \"it's\"")[2])
    python = json.loads(server.post(
        "/run", {"Accept": "application/json"},
        url=script_site + "report.py")[2])

    # Results come in registry order: by address, as text.
    by_address = sorted(fleet, key=lambda sshd: sshd.ip)
    for client, sshd in zip(shell["clients"], by_address):
        assert (client["status"], client["exit_code"], client["stdout"]) == (
            "failed", 3, "shell on %s with 3 args\n[one]\n[two words]\n"
            "[it's]\n" % sshd.ip)
    assert [(c["exit_code"], c["stdout"]) for c in python["clients"]] == [
        (0, "python []\n")] * 3
    digest = hashlib.sha256(SHELL_SCRIPT).hexdigest()
    assert shell["command"] == "script %sdeploy.sh (sha256 %s) one 'two " \
        "words' 'it'\"'\"'s'" % (script_site, digest)
    assert "command: script %sdeploy.sh (sha256 %s)" % (
        script_site, digest) in server.read_log(fleet[0])
    job = json.loads(server.request("GET", "/jobs/1", headers={
        "Accept": "application/json"})[2])
    assert job["script"] == {"source": script_site + "deploy.sh",
                             "sha256": digest,
                             "args": "one 'two words' \"it's\""}
    assert leftover_scripts() == before


def test_a_pinned_digest_must_match(server, make_sshd, script_site,
                                    tmp_path):
    sshd = make_sshd()
    server.register(sshd)
    digest = hashlib.sha256(SHELL_SCRIPT).hexdigest()

    wrong = server.post("/run", url=script_site + "deploy.sh",
                        sha256="0" * 64)
    right = server.post("/run", {"Accept": "application/json"},
                        url=script_site + "deploy.sh", sha256=digest)

    assert wrong[0::2] == (409, (
        "the script from '%sdeploy.sh' has sha256 %s, not %s as asked; "
        "nothing ran\n" % (script_site, digest, "0" * 64)))
    assert [c["exit_code"] for c in json.loads(right[2])["clients"]] == [3]
    assert server.read_log(sshd).count("=== end") == 1


def test_require_sha256_makes_the_digest_mandatory(
        tmp_path, user_key, make_sshd, script_site):
    running = Running(str(tmp_path / "strict"), user_key,
                      require_sha256=True)
    try:
        running.register(make_sshd())
        answer = running.post("/run", url=script_site + "deploy.sh")
    finally:
        running.stop()

    assert answer[0::2] == (400, (
        "field 'sha256' is missing; this server runs scripts from URLs only "
        "with their digest (REQUIRE_SHA256)\n"))


def test_bad_script_urls_are_refused_and_nothing_runs(
        server, make_sshd, script_site):
    sshd = make_sshd()
    server.register(sshd)
    closed = "http://127.0.0.1:%d/x.sh" % free_port()

    answers = [server.post("/run", url=url)[0::2] for url in (
        script_site + "missing.sh", closed, "file:///etc/passwd",
        script_site + "big.sh", "ftp://127.0.0.1/x.sh")]

    assert answers == [
        (502, "could not fetch '%smissing.sh': HTTP 404 File not found; "
         "nothing ran\n" % script_site),
        (502, "could not fetch %r: [Errno 111] Connection refused; nothing "
         "ran\n" % closed),
        (400, "field 'url': 'file:///etc/passwd' is not an http or https "
         "URL\n"),
        (502, "could not fetch '%sbig.sh': the script is over the limit of "
         "1048576 bytes (MAX_SCRIPT); nothing ran\n" % script_site),
        (400, "field 'url': 'ftp://127.0.0.1/x.sh' is not an http or https "
         "URL\n"),
    ]
    assert server.log_files() == []


def test_script_urls_that_cannot_be_fetched_as_written_are_400(
        server, make_sshd):
    server.register(make_sshd())

    answers = [server.post("/run", url=url, **fields)[0::2] for url, fields
               in [("http://[::1", {}), ("http://127.0.0.1:99999/x.sh", {}),
                   ("http://user:secret@127.0.0.1:1/x.sh", {}),
                   ("http:///x.sh", {}),
                   ("http://127.0.0.1:1/x.sh", {"args": "'open"})]]

    assert answers == [
        (400, "field 'url': 'http://[::1' is not a URL (Invalid IPv6 URL)\n"),
        (400, "field 'url': 'http://127.0.0.1:99999/x.sh' is not a URL "
         "(Port out of range 0-65535)\n"),
        (400, "field 'url': a user or password in the URL is not supported; "
         "serve the script without one, or upload it (curl -F "
         "script=@file)\n"),
        (400, "field 'url': 'http:///x.sh' is not an http or https URL\n"),
        (400, "field 'args': \"'open\" is not a shell-quoted list of "
         "arguments (No closing quotation)\n")]
    assert server.log_files() == []


def test_an_uploaded_script_runs(server, fleet, tmp_path):
    for sshd in fleet:
        server.register(sshd)
    script = tmp_path / "deploy.sh"
    script.write_bytes(SHELL_SCRIPT)
    before = leftover_scripts()

    answer = subprocess.run(
        ["curl", "-sS", "-u", ":" + TOKEN, "-F", "script=@%s" % script,
         "-F", "args=a 'b c'", "http://%s/run" % server.url],
        capture_output=True, text=True, check=True).stdout

    assert answer.splitlines()[0].endswith("exit code 3")
    assert "[b c]" in answer
    assert "3 clients: 3 failed" in answer
    assert leftover_scripts() == before
    too_big = tmp_path / "big.sh"
    too_big.write_bytes(b"#" * (1024 * 1024 + 1))
    refused = subprocess.run(
        ["curl", "-sS", "-u", ":" + TOKEN, "-F", "script=@%s" % too_big,
         "http://%s/run" % server.url], capture_output=True, text=True)
    assert refused.stdout == "the script is over the limit of 1048576 " \
        "bytes (MAX_SCRIPT)\n"


def test_the_script_is_removed_after_a_timeout(server, make_sshd,
                                               script_site):
    sshd = make_sshd()
    server.register(sshd)
    before = leftover_scripts()

    [client] = json.loads(server.post(
        "/run", {"Accept": "application/json"}, url=script_site + "slow.sh",
        timeout="1")[2])["clients"]

    assert client["status"] == "timeout"
    assert leftover_scripts() == before
    wait_while(lambda: sleeping("600.5"))
    assert sleeping("600.5") == []


def test_script_fields_that_do_not_fit_are_refused(server, make_sshd,
                                                   script_site):
    server.register(make_sshd())

    assert server.post("/run", command="x", url=script_site)[0::2] == (
        400, "fields 'command' and 'url' exclude each other; send one of "
        "them\n")
    assert server.post("/run", command="x", args="a")[0::2] == (
        400, "field 'args' goes with 'url' or 'script'; send one of them "
        "too\n")
    assert server.post("/run", url=script_site + "deploy.sh",
                       args="'open")[0::2] == (
        400, "field 'args': \"'open\" is not a shell-quoted list of "
        "arguments (No closing quotation)\n")
    assert server.post("/run", url=script_site + "deploy.sh",
                       sha256="XYZ")[0::2] == (
        400, "field 'sha256': 'XYZ' is not 64 hex digits\n")


# ---------------------------------------------------------------------------
# Kept connections
# ---------------------------------------------------------------------------

def source_port(document):
    return [c["stdout"].split()[1] for c in document["clients"]]


def test_a_warm_run_reuses_the_connection(server, make_sshd):
    sshd = make_sshd()
    server.register(sshd)

    first = server.run_json("echo $SSH_CONNECTION")
    second = server.run_json("echo $SSH_CONNECTION")

    assert source_port(first) == source_port(second)
    assert len(sshd.sessions()) == 1
    assert server.server.pool.size() == 1


def test_connections_send_and_acknowledge_small_packets_at_once(
        server, make_sshd):
    # Without both, each new connection stalls 40 ms on sshd's Nagle
    # algorithm and our delayed acknowledgement (see _QuickAckSocket).
    sshd = make_sshd()
    server.register(sshd)

    server.run_json("true")

    [kept] = server.server.pool._kept.values()
    sock = kept.cxn.transport.sock
    assert isinstance(sock, sugar._QuickAckSocket)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_warm_runs_go_to_the_shell_kept_on_the_connection(server, make_sshd):
    sshd = make_sshd()
    server.register(sshd)
    show = "echo $$ $PPID $(cat /proc/$PPID/comm) $0"

    first, second = (server.run_json(show)["clients"][0]["stdout"].split()
                     for _ in range(2))

    assert first[0] != second[0]
    assert first[1:] == second[1:] == [first[1], LOGIN_SHELL, LOGIN_SHELL]
    assert len(sshd.sessions()) == 1


def test_a_command_that_ends_the_kept_shell_is_an_error_then_runs_go_on(
        server, make_sshd, tmp_path):
    sshd = make_sshd()
    server.register(sshd)
    ran = tmp_path / "ran"

    killed = server.run_json("echo 1 >> %s; kill -KILL $PPID" % ran)
    after = server.run_json("echo 2 >> %s; echo $0" % ran)

    assert [(c["status"], c["error"]) for c in killed["clients"]] == [
        ("error", "the command ended without an exit code: its shell or "
         "SSH session was killed or lost")]
    assert [(c["status"], c["stdout"]) for c in after["clients"]] == [
        ("ok", LOGIN_SHELL + "\n")]
    assert ran.read_text() == "1\n2\n"


def test_a_kept_shell_killed_while_a_process_it_left_runs_is_an_error(
        server, make_sshd):
    # The background sleep holds the channel open after the kept shell is
    # gone; sshd's exit status tells Sugar the shell ended.
    sshd = make_sshd()
    server.register(sshd)
    with left_running(server, "sleep 301.7 &", "301.7"):
        [killed] = server.run_json("kill -KILL $PPID; echo after",
                                   timeout="60")["clients"]
        after = server.run_json("echo next")

    assert (killed["status"], killed["error"]) == (
        "error", "the command ended without an exit code: its shell or SSH "
        "session was killed or lost")
    assert [(c["status"], c["stdout"]) for c in after["clients"]] == [
        ("ok", "next\n")]


def test_a_login_shell_that_cannot_keep_a_shell_gets_a_channel_per_run(
        server, make_sshd, tmp_path, caplog):
    # sshd hands every command to this program, which, like csh or fish,
    # cannot run the kept shell's POSIX loop but runs other commands.
    wrapper = tmp_path / "no-loops"
    wrapper.write_text('#!/bin/sh\ncase $SSH_ORIGINAL_COMMAND in\n'
                       '*"while IFS= read"*) echo no loops >&2; exit 1;;\n'
                       'esac\nexec bash -c "$SSH_ORIGINAL_COMMAND"\n')
    wrapper.chmod(0o755)
    sshd = make_sshd(["ForceCommand %s" % wrapper])
    server.register(sshd)
    caplog.set_level(logging.INFO, logger="sugar")

    runs = [server.run_json("echo run %d; echo warn >&2; exit 3" % number)
            for number in (1, 2)]

    assert [[(c["status"], c["exit_code"], c["stdout"], c["stderr"])
             for c in run["clients"]] for run in runs] == [
        [("failed", 3, "run 1\n", "warn\n")],
        [("failed", 3, "run 2\n", "warn\n")]]
    assert caplog.text.count("%s: the login shell cannot keep a shell "
                             "running; each command gets a channel"
                             % sshd.address) == 1
    assert len(sshd.sessions()) == 1


def test_a_timeout_or_kill_0_in_the_kept_shell_spares_earlier_runs_processes(
        server, make_sshd):
    sshd = make_sshd()
    server.register(sshd)
    with left_running(server, "sleep 301.5 >/dev/null 2>&1 &", "301.5"):
        [timed_out] = server.run_json("sleep 30", timeout="1")["clients"]
        killed = server.run_json("kill 0; echo never")
        leader = server.run_json("awk '{print $5 == $1}' /proc/$$/stat")
        left = sleeping("301.5")

    assert (timed_out["status"], timed_out["error"]) == (
        "timeout", "ran past its 1s limit and was stopped")
    assert [(c["status"], c["exit_code"], c["stdout"])
            for c in killed["clients"]] == [("failed", 143, "")]
    assert [c["stdout"] for c in leader["clients"]] == ["1\n"]
    assert len(left) == 1


def test_a_kept_shell_under_dash_runs_commands_in_a_session_of_their_own(
        server, make_sshd, tmp_path):
    # sshd hands every command to dash, as for a user whose login shell
    # is dash: the kept shell then puts each command in a session with
    # setsid.
    wrapper = tmp_path / "dash-login"
    wrapper.write_text('#!/bin/sh\nSHELL=/bin/dash exec /bin/dash -c '
                       '"$SSH_ORIGINAL_COMMAND"\n')
    wrapper.chmod(0o755)
    sshd = make_sshd(["ForceCommand %s" % wrapper])
    server.register(sshd)
    show = ("echo $0; cat /proc/$PPID/comm; "
            "awk '{print $1 == $5, $1 == $6}' /proc/$$/stat; exit 4")

    runs = [server.run_json(show) for _ in range(2)]

    assert [[(c["status"], c["exit_code"], c["stdout"]) for c in
             run["clients"]] for run in runs] == [
        [("failed", 4, "dash\ndash\n1 1\n")]] * 2
    assert len(sshd.sessions()) == 1


def test_output_left_by_a_background_process_is_not_a_later_commands(
        server, make_sshd):
    sshd = make_sshd()
    server.register(sshd)

    first = server.run_json("(sleep 1; echo late) & echo now")
    time.sleep(2)
    second = server.run_json("echo next")

    assert [c["stdout"] for c in first["clients"]] == ["now\n"]
    assert [c["stdout"] for c in second["clients"]] == ["next\n"]


def test_much_output_left_between_runs_is_dropped_with_its_kept_shell(
        server, make_sshd):
    # Over 2 MiB fills the channel's window: the writer waits for the
    # next run to read, and would write into that run's output.
    # The next run replaces the kept shell, and the writer's next write
    # fails, as after a plain ssh session.
    sshd = make_sshd()
    server.register(sshd)
    first = server.run_json("(sleep 0.3; head -c 3000017 /dev/zero | "
                            "tr '\\0' y; echo) & echo first")
    time.sleep(2)
    runs = [server.run_json("echo %s" % word) for word in ("second", "third")]
    writer = ("head", "-c", "3000017", "/dev/zero")
    wait_while(lambda: running_as(*writer))

    assert [c["stdout"] for c in first["clients"]] == ["first\n"]
    assert [[c["stdout"] for c in run["clients"]] for run in runs] == [
        ["second\n"], ["third\n"]]
    assert running_as(*writer) == []
    assert len(sshd.sessions()) == 1


def test_a_connection_lost_between_runs_is_replaced_and_runs_once(
        server, make_sshd, tmp_path):
    sshd = make_sshd()
    server.register(sshd)
    ran = tmp_path / "ran"
    first = server.run_json("echo $SSH_CONNECTION; echo 1 >> %s" % ran)

    sshd.stop()
    sshd.start()
    second = server.run_json("echo $SSH_CONNECTION; echo 2 >> %s" % ran)

    assert [c["status"] for c in second["clients"]] == ["ok"]
    assert source_port(first) != source_port(second)
    assert ran.read_text() == "1\n2\n"


def test_idle_connections_are_closed(tmp_path, user_key, make_sshd):
    running = Running(str(tmp_path / "idle"), user_key, idle_close=0.5)
    sshd = make_sshd()
    try:
        running.register(sshd)
        running.run_json("true")
        wait_while(sshd.sessions, 10)
        size = running.server.pool.size()
    finally:
        running.stop()

    assert sshd.sessions() == []
    assert size == 0


def test_pool_off_opens_a_connection_per_run(tmp_path, user_key, make_sshd):
    running = Running(str(tmp_path / "nopool"), user_key, pool=False)
    sshd = make_sshd()
    try:
        running.register(sshd)
        first = running.run_json("echo $SSH_CONNECTION")
        second = running.run_json("echo $SSH_CONNECTION")
        wait_while(sshd.sessions)
    finally:
        running.stop()

    assert source_port(first) != source_port(second)
    assert sshd.sessions() == []


def test_a_changed_address_or_a_deleted_client_drops_its_connection(
        server, make_sshd):
    first, second = make_sshd(), make_sshd()
    server.register(first, client_id="moving")
    server.run_json("true")
    assert len(first.sessions()) == 1

    server.register(second, client_id="moving",
                    hostkey=second.public_host_key())
    wait_while(first.sessions)
    moved = first.sessions()
    server.run_json("true")
    server.request("DELETE", "/clients/moving")
    wait_while(second.sessions)

    assert moved == []
    assert second.sessions() == []
    assert server.server.pool.size() == 0


def test_a_new_pinned_host_key_drops_the_connection_and_the_same_keeps_it(
        server, make_sshd):
    sshd, other = make_sshd(), make_sshd()
    server.register(sshd, hostkey=sshd.public_host_key())
    first = server.run_json("echo $SSH_CONNECTION")
    server.register(sshd, hostkey=sshd.public_host_key())
    same = server.run_json("echo $SSH_CONNECTION")

    server.register(sshd, hostkey=other.public_host_key())
    wait_while(sshd.sessions)

    assert source_port(first) == source_port(same)
    assert sshd.sessions() == []
    assert server.server.pool.size() == 0


def test_runs_at_the_same_time_share_the_kept_connection(server, make_sshd):
    sshd = make_sshd()
    server.register(sshd)
    server.run_json("true")
    answers = []

    def run():
        answers.append(server.run_json("sleep 1; echo $SSH_CONNECTION"))
    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len({source_port(a)[0] for a in answers}) == 1
    assert len(sshd.sessions()) == 1


def test_a_running_job_can_be_rerun_on_all_its_clients(server, fleet):
    for sshd in fleet:
        server.register(sshd)
    server.post("/run", command="sleep 2; exit 1", **{"async": "1"})

    status, _, body = server.post("/run", {"Accept": "application/json"},
                                  rerun="1")

    assert status == 200
    assert sorted(c["address"] for c in json.loads(body)["clients"]) == \
        sorted(s.address for s in fleet)


def test_odd_numbers_and_empty_targets_are_refused(server, make_sshd):
    server.register(make_sshd())

    assert server.request("GET", "/jobs/%C2%B2")[0] == 404
    assert server.request("GET", "/jobs/1" + "0" * 5000)[0] in (404, 414)
    assert server.request("GET", "/jobs?limit=%C2%B2")[0] == 400
    assert server.post("/run", command="true", timeout="1e3")[0] == 400
    assert server.post("/run", command="true", target="")[0::2] == (
        400, "field 'target': '' has an empty pattern; send comma-separated "
        "globs such as web*,10.0.0.*,!web3\n")
    assert server.post("/run", command="true", target="[a-" * 101)[0::2] == (
        400, "field 'target': pattern '[a-[a-[a-[a-[a-[a-[a-[a-[a-[a-[a-[a-"
        "[a-['... is longer than 300 characters, more than any id or "
        "address; send shorter ones\n")
    assert server.post("/run", command="true", target=",".join(
        "h%d*" % n for n in range(1001)))[0::2] == (
        400, "field 'target': more than 1000 patterns with *, ? or [; name "
        "the clients, or send fewer and wider globs\n")
    assert server.post("/run", {"Idempotency-Key": "clé".encode()},
                       command="true")[0::2] == (
        400, "header 'Idempotency-Key': 'clé' is not 1 to 255 visible "
        "ASCII characters\n")
    assert server.request("GET", "/clients?target=a,,b")[0::2] == (
        400, "query 'target': 'a,,b' has an empty pattern; send "
        "comma-separated globs such as web*,10.0.0.*,!web3\n")
    assert server.log_files() == []


@pytest.mark.parametrize("env,line", [
    ({"REGISTRY": "same", "JOBS": "same"}, "REGISTRY and JOBS name the same "
     "file 'same'; give each its own"),
    ({"TOKEN": "short"}, "TOKEN is not allowed; use 16 to 256 visible "
     "ASCII characters (its value is not shown)"),
    ({"LOG_DIR": "/etc/passwd"}, "LOG_DIR='/etc/passwd' is not a folder; "
     "name a folder, or a path where one can be made"),
])
def test_more_bad_settings_stop_the_launcher(tmp_path, env, line):
    process = launch(tmp_path, env, wait_for_line=False)
    out, err = process.communicate(timeout=30)

    assert (process.returncode, err) == (2, "sugar: %s\n" % line)


def test_a_second_sigterm_cuts_the_grace_short(tmp_path, make_sshd,
                                               user_key):
    sshd = make_sshd()
    port = free_port()
    process = launch(tmp_path, {"PORT": str(port), "HOST": "127.0.0.1",
                                "SSH_KEY": user_key, "GRACE": "60"})
    http_post(port, "/register", {"id": "a", "address": sshd.address,
                                  "username": USER})
    http_post(port, "/run", {"command": "sleep 300.25", "async": "1"})
    wait_while(lambda: not sleeping("300.25"), 20)
    clock = time.monotonic()

    process.terminate()
    time.sleep(1)
    process.terminate()
    process.communicate(timeout=60)

    assert process.returncode == 0
    assert time.monotonic() - clock < 30
    wait_while(lambda: sleeping("300.25"))
    assert sleeping("300.25") == []


def test_the_log_shows_output_while_the_command_runs(server, make_sshd):
    sshd = make_sshd()
    server.register(sshd)
    server.post("/run", command="echo early; sleep 3", **{"async": "1"})

    deadline = time.monotonic() + 10
    log = ""
    while "--- stdout ---\nearly\n" not in log and \
            time.monotonic() < deadline:
        try:
            log = server.read_log(sshd)
        except FileNotFoundError:
            pass
        time.sleep(0.1)

    assert "--- stdout ---\nearly\n" in log
    assert "=== end" not in log


def test_a_frozen_kept_connection_is_given_up_for_a_new_one(
        server, make_sshd):
    sshd = make_sshd()
    server.register(sshd)
    server.run_json("true")
    [frozen] = sshd.sessions()
    os.kill(frozen, signal.SIGSTOP)
    try:
        clock = time.monotonic()
        [client] = json.loads(server.post(
            "/run", {"Accept": "application/json"}, command="echo fresh",
            timeout="3")[2])["clients"]
        took = time.monotonic() - clock
    finally:
        os.kill(frozen, signal.SIGCONT)

    print("run past a frozen kept connection took %.2fs" % took)
    assert (client["status"], client["stdout"]) == ("ok", "fresh\n")
    assert took < 20


def test_a_script_download_cut_short_does_not_run(server, make_sshd):
    sshd = make_sshd()
    server.register(sshd)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def answer_short():
        connection, _ = listener.accept()
        connection.recv(4096)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
                           b"echo short\n")
        connection.close()
    thread = threading.Thread(target=answer_short)
    thread.start()
    url = "http://127.0.0.1:%d/short.sh" % listener.getsockname()[1]

    status, _, body = server.post("/run", url=url)
    thread.join()
    listener.close()

    assert (status, body) == (502, "could not fetch %r: the download ended "
                              "989 bytes short of its Content-Length; "
                              "nothing ran\n" % url)
    assert server.log_files() == []
