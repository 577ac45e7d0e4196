"""Sugar: run shell commands on a fleet of machines over SSH.

Each machine registers itself with one HTTP request; Sugar keeps the
registry and, when asked, runs a command on every registered machine over
SSH, in parallel, and appends each machine's output to a log file of its
own.  Nothing runs on the machines but their own sshd.

Set up a machine (a "client") once::

    ssh-copy-id root@client
    curl -d "address=client.fqdn&id=$(</etc/machine-id)" server:9999/register

then run a command on all of them::

    curl -d "command=whoami" server:9999/run

The server is `Server`; `Client` is one registered machine and can be used
on its own.  The launcher, ``sugar_server``, reads its settings from the
environment (see `settings_from_environ`).

Limits, in plain words (the README says more):

- The registry is a `shelve`.  A shelf is not safe for concurrent writers,
  so every access goes through one lock, and entries are copies: an entry
  changed in memory must be stored again to be kept.
- Every run opens a new SSH connection to each client.
- Output is held in memory until the client's command ends.
- The server accepts whatever host key a client presents (Fabric's default).
- When the server stops, commands still running are abandoned.
"""

__all__ = [
    "Client",
    "Result",
    "Server",
    "SettingError",
    "bind_error_message",
    "settings_from_environ",
]

import codecs
import concurrent.futures
import datetime
import errno
import hashlib
import http.server
import ipaddress
import json
import logging
import os
import re
import select
import shelve
import shlex
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.parse

import fabric
import paramiko


logger = logging.getLogger("sugar")

DEFAULT_PORT = 9999
DEFAULT_WORKERS = 8
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_COMMAND_TIMEOUT = 300.0
DEFAULT_MAX_OUTPUT = 1024 * 1024
MAX_COMMAND_TIMEOUT = 7 * 24 * 3600
DEFAULT_REGISTRY = "sugar-registry"
DEFAULT_USERNAME = "root"
MAX_WORKERS = 1024
MAX_BODY = 64 * 1024
REQUEST_TIMEOUT = 30
READ_SIZE = 32768
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# ---------------------------------------------------------------------------
# Validation of what clients send
# ---------------------------------------------------------------------------

class _BadField(ValueError):
    """A form field holds a value Sugar cannot accept."""

    def __init__(self, field, problem):
        super().__init__("field %r: %s" % (field, problem))
        self.field = field


_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
_USERNAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\Z")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_PORT = re.compile(r"[0-9]{1,5}\Z")


def _check_id(value):
    """Return *value* if it looks like a machine-id, else raise _BadField."""
    if not _ID.match(value) or ".." in value:
        raise _BadField("id", (
            "%r is not a machine id; send up to 128 letters, digits, '.', "
            "'_' or '-', such as the content of /etc/machine-id"
        ) % value)
    return value


def _check_username(value):
    """Return *value* if it is a valid POSIX user name, else raise."""
    if not _USERNAME.match(value):
        raise _BadField("username", (
            "%r is not a user name; use up to 32 letters, digits, '.', '_' "
            "or '-', not starting with '-' or a digit"
        ) % value)
    return value


def _check_host(host, field):
    """Return *host*, an IP address or host name, else raise _BadField."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if (not host or len(host) > 253
            or not all(_LABEL.match(label) for label in labels)
            or labels[-1].isdigit()):
        raise _BadField(field, (
            "%r is not a host name or IP address; send a name such as "
            "web1.example.com, an IPv4 address or an IPv6 address"
        ) % host[:300])
    return host


def _check_port(port, field):
    if not _PORT.match(port) or not 1 <= int(port) <= 65535:
        raise _BadField(field, (
            "port %r is not a number from 1 to 65535" % port[:20]))
    return int(port)


def _parse_address(value, field="address"):
    """Split an address into ``(host, port)``; the port is 22 when absent.

    Accepts ``host``, ``host:port``, an IPv4 address with an optional port,
    a bare IPv6 address and ``[IPv6]:port``.  Raises _BadField otherwise.
    """
    if len(value) > 253 + len("[]:65535"):
        raise _BadField(field, "%d characters is too long; a host name has "
                       "at most 253" % len(value))
    bracketed = re.match(r"\[([^\]]*)\](?::(.*))?\Z", value)
    if bracketed:
        host, port = bracketed.groups()
        if ":" not in host:
            raise _BadField(field, "%r: only IPv6 addresses go in brackets"
                           % value)
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, None
    host = _check_host(host, field)
    return host, 22 if port is None else _check_port(port, field)


def _format_address(host, port):
    """The address as a user writes it: ``host``, ``host:port``, ``[v6]:p``."""
    if port == 22:
        return host
    if ":" in host:
        return "[%s]:%d" % (host, port)
    return "%s:%d" % (host, port)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def _timestamp(moment=None):
    """ISO 8601 in UTC, to the millisecond, e.g. 2026-12-03T17:40:00.123Z."""
    moment = moment or _now()
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Registry:
    """The registered clients, in a shelf keyed by client id.

    Each entry is a dict with ``id``, ``host``, ``port``, ``username``,
    ``registered`` and ``last_seen``.  A shelf allows one writer at a time,
    so every access holds the registry's lock; each change is synced to disk
    before the call returns.
    """

    def __init__(self, path):
        self.path = path
        self._lock = threading.Lock()
        self._shelf = shelve.open(path)

    def register(self, client_id, host, port, username):
        """Add or update a client; return ``(entry, previous or None)``."""
        with self._lock:
            previous = self._shelf.get(client_id)
            stamp = _timestamp()
            entry = {
                "id": client_id,
                "host": host,
                "port": port,
                "username": username,
                "registered": previous["registered"] if previous else stamp,
                "last_seen": stamp,
            }
            self._shelf[client_id] = entry
            self._shelf.sync()
        return entry, previous

    def clients(self):
        """Every entry, ordered by address."""
        with self._lock:
            entries = list(self._shelf.values())
        return sorted(entries, key=lambda e: (e["host"], e["port"], e["id"]))

    def close(self):
        with self._lock:
            self._shelf.close()


# ---------------------------------------------------------------------------
# Per-client log files
# ---------------------------------------------------------------------------

_log_locks = {}
_log_locks_guard = threading.Lock()


def _log_name(address):
    """The log file name for *address*: unsafe characters become '_'.

    Addresses are validated host names or IP addresses, so the name never
    contains a path separator nor starts with a dot.
    """
    return re.sub(r"[^A-Za-z0-9.-]", "_", address) + ".txt"


def _log_path(log_dir, address):
    folder = os.path.realpath(log_dir)
    path = os.path.join(folder, _log_name(address))
    if os.path.dirname(path) != folder:
        raise ValueError("log file %r would leave %r" % (path, folder))
    return path


def _log_lock(path):
    with _log_locks_guard:
        return _log_locks.setdefault(path, threading.Lock())


class _Sink:
    """A text file being written that remembers its last character."""

    def __init__(self, file):
        self.file = file
        self.ends_line = True

    def write(self, text):
        if text:
            self.file.write(text)
            self.ends_line = text.endswith("\n")

    def end_line(self):
        if not self.ends_line:
            self.write("\n")


class _LogEntry:
    """One run's entry in a client's log, written while the command runs.

    Stdout goes straight into the log file as it arrives; stderr is spooled
    and follows it when the command ends.  When another run on the same
    client is writing the log, stdout is spooled too, so entries never
    interleave.  Either way memory holds at most *spool* characters.
    """

    def __init__(self, path, started, command, spool):
        self.path = path
        self._lock = _log_lock(path)
        self._direct = self._lock.acquire(blocking=False)
        try:
            if self._direct:
                out = open(path, "a", encoding="utf-8")
            else:
                out = self._spool(path, spool)
            self.stdout = _Sink(out)
            self.stderr = _Sink(self._spool(path, spool))
        except BaseException:
            self._release()
            raise
        self.stdout.write("=== %s\ncommand: %s\n--- stdout ---\n" % (
            started, command.replace("\n", "\n  ")))

    @staticmethod
    def _spool(path, size):
        return tempfile.SpooledTemporaryFile(
            size, "w+", encoding="utf-8", dir=os.path.dirname(path))

    def close(self, outcome):
        """Finish the entry with *outcome* and release the log."""
        try:
            self.stdout.end_line()
            self.stderr.end_line()
            if not self._direct:
                self._lock.acquire()
                self._direct = True
                spooled, self.stdout.file = self.stdout.file, open(
                    self.path, "a", encoding="utf-8")
                self._copy(spooled, self.stdout.file)
            self.stdout.file.write("--- stderr ---\n")
            self._copy(self.stderr.file, self.stdout.file)
            self.stdout.file.write("result: %s\n=== end\n\n" % outcome)
        finally:
            self.stdout.file.close()
            self._release()

    @staticmethod
    def _copy(spooled, log):
        spooled.seek(0)
        shutil.copyfileobj(spooled, log)
        spooled.close()

    def _release(self):
        if self._direct:
            self._lock.release()


# ---------------------------------------------------------------------------
# Running a command on one client
# ---------------------------------------------------------------------------

STATUSES = ("ok", "failed", "timeout", "unreachable", "auth", "error")


class Result:
    """What happened when a command ran on one client.

    ``status`` is one of `STATUSES`: ``ok`` (exit code 0), ``failed``
    (another exit code), ``timeout`` (the command ran past its limit and
    was stopped), ``unreachable`` (the client could not be reached),
    ``auth`` (the client refused the key) or ``error`` (anything else);
    ``error`` then says why, in one line.  ``stdout`` and ``stderr`` hold
    the end of the output; ``stdout_cut`` and ``stderr_cut`` count the
    bytes left out before it (the log file has them all).
    """

    def __init__(self, client, command):
        self.id = client.id
        self.address = client.address
        self.username = client.username
        self.command = command
        self.started = _timestamp()
        self.status = "error"
        self.exit_code = None
        self.error = None
        self.stdout = self.stderr = ""
        self.stdout_cut = self.stderr_cut = 0
        self.digest = hashlib.sha256(b"").hexdigest()
        self.duration = 0.0
        self.log = None

    @property
    def ok(self):
        return self.status == "ok"

    @property
    def outcome(self):
        """One line: ``exit code N`` or ``<status>: <why>``."""
        if self.exit_code is not None:
            return "exit code %d" % self.exit_code
        return "%s: %s" % (self.status, self.error)

    def as_dict(self):
        return {
            "id": self.id, "address": self.address,
            "username": self.username, "status": self.status,
            "exit_code": self.exit_code, "error": self.error,
            "stdout": self.stdout, "stderr": self.stderr,
            "stdout_cut": self.stdout_cut, "stderr_cut": self.stderr_cut,
            "digest": self.digest, "started": self.started,
            "duration": round(self.duration, 3), "log": self.log,
        }

    def __repr__(self):
        return "<Result %s %s>" % (self.address, self.outcome)


def _describe_connect_error(exc, client, timeout, spoke):
    """Map a connection failure to ``(status, one line for a person)``.

    *spoke* tells whether the client's end answered in SSH at all.
    """
    where = "%s port %d" % (client.host, client.port)
    if isinstance(exc, paramiko.AuthenticationException):
        return "auth", (
            "authentication failed for %s@%s; add the server's key to the "
            "client's authorized_keys (ssh-copy-id)" % (client.username,
                                                        client.host))
    if isinstance(exc, paramiko.BadHostKeyException):
        return "error", "host key of %s changed: %s" % (where, exc)
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        exc = next(iter(exc.errors.values()))
    if isinstance(exc, socket.gaierror):
        return "unreachable", (
            "cannot resolve host name %r; check the address registered for "
            "it" % client.host)
    if isinstance(exc, (socket.timeout, TimeoutError)) or (
            isinstance(exc, paramiko.SSHException) and not spoke):
        return "unreachable", (
            "timed out connecting to %s after %gs; check that sshd answers "
            "there" % (where, timeout))
    if isinstance(exc, ConnectionRefusedError):
        return "unreachable", (
            "connection refused by %s; check that sshd runs there and the "
            "registered address" % where)
    if isinstance(exc, OSError) and exc.errno in (
            errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable", "no route to %s" % where
    if isinstance(exc, OSError) and exc.errno is not None:
        return "unreachable", "cannot connect to %s: %s" % (
            where, exc.strerror)
    return "error", "%s: %s" % (type(exc).__name__, exc)


class _Stream:
    """One output stream of a command: all of it to the log, its tail kept.

    The log gets the text as it arrives, decoded incrementally so a UTF-8
    character split across reads stays whole; bytes that are not UTF-8
    become ``\\xNN`` escapes.  At most *limit* bytes, the latest, stay in
    memory.
    """

    def __init__(self, sink, limit):
        self._sink = sink
        self._limit = limit
        self._decoder = codecs.getincrementaldecoder("utf-8")(
            "backslashreplace")
        self._tail = bytearray()
        self._hash = hashlib.sha256()
        self.cut = 0

    def feed(self, data):
        self._sink.write(self._decoder.decode(data))
        self._hash.update(data)
        self._tail += data
        if len(self._tail) > 2 * self._limit:
            self._trim()

    def _trim(self):
        extra = len(self._tail) - self._limit
        if extra > 0:
            del self._tail[:extra]
            self.cut += extra

    def finish(self):
        """Flush the log side; return ``(tail text, sha256 digest)``."""
        self._sink.write(self._decoder.decode(b"", final=True))
        self._trim()
        tail = bytes(self._tail)
        if self.cut:
            # The cut may fall inside a character: start at the next one.
            start = 0
            while start < min(3, len(tail)) and 0x80 <= tail[start] < 0xC0:
                start += 1
            self.cut += start
            tail = tail[start:]
        return tail.decode("utf-8", "backslashreplace"), self._hash.digest()


def _drain(channel, out, err, deadline):
    """Feed *channel*'s stdout and stderr to the streams until both end.

    Returns False if *deadline* (a `time.monotonic` value) came first.
    """
    poller = select.poll()
    poller.register(channel.fileno(), select.POLLIN)
    while True:
        if channel.recv_ready():
            out.feed(channel.recv(READ_SIZE))
        elif channel.recv_stderr_ready():
            err.feed(channel.recv_stderr(READ_SIZE))
        elif channel.eof_received or channel.closed:
            return True
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(min(left, 1.0) * 1000)


def _limited(command, timeout):
    """A remote command line that runs *command* for at most *timeout* s.

    The command runs in the user's login shell, as sshd would run it, under
    `timeout`, which ends the command's whole process group when the time
    is up (then KILLs it 2 s later) even if the server is gone by then.
    """
    quoted = shlex.quote(command)
    return (
        "if command -v timeout >/dev/null 2>&1; then "
        "exec timeout -k 2 %g \"$SHELL\" -c %s; else exec \"$SHELL\" -c %s; "
        "fi" % (timeout, quoted, quoted))


class Client:
    """One machine reached over SSH.

    *address* is ``host``, ``host:port`` or ``[IPv6]:port``.  Commands run
    as *username* with the user's default SSH keys and agent, or with only
    *ssh_key* when given, for at most *command_timeout* seconds.  Each run
    is appended to ``<address>.txt`` in *log_dir*; at most *max_output*
    bytes of each stream are kept in the Result.
    """

    def __init__(self, address, username=DEFAULT_USERNAME, *, id=None,
                 log_dir=".", connect_timeout=DEFAULT_CONNECT_TIMEOUT,
                 command_timeout=DEFAULT_COMMAND_TIMEOUT,
                 max_output=DEFAULT_MAX_OUTPUT, ssh_key=None,
                 ssh_config=None):
        self.host, self.port = _parse_address(address)
        self.address = _format_address(self.host, self.port)
        self.username = _check_username(username)
        self.id = id or self.address
        self.log_dir = log_dir
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.max_output = max_output
        self.ssh_key = ssh_key
        self._ssh_config = ssh_config

    @classmethod
    def from_entry(cls, entry, **options):
        """The Client for a registry *entry*."""
        return cls(_format_address(entry["host"], entry["port"]),
                   entry["username"], id=entry["id"], **options)

    def _connection(self):
        # Fabric rounds connect_timeout down to whole seconds (and 0 means
        # none), so the timeouts go to paramiko as they are.
        options = {
            "timeout": self.connect_timeout,
            "banner_timeout": self.connect_timeout,
            "auth_timeout": self.connect_timeout,
        }
        if self.ssh_key:
            options.update(key_filename=[self.ssh_key], look_for_keys=False,
                           allow_agent=False)
        return fabric.Connection(
            self.host, user=self.username, port=self.port,
            config=self._ssh_config, connect_kwargs=options)

    def run_command(self, command, timeout=None):
        """Run *command* here, log it, and return a `Result`.

        Never raises for a problem on the client's side: a client that
        cannot be reached, refuses the key or runs past *timeout* seconds
        (default: the client's ``command_timeout``) gives a Result whose
        ``status`` says so.  The command gets no input (end of file at
        once) and its output is not echoed anywhere.
        """
        result = Result(self, command)
        clock = time.monotonic()
        entry = _LogEntry(_log_path(self.log_dir, self.address),
                          result.started, command, self.max_output)
        result.log = entry.path
        try:
            self._run(command, timeout or self.command_timeout, result,
                      entry)
        finally:
            result.duration = time.monotonic() - clock
            entry.close(result.outcome)
        logger.info("%s: %s: %s (%.2fs)", self.address, command,
                    result.outcome, result.duration)
        return result

    def _run(self, command, timeout, result, entry):
        cxn = self._connection()
        try:
            try:
                cxn.open()
            except (OSError, paramiko.SSHException, EOFError) as exc:
                transport = cxn.client.get_transport()
                spoke = bool(transport and transport.remote_version)
                result.status, result.error = _describe_connect_error(
                    exc, self, self.connect_timeout, spoke)
                return
            self._execute(cxn, command, timeout, result, entry)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            result.status = "error"
            result.error = "connection to %s lost: %s" % (self.address, exc)
        finally:
            cxn.close()

    def _execute(self, cxn, command, timeout, result, entry):
        out = _Stream(entry.stdout, self.max_output)
        err = _Stream(entry.stderr, self.max_output)
        channel = cxn.create_session()
        try:
            started = time.monotonic()
            channel.exec_command(_limited(command, timeout))
            channel.shutdown_write()
            # The remote `timeout` stops the command; past this grace the
            # server gives up waiting for it.
            ended = _drain(channel, out, err, started + timeout + 5)
            code = channel.recv_exit_status() if ended else -1
            elapsed = time.monotonic() - started
        finally:
            channel.close()
        (result.stdout, out_digest), (result.stderr, err_digest) = (
            out.finish(), err.finish())
        result.stdout_cut, result.stderr_cut = out.cut, err.cut
        result.digest = hashlib.sha256(out_digest + err_digest).hexdigest()
        self._judge(result, code, elapsed, timeout)

    @staticmethod
    def _judge(result, code, elapsed, timeout):
        if elapsed >= timeout and code in (-1, 124, 128 + signal.SIGKILL):
            result.status = "timeout"
            result.error = "ran past its %gs limit and was stopped" % timeout
        elif code < 0:
            result.status = "error"
            result.error = "the command ended without an exit code"
        else:
            result.exit_code = code
            result.status = "ok" if code == 0 else "failed"


# ---------------------------------------------------------------------------
# HTTP interface
# ---------------------------------------------------------------------------

class _HTTPProblem(Exception):
    """An HTTP error answer: a status and one line naming what to fix."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status = status
        self.headers = dict(headers)


_FORM_TYPE = "application/x-www-form-urlencoded"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers the HTTP API; the `Server` is ``self.server.sugar``."""

    protocol_version = "HTTP/1.1"
    server_version = "Sugar"
    timeout = REQUEST_TIMEOUT
    routes = {
        "/": {"GET": "usage"},
        "/register": {"POST": "register"},
        "/run": {"POST": "run"},
    }

    def log_message(self, format, *args):
        logger.info("%s %s", self.address_string(), format % args)

    def log_error(self, format, *args):
        logger.warning("%s %s", self.address_string(), format % args)

    def send_error(self, code, message=None, explain=None):
        """Answer every error, ours or http.server's, as one line."""
        self._reply(code, message or self.responses[code][0],
                    {"Connection": "close"})

    def _reply(self, status, text, headers=None, content_type=None):
        body = text.encode("utf-8")
        if content_type is None and status >= 400 and self._wants_json():
            body = json.dumps({"error": text.rstrip("\n")}).encode() + b"\n"
            content_type = "application/json"
        elif not body.endswith(b"\n"):
            body += b"\n"
        self.send_response(status)
        self.send_header("Content-Type",
                         content_type or "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            if name.lower() == "connection" and value == "close":
                self.close_connection = True
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reply_json(self, status, document):
        self._reply(status, json.dumps(document, indent=2),
                    content_type="application/json")

    def _wants_json(self):
        accept = getattr(self, "headers", None) and self.headers["Accept"]
        return bool(accept) and "application/json" in accept

    def _dispatch(self):
        try:
            path = urllib.parse.urlsplit(self.path).path
            methods = self.routes.get(path)
            if methods is None:
                raise _HTTPProblem(404, "no such path: %r; Sugar answers %s"
                                  % (path, ", ".join(self.routes)))
            if self.command not in methods:
                allowed = ", ".join(sorted(methods))
                raise _HTTPProblem(405, "%s is not allowed on %s; use %s"
                                  % (self.command, path, allowed),
                                  {"Allow": allowed})
            getattr(self, "do_" + methods[self.command])()
        except _HTTPProblem as exc:
            self._reply(exc.status, str(exc), exc.headers)
        except (ConnectionError, socket.timeout):
            self.close_connection = True
            logger.info("%s connection dropped", self.address_string())
        except Exception:
            logger.exception("%s %s %s failed", self.address_string(),
                             self.command, self.path)
            self.close_connection = True
            self._reply(500, "internal error in Sugar; the server log has "
                        "the details", {"Connection": "close"})

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _dispatch

    def _read_form(self, allowed):
        """The urlencoded body as a dict of single values.

        Raises _HTTPProblem for a body Sugar cannot take: 411, 400, 413,
        415, or 400 naming a repeated or unknown field.
        """
        length = self.headers["Content-Length"]
        if length is None:
            raise _HTTPProblem(411, "Content-Length is missing; send the "
                              "form with a length (curl -d does)",
                              {"Connection": "close"})
        if not length.isdigit():
            raise _HTTPProblem(400, "Content-Length %r is not a number"
                              % length[:40], {"Connection": "close"})
        if int(length) > MAX_BODY:
            raise _HTTPProblem(413, "body of %s bytes is over the limit of "
                              "%d bytes" % (length, MAX_BODY),
                              {"Connection": "close"})
        body = self.rfile.read(int(length))
        kind = (self.headers["Content-Type"] or "").split(";")[0].strip()
        if kind.lower() != _FORM_TYPE:
            raise _HTTPProblem(415, "Content-Type %r is not %s; send the "
                              "fields as with curl -d"
                              % (kind, _FORM_TYPE))
        if len(body) < int(length):
            raise _HTTPProblem(400, "body ended after %d of %s bytes"
                              % (len(body), length), {"Connection": "close"})
        return self._parse_form(body, allowed)

    @staticmethod
    def _parse_form(body, allowed):
        try:
            pairs = urllib.parse.parse_qsl(
                body.decode("utf-8"), keep_blank_values=True,
                strict_parsing=bool(body), errors="strict",
                max_num_fields=len(allowed) + 1)
        except UnicodeDecodeError:
            raise _HTTPProblem(400, "the body is not valid UTF-8 once "
                              "url-decoded") from None
        except ValueError:
            raise _HTTPProblem(400, "the body is not a urlencoded form "
                              "(name=value&name=value)") from None
        form = {}
        for name, value in pairs:
            if name not in allowed:
                raise _HTTPProblem(400, "field %r is unknown; this endpoint "
                                  "takes %s" % (name[:40],
                                                ", ".join(allowed)))
            if name in form:
                raise _HTTPProblem(400, "field %r is given twice; send it "
                                  "once" % name)
            form[name] = value
        return form

    def do_usage(self):
        self._reply(200, _USAGE)

    def do_register(self):
        form = self._read_form(("id", "address", "username"))
        sugar = self.server.sugar
        try:
            client_id = _check_id(_required(form, "id"))
            if "address" in form:
                host, port = _parse_address(form["address"])
            else:
                host, port = _requester_host(self.client_address[0]), 22
            username = _check_username(form.get("username", DEFAULT_USERNAME))
        except _BadField as exc:
            raise _HTTPProblem(400, str(exc)) from None
        entry, previous = sugar.registry.register(
            client_id, host, port, username)
        address = _format_address(host, port)
        if previous is None:
            logger.info("%s: registered client %s", address, client_id)
            self._reply(201, "added client %s at %s as %s"
                        % (client_id, address, username))
            return
        before = _format_address(previous["host"], previous["port"])
        logger.info("%s: client %s registered again (was %s)", address,
                    client_id, before)
        self._reply(200, "updated client %s at %s as %s (was %s as %s)"
                    % (client_id, address, username, before,
                       previous["username"]))

    def do_run(self):
        form = self._read_form(("command", "timeout", "stream"))
        command = _required(form, "command")
        if not command.strip():
            raise _HTTPProblem(400, "field 'command' is empty; send the "
                               "shell command to run")
        timeout = _seconds(form, "timeout", MAX_COMMAND_TIMEOUT)
        stream = _flag(form, "stream")
        futures = self.server.sugar.start_run(command, timeout)
        if stream:
            self._stream_run(command, futures)
            return
        results = [future.result() for future in futures]
        if self._wants_json():
            self._reply_json(200, _run_document(command, results))
        else:
            self._reply(200, _run_text(results))

    def _stream_run(self, command, futures):
        """Answer /run in chunks: a line per client as it ends, then all."""
        ndjson = "application/x-ndjson" in (self.headers["Accept"] or "")
        self._chunked = self.request_version != "HTTP/1.0"
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson" if ndjson
                         else "text/plain; charset=utf-8")
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        self.end_headers()
        width = max([len(f.client.address) for f in futures] or [0])
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            self._send_chunk(
                json.dumps(result.as_dict()) + "\n" if ndjson
                else "%-*s  %s\n" % (width, result.address, result.outcome))
        results = [future.result() for future in futures]
        if ndjson:
            document = _run_document(command, results)
            del document["clients"]
            self._send_chunk(json.dumps(document) + "\n")
        else:
            self._send_chunk(_run_text(results, outcomes=False))
        if self._chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _send_chunk(self, text):
        """Send *text* now, as a chunk unless the client speaks HTTP/1.0."""
        data = text.encode("utf-8")
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self.wfile.write(data)
        self.wfile.flush()


def _required(form, name):
    if name not in form:
        raise _HTTPProblem(400, "field %r is missing" % name)
    return form[name]


def _seconds(form, name, most):
    """The optional number of seconds in *form*, or None when absent."""
    if name not in form:
        return None
    try:
        value = float(form[name])
    except ValueError:
        value = -1.0
    if not 0.1 <= value <= most:
        raise _HTTPProblem(400, "field %r: %r is not a number of seconds "
                           "from 0.1 to %d" % (name, form[name][:40], most))
    return value


def _flag(form, name):
    value = form.get(name, "0")
    if value not in ("0", "1"):
        raise _HTTPProblem(400, "field %r: %r is not allowed; send 1 or 0"
                           % (name, value[:40]))
    return value == "1"


def _requester_host(address):
    """The requester's IP, with IPv4-mapped IPv6 written as plain IPv4."""
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def _summary(results):
    """``{status: [address, ...]}`` for the statuses that occurred."""
    summary = {}
    for status in STATUSES:
        addresses = [r.address for r in results if r.status == status]
        if addresses:
            summary[status] = addresses
    return summary


def _totals(results):
    totals = {"clients": len(results)}
    for status, addresses in _summary(results).items():
        totals[status] = len(addresses)
    return totals


def _groups(results):
    """Clients with identical status, exit code and output, in order."""
    groups = {}
    for result in results:
        key = (result.status, result.exit_code, result.digest)
        groups.setdefault(key, []).append(result)
    return list(groups.values())


def _run_text(results, outcomes=True):
    """The terminal-friendly answer of /run.

    A line per client with its outcome (unless *outcomes* is false, as
    when they were already streamed), then each distinct output once under
    the clients that printed it, then a recap of the clients per status.
    """
    if not results:
        return ("no clients are registered, so nothing ran; register one "
                "with: curl -d \"id=$(</etc/machine-id)\" SERVER/register\n")
    lines = []
    if outcomes:
        width = max(len(r.address) for r in results)
        lines += ["%-*s  %s" % (width, r.address, r.outcome)
                  for r in results]
    for group in _groups(results):
        lines += _output_lines(group)
    lines.append(_recap(results))
    return "\n".join(lines) + "\n"


def _output_lines(group):
    """The output of a group of clients, under the list of them."""
    first, lines = group[0], []
    names = ", ".join(r.address for r in group)
    for name, text, cut in (("stdout", first.stdout, first.stdout_cut),
                            ("stderr", first.stderr, first.stderr_cut)):
        if text:
            lines.append("--- %s %s:" % (names, name))
            if cut:
                lines.append("[... %d bytes cut here; the log has them all]"
                             % cut)
            lines.append(text.rstrip("\n"))
    return lines


def _recap(results):
    """Counts per status, then the clients of each (unless all are ok)."""
    totals = _totals(results)
    counts = ", ".join("%d %s" % (n, status) for status, n in totals.items()
                       if status != "clients")
    lines = ["%d client%s: %s" % (len(results), "s"[len(results) == 1:],
                                  counts)]
    summary = _summary(results)
    if list(summary) != ["ok"]:
        lines += ["%s: %s" % (status, ", ".join(addresses))
                  for status, addresses in summary.items()]
    return "\n".join(lines)


def _run_document(command, results):
    return {
        "command": command,
        "clients": [result.as_dict() for result in results],
        "groups": [{
            "clients": [r.address for r in group],
            "status": group[0].status,
            "exit_code": group[0].exit_code,
            "digest": group[0].digest,
        } for group in _groups(results)],
        "summary": _summary(results),
        "totals": _totals(results),
    }


_USAGE = """Sugar runs shell commands on registered machines over SSH.

POST /register  id=<machine-id> [address=<host[:port]>] [username=<user>]
POST /run       command=<shell command>

  curl -d "address=client.fqdn&id=$(</etc/machine-id)" SERVER/register
  curl -d "command=whoami" SERVER/run
"""


# ---------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------

class _HTTPServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer bound to the address family *host* needs."""

    def __init__(self, host, port, sugar):
        self.sugar = sugar
        self.address_family, bind_host = _family(host)
        super().__init__((bind_host, port), _Handler)

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY,
                                   0)
        super().server_bind()


def _family(host):
    """The socket family and bind address for *host* ('' is every one)."""
    if not host:
        return (socket.AF_INET6, "::") if socket.has_ipv6 else (
            socket.AF_INET, "0.0.0.0")
    info = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM,
                              flags=socket.AI_PASSIVE)
    return info[0][0], info[0][4][0]


class Server:
    """The Sugar server: a registry, an HTTP API and a pool of SSH workers.

    Binds at once (so a taken port fails here); `serve` answers requests
    until `shutdown` is called from another thread.  At most *workers* SSH
    sessions are open at once, over all runs together.

    Example, with three clients of which one is down::

        server = Server(workers=8, port=9999)
        for result in server.run("uptime"):
            print(result.address, result.outcome)
        # 10.0.0.5  exit code 0
        # 10.0.0.6  unreachable: connection refused by 10.0.0.6 port 22 ...
        # 10.0.0.7  exit code 0
    """

    def __init__(self, workers=DEFAULT_WORKERS, port=DEFAULT_PORT, *,
                 host="", registry=DEFAULT_REGISTRY, log_dir=".",
                 connect_timeout=DEFAULT_CONNECT_TIMEOUT,
                 command_timeout=DEFAULT_COMMAND_TIMEOUT,
                 max_output=DEFAULT_MAX_OUTPUT, ssh_key=None):
        self.workers = workers
        self.log_dir = log_dir
        self.registry = _Registry(registry)
        self._client_options = {
            "log_dir": log_dir, "connect_timeout": connect_timeout,
            "command_timeout": command_timeout, "max_output": max_output,
            "ssh_key": ssh_key, "ssh_config": fabric.Config(),
        }
        self._pool = concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix="sugar-ssh")
        try:
            self._http = _HTTPServer(host, port, self)
        except BaseException:
            self._pool.shutdown()
            self.registry.close()
            raise

    @property
    def address(self):
        """``(host, port)`` the server listens on."""
        return self._http.server_address[:2]

    def run(self, command, timeout=None):
        """Run *command* on every registered client; return the Results.

        Clients are taken in a sliding window of at most ``workers`` at
        once; the list is in registry order (by address) and has one Result
        per client, whatever happened to the others.  *timeout* bounds the
        command on each client (default: the server's command timeout).
        """
        return [future.result()
                for future in self.start_run(command, timeout)]

    def start_run(self, command, timeout=None):
        """Start `run` and return its futures, in registry order.

        Each future has a ``client`` attribute and gives that client's
        Result.
        """
        clients = [Client.from_entry(entry, **self._client_options)
                   for entry in self.registry.clients()]
        logger.info("running %r on %d clients", command, len(clients))
        futures = []
        for client in clients:
            future = self._pool.submit(client.run_command, command, timeout)
            future.client = client
            futures.append(future)
        return futures

    def serve(self):
        """Answer requests until `shutdown`; then release everything."""
        try:
            self._http.serve_forever()
        finally:
            self._close()

    def shutdown(self):
        """Make `serve` return; call it from another thread."""
        self._http.shutdown()

    def _close(self):
        self._http.server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.registry.close()


# ---------------------------------------------------------------------------
# Settings from the environment (used by the launcher)
# ---------------------------------------------------------------------------

class SettingError(Exception):
    """A setting Sugar cannot start with; the message is one line."""


def _number(environ, name, default, kind, low, high, unit=""):
    raw = environ.get(name, "")
    if raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high or value != value:
        kind_name = "a whole number" if kind is int else "a number"
        raise SettingError("%s=%r is not allowed; use %s from %s to %s%s"
                           % (name, raw, kind_name, low, high, unit))
    return value


def settings_from_environ(environ):
    """Read Sugar's settings from *environ*; raise SettingError if bad.

    Returns the keyword arguments of `Server` plus ``level``, the logging
    level name.
    """
    level = environ.get("LOGGING", "") or "INFO"
    if level.upper() not in LEVELS:
        raise SettingError("LOGGING=%r is not allowed; use one of %s"
                           % (level, ", ".join(LEVELS)))
    settings = {
        "level": level.upper(),
        "port": _number(environ, "PORT", DEFAULT_PORT, int, 1, 65535),
        "workers": _number(environ, "WORKERS", DEFAULT_WORKERS, int, 1,
                           MAX_WORKERS),
        "connect_timeout": _number(environ, "CONNECT_TIMEOUT",
                                   DEFAULT_CONNECT_TIMEOUT, float, 0.1,
                                   3600, " seconds"),
        "command_timeout": _number(environ, "COMMAND_TIMEOUT",
                                   DEFAULT_COMMAND_TIMEOUT, float, 0.1,
                                   MAX_COMMAND_TIMEOUT, " seconds"),
        "max_output": _number(environ, "MAX_OUTPUT", DEFAULT_MAX_OUTPUT,
                              int, 1024, 1024 ** 3, " bytes"),
        "host": environ.get("HOST", ""),
        "registry": environ.get("REGISTRY", "") or DEFAULT_REGISTRY,
        "log_dir": environ.get("LOG_DIR", "") or ".",
        "ssh_key": environ.get("SSH_KEY", "") or None,
    }
    if settings["host"]:
        try:
            _check_host(settings["host"], "HOST")
        except _BadField:
            raise SettingError("HOST=%r is not allowed; use an IP address "
                               "or host name of this machine, or leave it "
                               "unset for all" % settings["host"]) from None
    _check_log_dir(settings["log_dir"])
    _check_registry(settings["registry"])
    if settings["ssh_key"] and not os.access(settings["ssh_key"], os.R_OK):
        raise SettingError("SSH_KEY=%r cannot be read; name a private key "
                           "file this user can read" % settings["ssh_key"])
    return settings


def _check_log_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise SettingError("LOG_DIR=%r cannot be created: %s"
                           % (path, exc.strerror)) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise SettingError("LOG_DIR=%r is not writable; choose a folder "
                           "this user can write" % path)


def _check_registry(path):
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise SettingError("REGISTRY=%r: folder %r does not exist or is "
                           "not writable" % (path, folder))


def bind_error_message(exc, host, port):
    """One line for a failure to listen on *host*:*port*."""
    where = "%s:%d" % (host or "*", port)
    if exc.errno == errno.EADDRINUSE:
        return ("PORT=%d: port %d is already in use; stop what listens "
                "there or set PORT to a free port" % (port, port))
    if exc.errno == errno.EACCES:
        return ("PORT=%d: permission denied; ports below 1024 need root, "
                "so set PORT to 1024 or above" % port)
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        return ("HOST=%r: not an address of this machine; set HOST to one "
                "of its addresses or leave it unset" % host)
    return "cannot listen on %s: %s" % (where, exc.strerror or exc)
