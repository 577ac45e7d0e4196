"""Sugar: run shell commands on a fleet of machines over SSH.

Each machine registers itself with one HTTP request; Sugar keeps the
registry and, when asked, runs a command on every registered machine over
SSH, in parallel, and appends each machine's output to a log file of its
own.  Nothing runs on the machines but their own sshd.

Set up a machine (a "client") once::

    ssh-copy-id root@client
    curl -d "address=client.fqdn&id=$(</etc/machine-id)" server:9999/register

then run a command on all of them::

    curl -u ":$TOKEN" -d "command=whoami" server:9999/run

The server is `Server`; `Client` is one registered machine and can be used
on its own.  The launcher, ``sugar_server``, reads its settings from the
environment (see `settings_from_environ`).

Limits, in plain words (the README says more):

- The registry and the job store are shelves over SQLite: entries are
  copies, so an entry changed in memory must be stored again to be kept,
  and one lock per store serialises every access.
- SSH connections are kept open between runs (see `_Pool`); paramiko
  does the SSH in Python, which bounds how fast a warm run can be.
- Time limits are kept by the server, which ends the command's process
  group over a second channel; a process that leaves its group is not
  stopped, and after a crash of the server commands run on until they end.
- The host key first seen is trusted when none is pinned or known.
"""

__all__ = [
    "Client",
    "Result",
    "Server",
    "SettingError",
    "bind_error_message",
    "settings_from_environ",
]

import base64
import binascii
import codecs
import collections.abc
import concurrent.futures
import contextlib
import copy
import datetime
import dbm
import errno
import fnmatch
import functools
import hashlib
import hmac
import email.errors
import email.parser
import email.policy
import http.client
import http.server
import ipaddress
import json
import logging
import logging.handlers
import os
import re
import resource
import secrets
import shelve
import shlex
import shutil
import socket
import sqlite3
import ssl
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

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
DEFAULT_JOBS = "sugar-jobs"
DEFAULT_KEEP_JOBS = 1000
DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_GRACE = 30.0
DEFAULT_LOG_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_LOG_BACKUPS = 5
DEFAULT_MAX_SCRIPT = 1024 * 1024
DEFAULT_IDLE_CLOSE = 300.0
KEEPALIVE = 15
READER_WAKEUP = 1.0
KILL_AFTER = 2.0
# Ids are at most 128 characters and addresses about 260; globs beyond
# these many would make a target costly to match.
MAX_PATTERN = 300
MAX_GLOBS = 1000
# Runs over connections already open cost little CPU: this many may go at
# once, or WORKERS if that is more.
WARM_WIDTH = 32
DOWNLOAD_TIMEOUT = 30
# A session holds its socket, paramiko's two-descriptor wake-up pipe, the
# log and up to two spool files; the server's own files, HTTP connections
# and interpreter take the rest.
FILES_PER_SESSION = 6
FILES_BESIDES_SESSIONS = 48
TOKEN_FILE = "sugar-token"
DEFAULT_USERNAME = "root"
MAX_WORKERS = 1024
MAX_BODY = 64 * 1024
READ_SIZE = 32768
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# ---------------------------------------------------------------------------
# Validation of what clients send
# ---------------------------------------------------------------------------

class _BadField(ValueError):
    """A form field holds a value Sugar cannot accept."""

    def __init__(self, field, problem):
        super().__init__("field %r: %s" % (field, problem))
        self.field, self.problem = field, problem


_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
_USERNAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\Z")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_PORT = re.compile(r"[0-9]{1,5}\Z")
_GLOB = re.compile(r"[*?[]")


def _check_id(value):
    """Return *value*, lower-cased, if it looks like a machine-id, else
    raise _BadField.
    """
    if not _ID.match(value) or ".." in value:
        raise _BadField("id", (
            "%r is not a machine id; send up to 128 letters, digits, '.', "
            "'_' or '-', starting with a letter or digit, without '..', "
            "such as the content of /etc/machine-id" % value))
    return value.lower()


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
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        ip = getattr(ip, "ipv4_mapped", None) or ip
        if ip.is_unspecified or ip.is_multicast or str(ip) == \
                "255.255.255.255":
            raise _BadField(field, "%s is not the address of one machine; "
                            "send the client's own address" % host)
        return str(ip)
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if (not host or len(host) > 253
            or not all(_LABEL.match(label) for label in labels)
            or labels[-1].isdigit()):
        raise _BadField(field, (
            "%r is not a host name or IP address; send a name such as "
            "web1.example.com (letters, digits and '-' between dots), an "
            "IPv4 address or an IPv6 address"
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
    if "://" in value:
        raise _BadField(field, "%r is not a host name or IP address; send "
                        "the host alone (web1.example.com, 10.0.0.5, "
                        "web1:2222), not a URL" % value[:100])
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
# Storage: shelves over SQLite
# ---------------------------------------------------------------------------

_SQLITE_MAGIC = b"SQLite format 3\x00"


class _SQLiteStore(collections.abc.MutableMapping):
    """A dbm-style mapping of bytes to bytes in one SQLite file.

    Each change is committed before the call returns, and SQLite's
    write-ahead log keeps the file whole if the process dies at any point.
    The table is the one Python 3.13's `dbm.sqlite3` uses, so either reads
    the other's files.  One connection is shared: callers serialise access.
    """

    def __init__(self, path):
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        self._db = sqlite3.connect(path, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS Dict (key BLOB UNIQUE "
                         "NOT NULL, value BLOB NOT NULL)")

    def __getitem__(self, key):
        row = self._db.execute("SELECT value FROM Dict WHERE key = "
                               "CAST(? AS BLOB)", (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        return row[0]

    def __setitem__(self, key, value):
        self._db.execute("REPLACE INTO Dict (key, value) VALUES "
                         "(CAST(? AS BLOB), CAST(? AS BLOB))", (key, value))

    @contextlib.contextmanager
    def transaction(self):
        """Changes made inside are committed together, or none of them."""
        with self._db:
            self._db.execute("BEGIN")
            yield

    def __delitem__(self, key):
        if not self._db.execute("DELETE FROM Dict WHERE key = CAST(? AS "
                                "BLOB)", (key,)).rowcount:
            raise KeyError(key)

    def __iter__(self):
        return iter([row[0] for row in self._db.execute(
            "SELECT key FROM Dict")])

    def __len__(self):
        return self._db.execute("SELECT COUNT(key) FROM Dict").fetchone()[0]

    def update_all(self, items):
        """Store every ``(key, value)`` of *items* in one transaction."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("REPLACE INTO Dict (key, value) VALUES "
                                 "(CAST(? AS BLOB), CAST(? AS BLOB))", items)

    def close(self):
        self._db.close()


def _is_sqlite(path):
    try:
        with open(path, "rb") as file:
            head = file.read(len(_SQLITE_MAGIC))
    except FileNotFoundError:
        return True
    return head in (b"", _SQLITE_MAGIC)


def _open_shelf(path, name):
    """A shelf over SQLite at *path*, which only its owner can read.

    A store an earlier Sugar left there (a plain `shelve.open` file, of
    any `dbm` kind) is carried over, its files kept with ``.old`` added.
    Raises SettingError, naming the setting *name*, if *path* holds
    anything else; that is left as it is.
    """
    try:
        if not _is_sqlite(path) or (not os.path.exists(path)
                                    and dbm.whichdb(path)):
            _carry_over(path, name)
        return shelve.Shelf(_SQLiteStore(path))
    except dbm.error + (sqlite3.Error, OSError) as exc:
        raise SettingError("%s=%r cannot be opened (%s); it was left as it "
                           "is: move it away, or set %s to another file"
                           % (name, path, exc, name)) from None


def _carry_over(path, name):
    """Copy the old `dbm` store at *path* into a new SQLite one there."""
    if not dbm.whichdb(path):
        raise dbm.error[0]("not a store Sugar knows")
    with dbm.open(path, "r") as old:
        items = [(key, old[key]) for key in old.keys()]
    fresh = path + ".new"
    for leftover in (fresh, fresh + "-wal", fresh + "-shm"):
        if os.path.exists(leftover):
            os.remove(leftover)
    store = _SQLiteStore(fresh)
    store.update_all(items)
    store.close()
    for suffix in ("", ".dat", ".dir", ".bak", ".db", ".pag"):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, path + suffix + ".old")
    os.replace(fresh, path)
    logger.warning("%s: carried over %d entries from the old store %s; its "
                   "files are kept with .old added", name, len(items), path)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def _timestamp(moment=None):
    """ISO 8601 in UTC, to the millisecond, e.g. 2026-12-03T17:40:00.123Z."""
    moment = moment or _now()
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _address_order(entry):
    """Sort key of a registry *entry* by its address."""
    try:
        ip = ipaddress.ip_address(entry["host"])
    except ValueError:
        host = (1, 0, 0, entry["host"])
    else:
        host = (0, ip.version, int(ip), "")
    return host + (entry["port"], entry["id"])


class _Registry:
    """The registered clients, in a shelf keyed by client id.

    Each entry is a dict with ``id``, ``host``, ``port``, ``username``,
    ``registered``, ``last_seen``, ``hostkey`` (the pinned SSH host key,
    ``type base64``, or None) and ``last_run`` (None, or the ``job``,
    ``status``, ``outcome`` and ``time`` of the client's latest run).  A
    shelf allows one writer at a time, so every access holds the
    registry's lock; each change is synced to disk before the call returns.
    """

    def __init__(self, path):
        self.path = path
        self._lock = threading.Lock()
        self._shelf = _open_shelf(path, "REGISTRY")

    def register(self, client_id, host, port, username, hostkey=None):
        """Add or update a client; return ``(entry, previous or None)``.

        The pinned host key stays unless *hostkey* gives another one.
        """
        with self._lock:
            previous = self._shelf.get(client_id) or {}
            stamp = _timestamp()
            entry = {
                "id": client_id,
                "host": host,
                "port": port,
                "username": username,
                "registered": previous.get("registered", stamp),
                "last_seen": stamp,
                "hostkey": hostkey or previous.get("hostkey"),
                "last_run": previous.get("last_run"),
            }
            self._shelf[client_id] = entry
            self._shelf.sync()
        return entry, previous or None

    def pin(self, client_id, hostkey):
        """Pin *hostkey* for *client_id* if it has none yet."""
        with self._lock:
            entry = self._shelf.get(client_id)
            if entry is not None and not entry.get("hostkey"):
                entry["hostkey"] = hostkey
                self._shelf[client_id] = entry
                self._shelf.sync()

    def get(self, client_id):
        """The entry of *client_id*, or None."""
        with self._lock:
            return self._shelf.get(client_id)

    def remove(self, client_id):
        """Remove *client_id*; return its entry, or None if unknown."""
        with self._lock:
            entry = self._shelf.pop(client_id, None)
            self._shelf.sync()
        return entry

    def note_runs(self, job_id, results):
        """Record each result as its client's last run."""
        with self._lock, self._shelf.dict.transaction():
            for result in results:
                entry = self._shelf.get(result.id)
                if entry is not None and result.status != "stale":
                    entry["last_run"] = {
                        "job": job_id, "status": result.status,
                        "outcome": result.outcome, "time": result.started,
                    }
                    self._shelf[result.id] = entry
            self._shelf.sync()

    def clients(self):
        """Every entry, ordered by address: IP addresses by number (so
        10.0.0.9 before 10.0.0.10), then host names.
        """
        with self._lock:
            entries = list(self._shelf.values())
        return sorted(entries, key=_address_order)

    def close(self):
        with self._lock:
            self._shelf.close()


def _address_of(entry):
    return _format_address(entry["host"], entry["port"])


def _age(stamp):
    """Seconds since the `_timestamp` *stamp*."""
    moment = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return (_now() - moment).total_seconds()


def _parse_target(target):
    """Split a target into ``(include patterns, exclude patterns)``,
    lower-cased.
    """
    include, exclude = [], []
    patterns = [pattern.strip().lower() for pattern in target.split(",")]
    for pattern in patterns:
        if pattern.startswith("!"):
            exclude.append(pattern[1:])
        else:
            include.append(pattern)
        if not pattern.lstrip("!"):
            raise _BadField("target", (
                "%r has an empty pattern; send comma-separated globs such "
                "as web*,10.0.0.*,!web3" % target[:200]))
        if len(pattern) > MAX_PATTERN:
            raise _BadField("target", (
                "pattern %r... is longer than %d characters, more than any "
                "id or address; send shorter ones" % (pattern[:40],
                                                      MAX_PATTERN)))
    if sum(bool(_GLOB.search(pattern)) for pattern in patterns) > MAX_GLOBS:
        raise _BadField("target", (
            "more than %d patterns with *, ? or [; name the clients, or "
            "send fewer and wider globs" % MAX_GLOBS))
    return include, exclude


def _matcher(patterns):
    """A test of whether an entry's id, host or address matches one of
    *patterns*: names looked up in a set, globs in one regular expression.
    """
    names = {pattern for pattern in patterns if not _GLOB.search(pattern)}
    globs = [pattern for pattern in patterns if _GLOB.search(pattern)]
    regex = globs and re.compile("|".join(map(fnmatch.translate, globs)))

    def matches(entry):
        return any(name in names or (regex and regex.match(name))
                   for name in _names(entry))
    return matches


def _names(entry):
    """The names a target matches an entry by: id, host and address."""
    return entry["id"], entry["host"].lower(), _address_of(entry).lower()


def _select(entries, target):
    """The entries *target* picks, and those it names exactly.

    No target picks every entry.  Raises _BadField for an empty pattern.
    """
    if target is None:
        return entries, []
    include, exclude = _parse_target(target)
    included, excluded = _matcher(include), _matcher(exclude)
    chosen = [e for e in entries
              if (not include or included(e)) and not excluded(e)]
    wanted = set(include)
    named = [e["id"] for e in chosen if wanted.intersection(_names(e))]
    return chosen, named


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
    folder = _real_folder(os.path.abspath(log_dir))
    path = os.path.join(folder, _log_name(address))
    if os.path.dirname(path) != folder:
        raise ValueError("log file %r would leave %r" % (path, folder))
    return path


@functools.lru_cache(maxsize=64)
def _real_folder(log_dir):
    """The absolute *log_dir* without symbolic links (looked up once:
    runs on hundreds of clients would walk it hundreds of times).
    """
    return os.path.realpath(log_dir)


def _open_log(path, rotation):
    """Open the log at *path* to append; a new one is the owner's only.

    When it has reached *rotation*'s most bytes, it is first rotated as
    `logging.handlers.RotatingFileHandler` does (``.1`` to ``.N``, N the
    backups), by that handler.
    """
    most, backups = rotation
    try:
        full = os.path.getsize(path) >= most
    except FileNotFoundError:
        full = False
    if full:
        handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=most, backupCount=backups, delay=True)
        try:
            handler.doRollover()
        finally:
            handler.close()
    return open(path, "a", encoding="utf-8",
                opener=lambda name, flags: os.open(name, flags, 0o600))


def _log_lock(path):
    with _log_locks_guard:
        return _log_locks.setdefault(path, threading.Lock())


class _Sink:
    """A text file being written that remembers its last character.

    With *make* instead of *file*, the file is made by calling it at the
    first write (most commands write nothing on stderr).
    """

    def __init__(self, file=None, make=None):
        self.file = file
        self._make = make
        self.ends_line = True

    def write(self, text):
        if text:
            if self.file is None:
                self.file = self._make()
            self.file.write(text)
            self.file.flush()
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
    A log of *rotation* ``(most bytes, backups)`` or more is rotated before
    an entry starts, so an entry is never split between files.
    """

    def __init__(self, path, started, command, spool, rotation):
        self.path = path
        self._rotation = rotation
        self._lock = _log_lock(path)
        self._direct = self._lock.acquire(blocking=False)
        try:
            if self._direct:
                out = _open_log(path, rotation)
            else:
                out = self._spool(path, spool)
            self.stdout = _Sink(out)
            self.stderr = _Sink(make=lambda: self._spool(path, spool))
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
                spooled, self.stdout.file = self.stdout.file, _open_log(
                    self.path, self._rotation)
                self._copy(spooled, self.stdout.file)
            self.stdout.file.write("--- stderr ---\n")
            if self.stderr.file is not None:
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

STATUSES = ("ok", "failed", "timeout", "unreachable", "auth", "hostkey",
            "error", "stale", "interrupted")


# The digest of a result with no output at all (see `Result`).
_EMPTY_DIGEST = hashlib.sha256(hashlib.sha256(b"").digest() * 2).hexdigest()


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
        self.digest = _EMPTY_DIGEST
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

    @classmethod
    def from_dict(cls, document):
        """A Result from its `as_dict` form, as a job record keeps it."""
        result = cls.__new__(cls)
        result.__dict__.update(document)
        return result

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
        return "hostkey", (
            "host key of %s changed: expected %s %s, offered %s %s, so the "
            "command did not run; if the machine was re-installed, register "
            "it again with its new hostkey and the API token" % (
                where, exc.expected_key.get_name(),
                exc.expected_key.fingerprint, exc.key.get_name(),
                exc.key.fingerprint))
    if isinstance(exc, paramiko.SSHException) and \
            str(exc) == "No authentication methods available":
        return "auth", (
            "the server has no SSH key to log in to %s@%s with; set SSH_KEY, "
            "or create one with ssh-keygen -t ed25519, and give it to the "
            "client (ssh-copy-id)" % (client.username, where))
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        exc = next(iter(exc.errors.values()))
    if isinstance(exc, socket.gaierror):
        return "unreachable", (
            "cannot resolve host name %r; check the address registered for "
            "it" % client.host)
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "unreachable", (
            "timed out connecting to %s after %gs; check that sshd answers "
            "there" % (where, timeout))
    if isinstance(exc, (paramiko.SSHException, EOFError)) and not spoke:
        return "unreachable", (
            "no SSH server answered at %s within %gs; check that sshd "
            "listens there" % (where, timeout))
    if isinstance(exc, (paramiko.SSHException, EOFError)) and \
            str(exc) in ("", "No existing session"):
        # paramiko's words when the key exchange ran out of time.
        return "unreachable", (
            "sshd at %s answered, but the SSH handshake did not finish "
            "within %gs; check that it is not overloaded, or raise "
            "CONNECT_TIMEOUT" % (where, timeout))
    if isinstance(exc, (paramiko.SSHException, EOFError)):
        return "unreachable", (
            "the SSH handshake with %s did not finish within %gs (%s)"
            % (where, timeout, exc or type(exc).__name__))
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


def _drain(channel, out, err, deadline, done=None):
    """Feed *channel*'s stdout and stderr to the streams until both end
    (or, with *done*, until ``done()`` is true or the channel ends).

    Returns False if *deadline* (a `time.monotonic` value) came first,
    even while output keeps coming.  Both of the channel's buffers set one
    event when data, the end or the close arrives (a cheaper wake-up than
    the pipe `Channel.fileno` makes); reading a buffer empty clears it, so
    both are looked at before waiting.
    """
    ready = threading.Event()
    channel.in_buffer.set_event(ready)
    channel.in_stderr_buffer.set_event(ready)
    while True:
        if channel.recv_ready():
            out.feed(channel.recv(READ_SIZE))
        elif channel.recv_stderr_ready():
            err.feed(channel.recv_stderr(READ_SIZE))
        elif channel.eof_received or channel.closed or (done and done()):
            return True
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready.wait(min(left, 1.0))
            continue
        if time.monotonic() >= deadline and not (done and done()):
            return False


def _exec(channel, command):
    """Ask sshd to run *command* on *channel*, without waiting for its
    answer as `Channel.exec_command` does: the output, the exit status and
    the end follow at once, so waiting would only cost a round trip and a
    thread switch per command.  A refusal closes the channel (paramiko
    does so on the failure message), which the reading then sees.
    """
    request = paramiko.Message()
    request.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
    request.add_int(channel.remote_chanid)
    request.add_string("exec")
    request.add_boolean(True)
    request.add_string(command)
    channel.transport._send_user_message(request)


def _announced(command):
    """The remote command line: *command* as the user's login shell runs
    it over plain ssh, after writing the shell's process id and a newline
    to stderr (see `_Pid`).  sshd makes that shell lead a session, so the
    id names the process group a stop or a time limit ends.  The prefix
    shares the command's first line, so the shell's messages give the
    same line numbers as without it.
    """
    return "echo $$ >&2; " + command


class _Pid:
    """Takes the process id line `_announced` writes first on stderr and
    passes the rest of stderr on to *stream*.  A first line that is not a
    number (the command could not even be parsed) is passed on whole.
    """

    def __init__(self, stream):
        self._stream = stream
        self._head = b""
        self.pid = None

    @classmethod
    def known(cls, pid):
        """A `_Pid` already holding *pid*."""
        known = cls(None)
        known.pid = pid
        return known

    def feed(self, data):
        if self.pid is not None:
            self._stream.feed(data)
            return
        self._head += data
        line, newline, rest = self._head.partition(b"\n")
        if newline:
            if re.fullmatch(rb"[0-9]{1,9}", line):
                self.pid = int(line)
            else:
                self.pid, rest = 0, self._head
            self._head = b""
            if rest:
                self._stream.feed(rest)


class _Execution:
    """A command running on a client, which `stop` can end early.

    *pid* leads the command's process group, or, with *relay*, is a kept
    shell's, which passes TERM and KILL on to the command's process group
    when sent USR1 and USR2.
    """

    def __init__(self, cxn, channel, pid, wait, relay=False):
        self.cxn = cxn
        self.channel = channel
        self._pid = pid
        self._wait = wait
        self._relay = relay
        self.stopped = False

    def end(self, grace=KILL_AFTER):
        """End the command's process group: TERM, then KILL if it is still
        there after *grace* seconds.  True once the command ended.
        """
        for name in ("TERM", "KILL"):
            if not self._signal(name):
                return False
            if self._wait(time.monotonic() + grace):
                return True
        return False

    def stop(self):
        """End the command (from any thread), then its connection."""
        self.stopped = True
        self._signal("TERM")
        _close(self.channel)
        _close(self.cxn)

    def _signal(self, name):
        """Send signal *name* to the command's process group over a channel
        of its own; False when that cannot be done within a few seconds.
        """
        pid = self._pid.pid
        if not pid:
            return False
        sent = []
        thread = threading.Thread(target=self._kill, args=(
            name, pid, sent), daemon=True)
        thread.start()
        thread.join(KILL_AFTER + 3)
        return bool(sent)

    def _kill(self, name, pid, sent):
        try:
            session = self.cxn.transport.open_session(timeout=KILL_AFTER)
            if self._relay:
                session.exec_command("kill -%s %d" % (
                    {"TERM": "USR1", "KILL": "USR2"}[name], pid))
            else:
                session.exec_command("kill -%s -- -%d 2>/dev/null || "
                                     "kill -%s %d" % (name, pid, name, pid))
            session.recv_exit_status()
            session.close()
            sent.append(name)
        except (OSError, paramiko.SSHException, EOFError):
            pass


# The program a kept connection's shell runs (see `_Shell`), in the
# language every POSIX login shell speaks.  For each command it reads a
# token line, answers it on both streams (with its process id on stdout),
# reads the command's lines up to the token line again, runs the command
# as sshd would, with the user's login shell (the same program, called by
# the same name), with no input, in a process group of its own, then
# writes the token and the exit status.  Under bash, job control gives
# the command its group and `exec -a` the name, with no process spent on
# looking the shell up; other shells need setsid (util-linux or BusyBox),
# which gives it a session too, and give up at once without it, and call
# the shell by its name when PATH finds it.  USR1 and USR2 pass TERM and
# KILL on to the command's group.  The loop's own messages (job notices)
# go nowhere; the commands' stderr is its fd 3.  Input that ends before
# the token line runs nothing.
_SHELL_LOOP = r"""n=${SHELL:-/bin/sh}
if [ -n "$BASH_VERSION" ]; then
set -m
run() { exec -a "${n##*/}" "$n" -c "$c"; }
else
command -v setsid >/dev/null || exit 1
case $n in
*/*) [ "$(command -v "${n##*/}")" -ef "$n" ] 2>/dev/null && n=${n##*/};;
esac
run() { exec setsid "$n" -c "$c"; }
fi
exec 3>&2 2>/dev/null
p=
trap '[ -z "$p" ] || kill -TERM "-$p"' USR1
trap '[ -z "$p" ] || kill -KILL "-$p"' USR2
while IFS= read -r t; do
printf '%s %s\n' "$t" "$$"; printf '%s\n' "$t" >&3
c= f=1 e=1
while IFS= read -r l; do
if [ "$l" = "$t" ]; then e=; break; fi
if [ -n "$f" ]; then c=$l f=; else c="$c
$l"; fi
done
[ -z "$e" ] || exit 0
run </dev/null 2>&3 3>&- &
p=$!
wait "$p"; s=$?
while kill -0 "$p" 2>/dev/null; do wait "$p"; s=$?; done
p=
printf '%s\n' "$t" >&3; printf '%s %s\n' "$t" "$s"
done"""


def _close(closable):
    """Close a channel or a connection, even when the connection is going
    away.
    """
    try:
        closable.close()
    except (OSError, paramiko.SSHException, EOFError):
        pass


class _Marked:
    """One output stream of a kept shell, cut to one command's part.

    Bytes before the first line starting with *token*, and after it until
    `start` (when the command is sent), are left over from an earlier
    command and dropped (`stray` tells there were some); that line's rest
    is `head`.  Then the bytes up to the next *token* go to *stream*; the
    rest of that line is `tail`, and the command's part has `ended`.  A
    token split across reads is held back until it is whole.
    """

    def __init__(self, stream, token):
        self._stream = stream
        self._token = token
        self._held = b""
        self.head = self.tail = None
        self.ended = self.stray = self._started = False

    def feed(self, data):
        held = self._held + data
        if self.head is None:
            at = held.find(self._token)
            if at < 0:
                self.stray = self.stray or len(held) > len(self._token)
                self._held = held[-len(self._token):]
                return
            self.stray = self.stray or at > 0
            line, newline, rest = held[at + len(self._token):].partition(
                b"\n")
            if not newline:
                self._held = held[at:]
                return
            self.head, held = line.strip(), rest
        if not self._started:
            self.stray = self.stray or bool(held)
            self._held = b""
            return
        if self.ended:
            self._held = b""
            return
        at = held.find(self._token)
        if at < 0:
            cut = len(held) - self._partial(held)
            self._pass(held[:cut])
            self._held = held[cut:]
            return
        line, newline, _ = held[at + len(self._token):].partition(b"\n")
        self._pass(held[:at])
        if not newline:
            self._held = held[at:]
            return
        self.tail, self.ended, self._held = line.strip(), True, b""

    def start(self):
        """The command is sent: what comes now is its output."""
        self._started = True

    def _partial(self, data):
        """How many of *data*'s last bytes may begin the token."""
        at = data.find(self._token[:1], max(0, len(data) - len(self._token)))
        while at >= 0:
            if self._token.startswith(data[at:]):
                return len(data) - at
            at = data.find(self._token[:1], at + 1)
        return 0

    def _pass(self, data):
        if data:
            self._stream.feed(data)

    def flush(self):
        """The stream ended early: pass on what was held back."""
        if self.head is not None and not self.ended:
            self._pass(self._held)
        self._held = b""


class _Shell:
    """A shell kept running on a kept connection, which runs the commands
    sent to it one at a time: a command then costs sshd no new session
    (no new process, environment or login shell for the session, which is
    most of a command's cost on the client), only the login shell that
    runs it.  The run using it holds its `_Kept`'s ``shell_lock``; it is
    `new` until its first answer.
    """

    def __init__(self, channel):
        self.channel = channel
        self.new = True

    @property
    def alive(self):
        # A process the shell left behind can hold the channel open after
        # the shell itself ended: sshd's exit status tells.
        return not (self.channel.closed or self.channel.eof_received or
                    self.channel.exit_status_ready())


@functools.lru_cache(maxsize=1024)
def _parse_hostkey(line, field="hostkey"):
    """The ``type base64`` of an SSH public key *line*, else _BadField."""
    lines = len(line.strip().splitlines())
    if lines > 1:
        raise _BadField(field, (
            "holds %d lines; send one key line, such as the content of "
            "/etc/ssh/ssh_host_ed25519_key.pub" % lines))
    parts = line.split()
    try:
        key = paramiko.PKey.from_type_string(
            parts[0], base64.b64decode(parts[1], validate=True))
    except paramiko.pkey.UnknownKeyType:
        raise _BadField(field, (
            "key type %r is not one Sugar can check; send the content of "
            "/etc/ssh/ssh_host_ed25519_key.pub (or an ecdsa or rsa host "
            "key)" % parts[0][:60])) from None
    except (IndexError, ValueError, TypeError, paramiko.SSHException,
            binascii.Error):
        raise _BadField(field, (
            "%r is not an SSH public key line; send the content of "
            "/etc/ssh/ssh_host_ed25519_key.pub" % line[:100])) from None
    return "%s %s" % (key.get_name(), key.get_base64())


def _hostkey_fingerprint(hostkey):
    """``type SHA256:...`` of a pinned *hostkey*, or None."""
    if not hostkey:
        return None
    key = _hostkey_object(hostkey)
    return "%s %s" % (key.get_name(), key.fingerprint)


def _hostkey_object(hostkey):
    kind, data = hostkey.split()
    return paramiko.PKey.from_type_string(kind, base64.b64decode(data))


class _TrustOnFirstUse(paramiko.MissingHostKeyPolicy):
    """Accept a host key never seen before and hand it to *learn*."""

    def __init__(self, learn):
        self._learn = learn

    def missing_host_key(self, client, hostname, key):
        client.get_host_keys().add(hostname, key.get_name(), key)
        self._learn("%s %s" % (key.get_name(), key.get_base64()))


class _Script:
    """A script to copy to each client and run there, with its arguments.

    *content* is its bytes; *source* names it (its URL, or the uploaded
    file's name); *args* is a shell-quoted string of its arguments.
    Raises _BadField for arguments that are not shell-quoted.
    """

    def __init__(self, content, source, args=""):
        self.content = content
        self.source = source
        self.args = args
        self.sha256 = hashlib.sha256(content).hexdigest()
        self.argv = _parse_args(args)

    @classmethod
    def from_record(cls, record):
        return cls(record["content"], record["source"], record["args"])

    def as_record(self, with_content=True):
        record = {"source": self.source, "sha256": self.sha256,
                  "args": self.args}
        if with_content:
            record["content"] = self.content
        return record

    def describe(self):
        """How logs and jobs name the run, as they show a command."""
        text = "script %s (sha256 %s)" % (self.source, self.sha256)
        return text + (" " + shlex.join(self.argv) if self.argv else "")

    def command_line(self, path):
        """The command that runs the copy at *path* with its arguments:
        through the interpreter of its ``#!`` line, else ``/bin/sh``, so
        a ``noexec`` /tmp does not matter.
        """
        first = self.content.split(b"\n", 1)[0]
        interpreter = ["/bin/sh"]
        if first.startswith(b"#!") and first[2:].strip():
            interpreter = first[2:].decode("utf-8", "replace").split(None, 1)
            interpreter[-1] = interpreter[-1].strip()
        return shlex.join(interpreter + [path] + self.argv)


def _parse_args(args):
    """The words of the shell-quoted *args*, else _BadField."""
    try:
        return shlex.split(args)
    except ValueError as exc:
        raise _BadField("args", "%r is not a shell-quoted list of "
                        "arguments (%s)" % (args[:100], exc)) from None


def _check_url(url):
    """Raise _BadField unless *url* is an http or https URL Sugar can
    fetch: with a host, a port that can be, and no user or password (the
    download would take them for part of the host name).
    """
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port
    except ValueError as exc:
        raise _BadField("url", "%r is not a URL (%s)" % (url[:200], exc)) \
            from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname \
            or any(c in url for c in " \0\r\n"):
        raise _BadField("url", "%r is not an http or https URL"
                        % url[:200])
    if parts.username is not None or parts.password is not None:
        raise _BadField("url", "a user or password in the URL is not "
                        "supported; serve the script without one, or upload "
                        "it (curl -F script=@file)")


def _download(url, limit, timeout):
    """The bytes at the http(s) *url*, at most *limit* of them.

    Raises ValueError, with the reason, when they cannot be had.
    """
    opener = urllib.request.OpenerDirector()
    # Only http and https, also for redirects: no file:, ftp: or data:.
    for handler in (urllib.request.ProxyHandler(),
                    urllib.request.HTTPHandler(),
                    urllib.request.HTTPSHandler(),
                    urllib.request.HTTPRedirectHandler(),
                    urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    deadline = time.monotonic() + timeout
    try:
        with opener.open(url, timeout=timeout) as response:
            content = _read_all(response, limit, deadline)
    except urllib.error.HTTPError as exc:
        raise ValueError("HTTP %d %s" % (exc.code, exc.reason)) from None
    except urllib.error.URLError as exc:
        raise ValueError(str(exc.reason)) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from None
    return content


def _read_all(response, limit, deadline):
    """The body of *response*: whole, within *limit* bytes and by
    *deadline* (a `time.monotonic` value), else ValueError.
    """
    parts, size = [], 0
    while True:
        part = response.read1(65536)
        if not part:
            break
        parts.append(part)
        size += len(part)
        if size > limit:
            raise ValueError("the script is over the limit of %d bytes "
                             "(MAX_SCRIPT)" % limit)
        if time.monotonic() > deadline:
            raise ValueError("the download took more than %d s"
                             % DOWNLOAD_TIMEOUT)
    if response.length:
        raise ValueError("the download ended %d bytes short of its "
                         "Content-Length" % response.length)
    return b"".join(parts)


class _StaleConnection(Exception):
    """A kept connection turned out dead before anything ran on it."""


class _Kept:
    """A connection in the pool, and how many runs are using it."""

    def __init__(self, client_id, cxn, key):
        self.client_id = client_id
        self.cxn = cxn
        self.key = key
        offered = cxn.transport.get_remote_server_key()
        self.hostkey = "%s %s" % (offered.get_name(), offered.get_base64())
        self.users = 1
        self.last_used = time.monotonic()
        self.retired = False
        # A `_Shell`; None until the first run starts one, False when the
        # login shell cannot run it (runs then take channels of their own).
        self.shell = None
        self.shell_lock = threading.Lock()


class _Pool:
    """SSH connections kept open between runs, one per client id.

    A run takes the client's connection when it is alive and goes to the
    same address, user and key (and the host key pinned since, if any);
    runs at the same time share it, each on a channel of its own.
    Keepalives find dead connections.  A connection idle for *idle_close*
    seconds is closed, and past *most* connections the least recently
    used idle one is.
    """

    def __init__(self, idle_close, most):
        self.idle_close = idle_close
        self.most = most
        self._kept = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._reaper = threading.Thread(target=self._reap, daemon=True,
                                        name="sugar-pool")
        self._reaper.start()

    def take(self, client):
        """The kept `_Kept` for *client*, now in use, or None."""
        with self._lock:
            kept = self._kept.get(client.id)
            if kept is None:
                return None
            if kept.key == client.pool_key and kept.cxn.is_connected and \
                    client.hostkey in (None, "", kept.hostkey):
                kept.users += 1
                kept.last_used = time.monotonic()
                return kept
            self._retire(kept)
        return None

    def keep(self, client, cxn):
        """Put the new connection *cxn* of *client* in the pool, in use."""
        kept = _Kept(client.id, cxn, client.pool_key)
        cxn.transport.set_keepalive(KEEPALIVE)
        # paramiko's reader thread wakes every 0.1 s to check its state:
        # with hundreds of kept connections, thousands of wake-ups a
        # second.  Once connected, waking each second is enough.
        cxn.transport.sock.settimeout(READER_WAKEUP)
        with self._lock:
            if client.id in self._kept:
                self._retire(self._kept[client.id])
            self._kept[client.id] = kept
            idle = sorted((k for k in self._kept.values() if not k.users),
                          key=lambda k: k.last_used)
            for extra in idle[:max(0, len(self._kept) - self.most)]:
                self._retire(extra)
        return kept

    def give_back(self, kept, broken=False):
        """A run is done with *kept*; *broken* drops the connection."""
        with self._lock:
            kept.users -= 1
            kept.last_used = time.monotonic()
            if broken:
                self._retire(kept)
            elif kept.retired and not kept.users:
                kept.cxn.close()

    def drop(self, client_id):
        """Close *client_id*'s connection (once no run uses it)."""
        with self._lock:
            kept = self._kept.get(client_id)
            if kept is not None:
                self._retire(kept)

    def _retire(self, kept):
        if self._kept.get(kept.client_id) is kept:
            del self._kept[kept.client_id]
        kept.retired = True
        if not kept.users:
            kept.cxn.close()

    def size(self):
        """How many connections are kept."""
        return len(self._kept)

    def _reap(self):
        while not self._closing.wait(min(self.idle_close / 2, 5)):
            now = time.monotonic()
            with self._lock:
                for kept in list(self._kept.values()):
                    if not kept.users and \
                            now - kept.last_used >= self.idle_close:
                        self._retire(kept)

    def close(self):
        self._closing.set()
        with self._lock:
            for kept in list(self._kept.values()):
                kept.users = 0
                self._retire(kept)


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class _QuickAckSocket(socket.socket):
    """A TCP socket that acknowledges what it receives at once.

    SSH takes turns, and sshd leaves Nagle's algorithm on for sessions
    without a terminal: when it answers with two packets in a row (after
    authentication: its host keys notice, then the channel's
    confirmation), the second waits for our acknowledgement of the first,
    which Linux delays by 40 ms.  That stall is most of a new
    connection's time, and it held a handshake place idle.  Linux leaves
    quick-acknowledgement mode on its own, so it is set after every read.
    """

    def recv(self, size, *flags):
        data = super().recv(size, *flags)
        if data:
            self.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        return data


def _handle_channel_request(channel, message):
    """paramiko's handling of a channel request, and of "exit-signal",
    which it leaves unmarked: sshd's word that the channel's process was
    killed by a signal.  The channel then counts as ended, without an exit
    code, even while a process it left behind holds its output open.
    """
    start = message.packet.tell()
    if message.get_text() == "exit-signal":
        channel.status_event.set()
    message.packet.seek(start)
    paramiko.Channel._handle_request(channel, message)


@functools.lru_cache(maxsize=8)
def _read_private_key(path, stamp):
    return paramiko.PKey.from_path(path)


class _KeyUnusable(Exception):
    """The SSH key the server was told to use cannot be read now."""


def _private_key(path):
    """The private key at *path* (and its certificate, if any), read once
    for as long as the file stays the same; _KeyUnusable, which says why,
    when it cannot be read (SSH_KEY is checked at start, but the file may
    have changed since).

    paramiko would read it again, trying each key type in turn, for every
    new connection (about 0.7 ms of CPU).
    """
    try:
        stamps = []
        for name in (path, path + "-cert.pub"):
            try:
                stat = os.stat(name)
            except FileNotFoundError:
                continue
            stamps.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
        return _read_private_key(path, tuple(stamps))
    except Exception as exc:
        # Whatever the reason: no file, a passphrase, an unknown type.
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror \
            else "not a private key Sugar can read"
        raise _KeyUnusable(
            "the server's SSH key %s cannot be used (%s); restore it, or "
            "restart the server with SSH_KEY naming an unencrypted private "
            "key" % (path, why)) from None


def _kex_rank(name):
    """Post-quantum key exchanges first, then ECDH over NIST P-256."""
    return not (name.startswith(("mlkem", "sntrup"))
                or name == "ecdh-sha2-nistp256")


class _Packetizer(paramiko.packet.Packetizer):
    """paramiko's packet layer, keeping the key exchange's time limit as a
    deadline that its reads check (they wake at least every tenth of a
    second) rather than as a timer thread started and stopped for every
    new connection (about 0.2 ms of CPU each).  As in paramiko, only the
    first exchange is timed.
    """

    _deadline = None
    _done = False

    def start_handshake(self, timeout):
        if self._deadline is None:
            self._deadline = time.monotonic() + float(timeout)

    def handshake_timed_out(self):
        return not self._done and self._deadline is not None and \
            time.monotonic() >= self._deadline

    def complete_handshake(self):
        if self._deadline is not None:
            self._done = True


class _Transport(paramiko.Transport):
    """paramiko's transport, with choices that cost less CPU:

    - Key exchange: a post-quantum one when sshd offers it, else ECDH over
      NIST P-256 before curve25519.  sshd computes P-256 with OpenSSL's
      tuned code and curve25519 with OpenSSH's portable one: a new
      connection costs sshd about 6 ms less CPU (a fifth of it).
    - Cipher: AES-GCM when sshd offers it, one call into OpenSSL per
      packet, where AES-CTR adds an HMAC computed through Python's `hmac`
      (a command over a kept connection costs about a quarter less client
      CPU).
    - The key exchange's time limit is kept without a thread (see
      `_Packetizer`).

    It also tells when a channel's process was killed (see
    `_handle_channel_request`).
    """

    def __init__(self, sock, **options):
        options.setdefault("packetizer_class", _Packetizer)
        super().__init__(sock, **options)

    _preferred_kex = tuple(sorted(paramiko.Transport._preferred_kex,
                                  key=_kex_rank))
    _preferred_ciphers = tuple(sorted(
        paramiko.Transport._preferred_ciphers,
        key=lambda name: not name.startswith("aes128-gcm")))
    _channel_handler_table = {
        **paramiko.Transport._channel_handler_table,
        paramiko.common.MSG_CHANNEL_REQUEST: _handle_channel_request}


class _Connection(fabric.Connection):
    """Fabric's connection, made with less CPU.  Invoke tells a real
    attribute from a config key, each time one is set, by listing every
    name the object has (`dir`), which a dozen times over cost about half
    a millisecond per new connection; here the class's names are listed
    once, and the rule is the same.
    """

    def __setattr__(self, key, value):
        if key in _CONNECTION_NAMES or key in self.__dict__:
            object.__setattr__(self, key, value)
        else:
            self[key] = value


_CONNECTION_NAMES = frozenset(dir(_Connection))


class Client:
    """One machine reached over SSH.

    *address* is ``host``, ``host:port`` or ``[IPv6]:port``.  Commands run
    as *username* with the user's default SSH keys and agent, or with only
    *ssh_key* when given, for at most *command_timeout* seconds.  Each run
    is appended to ``<address>.txt`` in *log_dir*; at most *max_output*
    bytes of each stream are kept in the Result.

    The client's host key must be *hostkey* (``type base64``) when given,
    or the key the server user's ``known_hosts`` has for it.  Otherwise the
    first key seen is trusted, kept in ``hostkey`` and passed to
    *on_new_hostkey*; later runs expect that same key.
    """

    def __init__(self, address, username=DEFAULT_USERNAME, *, id=None,
                 log_dir=".", connect_timeout=DEFAULT_CONNECT_TIMEOUT,
                 command_timeout=DEFAULT_COMMAND_TIMEOUT,
                 max_output=DEFAULT_MAX_OUTPUT, ssh_key=None,
                 hostkey=None, on_new_hostkey=None,
                 log_rotation=(DEFAULT_LOG_MAX_BYTES, DEFAULT_LOG_BACKUPS),
                 pool=None, handshakes=None):
        self.host, self.port = _parse_address(address)
        self.address = _format_address(self.host, self.port)
        self.username = _check_username(username)
        self.id = id or self.address
        self.log_dir = log_dir
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.max_output = max_output
        self.log_rotation = log_rotation
        self.ssh_key = ssh_key
        self.hostkey = hostkey and _parse_hostkey(hostkey)
        self._on_new_hostkey = on_new_hostkey
        self._execution = None
        self._stopping = False
        self._pool = pool
        self._handshakes = handshakes or contextlib.nullcontext()
        self.pool_key = (self.host, self.port, self.username, ssh_key)

    @classmethod
    def from_entry(cls, entry, **options):
        """The Client for a registry *entry*."""
        return cls(_format_address(entry["host"], entry["port"]),
                   entry["username"], id=entry["id"],
                   hostkey=entry.get("hostkey"), **options)

    def _learn_hostkey(self, hostkey):
        self.hostkey = hostkey
        logger.info("%s: trusting host key %s on first use", self.address,
                    _hostkey_object(hostkey).fingerprint)
        if self._on_new_hostkey:
            self._on_new_hostkey(self, hostkey)

    def _connection(self):
        # Fabric rounds connect_timeout down to whole seconds (and 0 means
        # none), so the timeouts go to paramiko as they are.
        options = {
            "timeout": self.connect_timeout,
            "banner_timeout": self.connect_timeout,
            "auth_timeout": self.connect_timeout,
            "transport_factory": _Transport,
        }
        if self.ssh_key:
            options.update(pkey=_private_key(self.ssh_key),
                           look_for_keys=False, allow_agent=False)
        # A Config of its own: Fabric writes into the one it is given.  An
        # empty SSH config and no Fabric config files (lazy): the registry,
        # not ~/.ssh/config nor ~/.fabric.yaml, says where and how to
        # connect, and not looking for those files spares each new
        # connection a tenth of a millisecond.
        cxn = _Connection(
            self.host, user=self.username, port=self.port,
            config=fabric.Config(ssh_config=paramiko.SSHConfig(), lazy=True),
            connect_kwargs=options)
        # Fabric's own policy accepts any host key; ours checks it.
        cxn.client.set_missing_host_key_policy(
            _TrustOnFirstUse(self._learn_hostkey))
        if not self.hostkey:
            try:
                cxn.client.load_system_host_keys()
            except (paramiko.SSHException, ValueError, binascii.Error) as exc:
                logger.warning("%s: ~/.ssh/known_hosts is skipped, as it "
                               "cannot be read: %s", self.address, exc)
        else:
            name = self.host if self.port == 22 else "[%s]:%d" % (
                self.host, self.port)
            key = _hostkey_object(self.hostkey)
            cxn.client.get_host_keys().add(name, key.get_name(), key)
        return cxn

    def run_script(self, content, args="", timeout=None, source="script"):
        """Copy the script *content* (bytes) here, run it with the
        shell-quoted *args*, remove it, and return a `Result` as
        `run_command` does.  *source* names it in the log.
        """
        script = _Script(content, source, args)
        return self.run_command(script.describe(), timeout, script)

    def run_command(self, command, timeout=None, script=None):
        """Run *command* here, log it, and return a `Result`.

        Never raises for a problem on the client's side: a client that
        cannot be reached, refuses the key or runs past *timeout* seconds
        (default: the client's ``command_timeout``) gives a Result whose
        ``status`` says so.  The command gets no input (end of file at
        once) and its output is not echoed anywhere.
        """
        result = Result(self, command)
        clock = time.monotonic()
        result.log = _log_path(self.log_dir, self.address)
        try:
            entry = _LogEntry(result.log, result.started, command,
                              self.max_output, self.log_rotation)
        except OSError as exc:
            result.error = ("cannot write its log %s (%s), so the command "
                            "did not run" % (result.log, exc.strerror))
            logger.error("%s: %s", self.address, result.error)
            return result
        try:
            self._run(command, timeout or self.command_timeout, result,
                      entry, script)
        finally:
            result.duration = time.monotonic() - clock
            entry.close(result.outcome)
        logger.info("%s: %r: %s (%.2fs)", self.address, command,
                    result.outcome, result.duration)
        return result

    def _run(self, command, timeout, result, entry, script):
        """Run over the kept connection, else over a new one (at most
        *handshakes* of those at once, each held until its run ends).
        """
        if self._stopping:
            result.status = "interrupted"
            result.error = "not started: the server is stopping"
            return
        kept = self._pool and self._pool.take(self)
        if kept is not None:
            try:
                self._work(kept, kept.cxn, command, timeout, result, entry,
                           script)
            except _StaleConnection:
                self._pool.give_back(kept, broken=True)
            else:
                self._pool.give_back(kept, broken=result.status == "error")
                return
        with self._handshakes:
            try:
                cxn = self._connection()
            except _KeyUnusable as exc:
                result.status, result.error = "auth", (
                    "%s, so the command did not run" % exc)
                return
            sock = None
            try:
                sock = cxn.connect_kwargs["sock"] = self._dial()
                cxn.open()
            except (OSError, paramiko.SSHException, EOFError) as exc:
                transport = cxn.client.get_transport()
                spoke = bool(transport and transport.remote_version)
                # Fabric closes only connections that opened.
                cxn.client.close()
                if sock is not None:
                    sock.close()
                result.status, result.error = _describe_connect_error(
                    exc, self, self.connect_timeout, spoke)
                return
            kept = self._pool and self._pool.keep(self, cxn)
            try:
                self._work(kept, cxn, command, timeout, result, entry,
                           script)
            except _StaleConnection as exc:
                result.status = "error"
                result.error = "connection to %s lost: %s" % (
                    self.address, exc)
            finally:
                if kept:
                    self._pool.give_back(kept, broken=result.status in (
                        "error", "interrupted"))
                else:
                    cxn.close()

    def _dial(self):
        """A TCP connection to the client's sshd that sends small packets
        at once and acknowledges at once (see `_QuickAckSocket`).
        """
        sock = socket.create_connection((self.host, self.port),
                                        self.connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if _QUICKACK is None:
            return sock
        return _QuickAckSocket(sock.family, sock.type, sock.proto,
                               fileno=sock.detach())

    def _work(self, kept, cxn, command, timeout, result, entry, script):
        """Run on the open *cxn* (kept in the pool as *kept*, or None); a
        connection lost is the result's error, except before anything
        ran: that raises _StaleConnection.
        """
        try:
            if script is None:
                self._execute(kept, cxn, command, timeout, result, entry)
            else:
                self._execute_script(kept, cxn, script, timeout, result,
                                     entry)
        except _StaleConnection:
            raise
        except (OSError, paramiko.SSHException, EOFError) as exc:
            result.status = "error"
            result.error = "connection to %s lost: %s" % (self.address, exc)

    def _execute(self, kept, cxn, command, timeout, result, entry):
        """Run *command* in *kept*'s shell when it is free, else on a
        channel of its own.
        """
        out = _Stream(entry.stdout, self.max_output)
        err = _Stream(entry.stderr, self.max_output)
        if kept and kept.shell is not False and \
                kept.shell_lock.acquire(blocking=False):
            try:
                code, timed_out, stopped = self._execute_in_shell(
                    kept, command, timeout, out, err)
            finally:
                kept.shell_lock.release()
            if code is not None:
                self._finish(result, out, err, code, timeout, timed_out,
                             stopped)
                return
        pid = _Pid(err)
        channel = self._open_session(cxn)
        execution = self._execution = _Execution(
            cxn, channel, pid, lambda deadline: _drain(channel, out, pid,
                                                       deadline))
        try:
            if self._stopping:
                result.status = "interrupted"
                result.error = "not started: the server is stopping"
                return
            started = time.monotonic()
            _exec(channel, _announced(command))
            channel.shutdown_write()
            timed_out = not _drain(channel, out, pid, started + timeout)
            ended = not timed_out or execution.end()
            code = channel.recv_exit_status() if ended else -1
        finally:
            self._execution = None
            channel.close()
        self._finish(result, out, err, code, timeout, timed_out,
                     execution.stopped)

    def _execute_in_shell(self, kept, command, timeout, out, err):
        """Run *command* in *kept*'s `_Shell`, starting one if there is
        none.  Returns ``(exit code or -1, timed out, stopped)``, or
        ``(None, ...)`` when nothing ran and the caller should use a channel
        of its own: the login shell cannot run the shell's program, or the
        server is stopping.  Raises _StaleConnection when the connection
        does not answer in time: the command was not sent.
        """
        shell = kept.shell
        if shell is None or not shell.alive:
            channel = self._open_session(kept.cxn)
            _exec(channel, _SHELL_LOOP)
            shell = kept.shell = _Shell(channel)
        channel = shell.channel
        token = ("sugar-%s" % secrets.token_hex(16)).encode()
        marked_out, marked_err = _Marked(out, token), _Marked(err, token)
        try:
            channel.sendall(token + b"\n")
            _drain(channel, marked_out, marked_err,
                   time.monotonic() + self.connect_timeout,
                   lambda: marked_out.head is not None)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            _close(channel)
            raise _StaleConnection(str(exc) or type(exc).__name__) from None
        if marked_out.head is None or \
                not re.fullmatch(rb"[0-9]{1,9}", marked_out.head):
            ended_early = not shell.alive
            _close(channel)
            if shell.new and ended_early:
                logger.info("%s: the login shell cannot keep a shell "
                            "running; each command gets a channel",
                            self.address)
                kept.shell = False
                return None, False, False
            raise _StaleConnection("no answer within %gs"
                                   % self.connect_timeout)
        if not shell.new and (marked_out.stray or marked_err.stray):
            # A process an earlier command left running writes to this
            # shell's output, and would write into this command's.  A new
            # shell leaves it the old channel, which closing ends: its
            # next write fails, as after a plain ssh session.
            logger.info("%s: output came between runs; the kept shell is "
                        "replaced", self.address)
            _close(channel)
            kept.shell = None
            return self._execute_in_shell(kept, command, timeout, out, err)
        shell.new = False
        if self._stopping:
            _close(channel)
            return None, False, False

        def ended():
            return marked_out.ended and marked_err.ended

        def over():
            return ended() or channel.exit_status_ready()
        execution = self._execution = _Execution(
            kept.cxn, channel, _Pid.known(int(marked_out.head)),
            lambda deadline: _drain(channel, marked_out, marked_err,
                                    deadline, over), relay=True)
        marked_out.start()
        marked_err.start()
        try:
            started = time.monotonic()
            channel.sendall(command.encode("utf-8", "surrogateescape")
                            + b"\n" + token + b"\n")
            timed_out = not _drain(channel, marked_out, marked_err,
                                   started + timeout, over)
            if timed_out:
                execution.end()
        finally:
            self._execution = None
        marked_out.flush()
        marked_err.flush()
        if not ended() or timed_out or execution.stopped or \
                not re.fullmatch(rb"[0-9]{1,3}", marked_out.tail):
            _close(channel)
            return -1, timed_out, execution.stopped
        return int(marked_out.tail), False, False

    def _finish(self, result, out, err, code, timeout, timed_out, stopped):
        (result.stdout, out_digest), (result.stderr, err_digest) = (
            out.finish(), err.finish())
        result.stdout_cut, result.stderr_cut = out.cut, err.cut
        result.digest = hashlib.sha256(out_digest + err_digest).hexdigest()
        self._judge(result, code, timeout, timed_out, stopped)

    def _execute_script(self, kept, cxn, script, timeout, result, entry):
        """Copy *script* over SFTP to a new private file, run it, and
        remove it, whatever happened.
        """
        sftp = self._open_sftp(cxn)
        if sftp is None:
            result.status = "error"
            result.error = ("sshd refused SFTP, which scripts are copied "
                            "with; enable its sftp subsystem")
            return
        path = "/tmp/sugar-%s" % secrets.token_hex(16)
        try:
            try:
                with sftp.open(path, "wx") as copy:
                    copy.chmod(0o700)
                    copy.write(script.content)
            except (OSError, paramiko.SSHException) as exc:
                result.status = "error"
                result.error = "could not copy the script to %s: %s" % (
                    path, exc)
                return
            self._execute(kept, cxn, script.command_line(path), timeout,
                          result, entry)
        finally:
            try:
                sftp.remove(path)
            except (OSError, paramiko.SSHException, EOFError):
                logger.warning("%s: could not remove the script %s",
                               self.address, path)
            sftp.close()

    def _open_session(self, cxn):
        """A new channel on *cxn*, waiting at most the connect timeout;
        _StaleConnection if that fails, as nothing has run yet.
        """
        try:
            return cxn.transport.open_session(timeout=self.connect_timeout)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise _StaleConnection(str(exc) or type(exc).__name__) from None

    def _open_sftp(self, cxn):
        """An SFTP client on *cxn*, or None when sshd refuses SFTP.

        Raises _StaleConnection when the connection itself is dead.
        """
        channel = self._open_session(cxn)
        try:
            channel.invoke_subsystem("sftp")
            return paramiko.SFTPClient(channel)
        except (OSError, paramiko.SSHException, EOFError):
            channel.close()
            if not cxn.is_connected:
                raise _StaleConnection("connection closed") from None
            return None

    def stop(self):
        """Stop the command running here now, if any (from any thread).

        Its Result says ``interrupted``; a run not started yet will not
        start.
        """
        self._stopping = True
        execution = self._execution
        if execution is not None:
            execution.stop()

    @staticmethod
    def _judge(result, code, timeout, timed_out, stopped):
        if stopped:
            result.status = "interrupted"
            result.error = "stopped because the server shut down"
        elif timed_out:
            result.status = "timeout"
            result.error = "ran past its %gs limit and was stopped" % timeout
        elif code < 0:
            result.status = "error"
            result.error = ("the command ended without an exit code: its "
                            "shell or SSH session was killed or lost")
        else:
            result.exit_code = code
            result.status = "ok" if code == 0 else "failed"


IDEMPOTENCY_DAYS = 1


class _JobStore:
    """Job records in a shelf, keyed by job id; the newest *keep* stay.

    Besides records (under their id, a decimal string), the shelf holds
    ``next`` (the next job id), ``oldest`` (the oldest id maybe still kept)
    and ``key:<Idempotency-Key>`` entries (``(job id, fingerprint,
    time)``).  Records still ``running`` when the store is opened were cut
    short by a crash and are marked ``interrupted``; `cut_short` lists
    them, oldest first.
    """

    def __init__(self, path, keep):
        self.keep = keep
        self._lock = threading.Lock()
        self._shelf = _open_shelf(path, "JOBS")
        self.cut_short = self._mark_interrupted()

    def _mark_interrupted(self):
        marked = []
        for key in list(self._shelf.keys()):
            if key.isdigit() and self._shelf[key]["state"] == "running":
                record = self._shelf[key]
                record["state"] = "interrupted"
                self._shelf[key] = record
                marked.append(record)
        self._shelf.sync()
        return sorted(marked, key=lambda record: record["id"])

    def new_id(self):
        with self._lock:
            job_id = self._shelf.get("next", 1)
            self._shelf["next"] = job_id + 1
            self._shelf.sync()
        return job_id

    def save(self, record):
        """Store *record* and drop the records past the newest `keep`."""
        with self._lock:
            self._shelf[str(record["id"])] = record
            if record.get("key"):
                self._shelf["key:" + record["key"]] = (
                    record["id"], record["fingerprint"], time.time())
            self._prune(self._shelf.get("next", 1) - self.keep)
            self._shelf.sync()

    def _prune(self, below):
        """Drop the records below id *below*, up to one still running."""
        oldest = self._shelf.get("oldest", 1)
        for job_id in range(oldest, below):
            record = self._shelf.get(str(job_id))
            if record and record["state"] == "running":
                below = job_id
                break
            self._shelf.pop(str(job_id), None)
            if record and record.get("key"):
                self._shelf.pop("key:" + record["key"], None)
        self._shelf["oldest"] = max(oldest, below)

    def get(self, job_id):
        with self._lock:
            return self._shelf.get(str(job_id))

    def by_key(self, key):
        """``(job id, fingerprint)`` of a key used in the last day."""
        with self._lock:
            found = self._shelf.get("key:" + key)
        if found and time.time() - found[2] < IDEMPOTENCY_DAYS * 86400:
            return found[:2]
        return None

    def recent(self, limit):
        """Up to *limit* records, newest first."""
        with self._lock:
            newest = self._shelf.get("next", 1) - 1
            oldest = self._shelf.get("oldest", 1)
            records = []
            for job_id in range(newest, oldest - 1, -1):
                if len(records) == limit:
                    break
                record = self._shelf.get(str(job_id))
                if record:
                    records.append(record)
        return records

    def close(self):
        with self._lock:
            self._shelf.close()


class _Job:
    """A run in progress: its record and its clients' futures.

    When the last future is done, the record gets every client's result
    and is passed to *on_finish*; then `done` is set.
    """

    def __init__(self, record, on_finish):
        self.record = record
        self.futures = []
        self.done = threading.Event()
        self._on_finish = on_finish
        self._lock = threading.Lock()
        self._left = 0
        self.replayed = False

    @classmethod
    def from_record(cls, record):
        """A finished job as kept in the store."""
        job = cls(record, None)
        for document in record["clients"]:
            future = concurrent.futures.Future()
            future.set_result(Result.from_dict(document))
            future.address = document["address"]
            future.client = future.result()
            job.futures.append(future)
        job.done.set()
        return job

    def start(self, futures):
        """Follow *futures*, one per client, in registry order."""
        self.futures = futures
        self._left = len(futures)
        if not futures:
            self._finish()
        for future in futures:
            future.add_done_callback(self._one_done)

    @property
    def id(self):
        return self.record["id"]

    def _one_done(self, future):
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._finish()

    def _finish(self):
        results = self.results()
        self.record["clients"] = [r.as_dict() for r in results]
        self.record["ended"] = _timestamp()
        self.record["state"] = "interrupted" if any(
            r.status == "interrupted" for r in results) else "finished"
        try:
            self._on_finish(self)
        finally:
            self.done.set()

    def results(self):
        """The Results of the clients done so far, in registry order."""
        return [_interrupted(f.client, self.record["command"],
                             "not started: the server shut down")
                if f.cancelled() else f.result()
                for f in self.futures if f.done()]

    def snapshot(self):
        """The record as it stands, with the results so far."""
        record = dict(self.record)
        if not self.done.is_set():
            record["clients"] = [r.as_dict() for r in self.results()]
        return record


def _interrupted(client, command, error):
    """An ``interrupted`` Result for *client*, saying *error*."""
    result = Result(client, command)
    result.status = "interrupted"
    result.error = error
    return result


def _fingerprint(form):
    """What makes two /run requests the same, for Idempotency-Key."""
    same = {k: v if isinstance(v, str) else hashlib.sha256(v).hexdigest()
            for k, v in form.items() if k not in ("async", "stream")}
    return json.dumps(same, sort_keys=True)


class _Refused(Exception):
    """A run that cannot start: an HTTP status and one line saying why."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------
# HTTP interface
# ---------------------------------------------------------------------------

class _HTTPProblem(Exception):
    """An HTTP error answer: a status and one line naming what to fix."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status = status
        self.headers = list(dict(headers).items()) if isinstance(
            headers, dict) else list(headers)


# Control characters from a request would let it forge or garble log lines.
_CONTROL_ESCAPES = {code: "\\x%02x" % code
                    for code in list(range(32)) + [127]}

_CHALLENGE = [("WWW-Authenticate", 'Bearer realm="sugar"'),
              ("WWW-Authenticate", 'Basic realm="sugar"')]


_FORM_TYPE = "application/x-www-form-urlencoded"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers the HTTP API; the `Server` is ``self.server.sugar``."""

    protocol_version = "HTTP/1.1"
    # Every answer, even to a request line that is not HTTP, has a status
    # line and headers (http.server would answer those as HTTP/0.9).
    default_request_version = "HTTP/1.0"
    server_version = "Sugar"
    open_paths = ("/register", "/pubkey")
    _watchdog = None
    routes = (
        ("/", {"GET": "usage"}),
        ("/register", {"POST": "register"}),
        ("/run", {"POST": "run"}),
        ("/clients", {"GET": "list_clients"}),
        ("/clients/<id>", {"GET": "show_client", "DELETE": "delete_client"}),
        ("/jobs", {"GET": "list_jobs"}),
        ("/jobs/<id>", {"GET": "show_job"}),
        ("/pubkey", {"GET": "pubkey"}),
    )

    def setup(self):
        self.timeout = self.server.sugar.request_timeout
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self._arm()
            self.connection.do_handshake()

    def handle_one_request(self):
        self._arm()
        try:
            super().handle_one_request()
        finally:
            self._disarm()

    def parse_request(self):
        # A TLS handshake on a plain HTTP port: say so, without echoing it.
        if self.raw_requestline.startswith(b"\x16\x03"):
            return self._refuse_request_line(
                "(a TLS handshake)", "this port speaks plain HTTP, not "
                "HTTPS; use http://, or start Sugar with TLS_CERT and "
                "TLS_KEY")
        # A request line without a version (HTTP/0.9) has no headers to
        # wait for: refuse it at once.
        words = len(self.raw_requestline.split())
        line = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        if words == 2:
            return self._refuse_request_line(
                line, "the request line has no HTTP version; send HTTP/1.1 "
                "(as curl does)")
        if words == 1:
            return self._refuse_request_line(
                line, "the request line %r is not a method, a path and an "
                "HTTP version; send one such as GET / HTTP/1.1 (as curl "
                "does)" % line[:40])
        if not super().parse_request():
            return False
        # The email parser ends the headers at a line without a colon,
        # dropping the rest (Content-Length among them).
        if any(isinstance(defect,
                          email.errors.MissingHeaderBodySeparatorDefect)
               for defect in self.headers.defects):
            self.close_connection = True
            self.send_error(400, "a header line has no colon; send each "
                            "header as Name: value")
            return False
        return True

    def _refuse_request_line(self, shown, message):
        """Answer 400 with *message* before parsing the request; *shown*
        stands for the request line in the server log.  False, as
        `parse_request` returns for a request it did not take.
        """
        self.command, self.request_version = None, \
            self.default_request_version
        self.requestline = shown
        self.send_error(400, message)
        return False

    def _arm(self):
        """Cut the connection unless the request is read in time."""
        self._disarm()
        self._watchdog = threading.Timer(self.timeout, self._cut)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _disarm(self):
        if self._watchdog:
            self._watchdog.cancel()
            self._watchdog = None

    def _cut(self):
        logger.info("%s sent no whole request in %gs; connection closed",
                    self.address_string(), self.timeout)
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def address_string(self):
        """The requester's address, IPv4 ones without an IPv6 prefix."""
        return _requester_host(self.client_address[0])

    def log_message(self, format, *args):
        logger.info("%s %s", self.address_string(),
                    (format % args).translate(_CONTROL_ESCAPES))

    def log_error(self, format, *args):
        logger.warning("%s %s", self.address_string(),
                       (format % args).translate(_CONTROL_ESCAPES))

    def send_error(self, code, message=None, explain=None):
        """Answer every error, ours or http.server's, as one line."""
        if code == 501:
            message = ("method %r is not one Sugar answers; use GET, POST "
                       "or DELETE (GET / lists the endpoints)"
                       % str(self.command)[:40])
        elif code == 414:
            message = ("the request line is over 64 KiB; send a shorter "
                       "path and query")
        elif code == 431:
            message = ("a header line is over 64 KiB, or there are over 100 "
                       "headers; send fewer and shorter headers")
        elif code == 505:
            message = ("HTTP version %r is not one Sugar speaks; use HTTP/1.1 "
                       "(as curl does)" % str(self.raw_requestline,
                                              "iso-8859-1").split()[-1][:40])
        self._reply(code, message or self.responses[code][0],
                    {"Connection": "close"})

    def _reply(self, status, text, headers=None, content_type=None):
        if status >= 400:
            text = " ".join(text.split())
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
        if isinstance(headers, dict):
            headers = headers.items()
        headers = list(headers or ())
        if status >= 400 and "connection" not in (n.lower() for n, _ in
                                                   headers):
            # The body may be unread: the connection cannot go on.
            headers.append(("Connection", "close"))
        for name, value in headers or ():
            if name.lower() == "connection" and value == "close":
                self.close_connection = True
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reply_json(self, status, document, headers=None):
        self._reply(status, json.dumps(document, indent=2), headers,
                    content_type="application/json")

    def _wants_json(self):
        return self._accepts("application/json")

    def _accepts(self, kind):
        """True if the Accept header names *kind* (without q=0)."""
        accept = getattr(self, "headers", None) and self.headers["Accept"]
        for item in (accept or "").lower().split(","):
            name, _, parameters = item.partition(";")
            if name.strip() == kind and parameters.replace(" ", "") not in (
                    "q=0", "q=0.0"):
                return True
        return False

    def _route(self, path):
        """``(pattern, methods, arguments)`` of the route for *path*."""
        parts = path.split("/")
        for pattern, methods in self.routes:
            wanted = pattern.split("/")
            if len(wanted) == len(parts) and all(
                    w == p or (w == "<id>" and p)
                    for w, p in zip(wanted, parts)):
                return pattern, methods, [
                    urllib.parse.unquote(p) for w, p in zip(wanted, parts)
                    if w == "<id>"]
        raise _HTTPProblem(404, "no such path: %r; Sugar answers %s" % (
            path[:200], ", ".join(pattern for pattern, _ in self.routes)))

    def _dispatch(self):
        try:
            # http.server reads the request line as Latin-1; a path sent
            # with bytes that are not ASCII holds UTF-8.
            path = self.path.partition("?")[0].encode("latin-1").decode(
                "utf-8", "replace")
            pattern, methods, arguments = self._route(
                path.rstrip("/") or "/")
            if self.command == "HEAD" and "GET" in methods:
                methods = dict(methods, HEAD=methods["GET"])
            if self.command not in methods:
                allowed = ", ".join(sorted(set(methods) | (
                    {"HEAD"} if "GET" in methods else set())))
                raise _HTTPProblem(405, "%s is not allowed on %s; use %s"
                                   % (self.command, path[:200], allowed),
                                   {"Allow": allowed})
            if pattern not in self.open_paths and not self._authorised():
                logger.info("%s refused %s %s: no valid API token",
                            self.address_string(), self.command, path[:200])
                raise _HTTPProblem(401, "%s; send it as Authorization: "
                                   "Bearer TOKEN, or with curl -u :TOKEN" % (
                                       "the token sent is not the API token"
                                       if self._sent_token() else
                                       "this needs the API token"),
                                   _CHALLENGE)
            if self.command in ("GET", "HEAD", "DELETE"):
                self._refuse_body()
                self._disarm()
            getattr(self, "do_" + methods[self.command])(*arguments)
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

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = \
        do_OPTIONS = _dispatch

    def _header(self, name):
        """The value of header *name*, or None; 400 if it comes twice."""
        values = self.headers.get_all(name) or [None]
        if len(values) > 1:
            raise _HTTPProblem(400, "header %r is given more than once; "
                               "send it once" % name, {"Connection": "close"})
        # HTTP allows blanks around a value; Python keeps those after it.
        return values[0] and values[0].strip(" \t")

    def _sent_token(self):
        """Whether the request carries some Authorization."""
        return bool((self._header("Authorization") or "").strip())

    def _presented_token(self):
        """The token in the Authorization header (bearer or basic), or None.
        """
        kind, _, value = (self._header("Authorization") or "").partition(" ")
        if kind.lower() == "bearer":
            return value.strip()
        if kind.lower() == "basic":
            try:
                pair = base64.b64decode(value.strip(), validate=True)
            except ValueError:
                # Not base64, or not even ASCII (binascii.Error is one).
                return None
            return pair.decode("utf-8", "replace").partition(":")[2]
        return None

    def _authorised(self, token=None):
        """True if the request carries *token* (default: the API token)."""
        expected = token or self.server.sugar.token
        presented = self._presented_token()
        return presented is not None and hmac.compare_digest(
            presented.encode("utf-8"), expected.encode("utf-8"))

    def _refuse_body(self):
        """400 for a body on a request that takes none."""
        if self.headers["Content-Length"] not in (None, "0") or \
                self.headers["Transfer-Encoding"]:
            raise _HTTPProblem(400, "%s %s takes no body; send it without "
                               "one" % (self.command, urllib.parse.urlsplit(
                                   self.path).path[:200]),
                               {"Connection": "close"})

    def _read_query(self, allowed):
        """The query string as a dict; 400 for an unknown or repeated name."""
        query = self.path.partition("?")[2]
        return self._parse_form(query.encode("latin-1"), allowed, "query")

    def _read_form(self, allowed):
        """The urlencoded body as a dict of single values.

        Raises _HTTPProblem for a body Sugar cannot take: 411, 400, 413,
        415, or 400 naming a repeated or unknown field.
        """
        self._read_query(())
        if self.headers["Transfer-Encoding"]:
            raise _HTTPProblem(411, "Transfer-Encoding is not supported; "
                               "send the form with a Content-Length (curl "
                               "-d does)")
        length = self._header("Content-Length")
        if length is None:
            raise _HTTPProblem(411, "Content-Length is missing; send the "
                              "form with a length (curl -d does)",
                              {"Connection": "close"})
        if not re.fullmatch(r"[0-9]{1,20}", length):
            raise _HTTPProblem(400, "Content-Length %r is not a count of "
                               "bytes; send the body's length"
                               % length[:40], {"Connection": "close"})
        kind = (self._header("Content-Type") or "").split(";")[0].strip()
        kind = kind.lower()
        multipart = kind == "multipart/form-data" and "script" in allowed
        most = MAX_BODY + (self.server.sugar.max_script if multipart else 0)
        if int(length) > most:
            raise _HTTPProblem(413, "body of %s bytes is over the limit of "
                               "%d bytes (%s); send less" % (
                                   length, most,
                                   "MAX_SCRIPT for the script and 64 KiB "
                                   "for the rest" if multipart else
                                   "64 KiB for a form"))
        try:
            body = self.rfile.read(int(length))
        except OSError:
            body = b""
        self._disarm()
        if kind != _FORM_TYPE and not multipart:
            raise _HTTPProblem(415, "Content-Type %r is not %s; send the "
                               "fields as with curl -d" % (kind, _FORM_TYPE))
        if len(body) < int(length):
            raise _HTTPProblem(400, "body ended after %d of %s bytes"
                               % (len(body), length))
        if multipart:
            return self._parse_multipart(body, allowed)
        form = self._parse_form(body, allowed)
        if "script" in form:
            raise _HTTPProblem(400, "field 'script' is an upload; send it "
                               "as a file, as with curl -F script=@file")
        return form

    def _parse_multipart(self, body, allowed):
        """A multipart/form-data body as a dict: text fields as str, the
        ``script`` file as bytes (its file name in ``_upload_name``).
        """
        head = "Content-Type: %s\r\n\r\n" % self.headers["Content-Type"]
        message = email.parser.BytesParser(policy=email.policy.HTTP).\
            parsebytes(head.encode("latin-1") + body)
        if not message.is_multipart():
            raise _HTTPProblem(400, "the body is not multipart/form-data; "
                               "send the fields as with curl -F")
        if any(isinstance(defect, email.errors.CloseBoundaryNotFoundDefect)
               for defect in message.defects):
            raise _HTTPProblem(400, "the multipart body has no closing "
                               "boundary, so it may be cut short; send it "
                               "whole, as curl -F does")
        form, self._upload_name = {}, None
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name is None:
                raise _HTTPProblem(400, "a part of the body has no field "
                                   "name; send the fields as with curl -F "
                                   "name=value")
            if name not in allowed:
                raise _HTTPProblem(400, "field %r is unknown; this endpoint "
                                   "takes %s" % (str(name)[:40],
                                                 ", ".join(allowed)))
            if name in form:
                raise _HTTPProblem(400, "field %r is given twice; send it "
                                   "once" % name)
            data = part.get_payload(decode=True) or b""
            if name == "script":
                if len(data) > self.server.sugar.max_script:
                    raise _HTTPProblem(413, "the script is over the limit "
                                       "of %d bytes (MAX_SCRIPT)"
                                       % self.server.sugar.max_script)
                form[name] = data
                self._upload_name = part.get_filename()
                continue
            try:
                form[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise _HTTPProblem(400, "field %r is not valid UTF-8; send "
                                   "it in UTF-8" % name) from None
        return form

    @staticmethod
    def _parse_form(body, allowed, kind="field"):
        where = "the body" if kind == "field" else "the query string"
        hint = (", and a value holding &, + or % with curl "
                "--data-urlencode" if kind == "field" else "")
        # An empty part (a trailing or doubled &) is harmless.
        parts = [part for part in body.decode(
            "utf-8", "surrogateescape").split("&") if part]
        for part in parts:
            if "=" not in part:
                raise _HTTPProblem(400, "%s has %r without '='; send "
                                   "name=value pairs%s" % (
                                       where, part[:40], hint))
        try:
            pairs = urllib.parse.parse_qsl(
                "&".join(parts), keep_blank_values=True,
                strict_parsing=bool(parts),
                errors="surrogateescape", max_num_fields=len(allowed) + 1)
        except ValueError as exc:
            if str(exc).startswith("Max number of fields"):
                raise _HTTPProblem(400, "%s has too many fields; this "
                                   "endpoint takes %s, each once" % (
                                       where, ", ".join(allowed) or "none")) \
                    from None
            raise _HTTPProblem(400, "%s is not a urlencoded form "
                               "(name=value&name=value)" % where) from None
        form = {}
        for name, value in pairs:
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise _HTTPProblem(400, "%s has a name that is not valid "
                                   "UTF-8; send names and values in UTF-8"
                                   % where) from None
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _HTTPProblem(400, "%s %r is not valid UTF-8; send it "
                                   "in UTF-8" % (kind, name[:40])) from None
            if name not in allowed:
                raise _HTTPProblem(400, "%s %r is unknown; this endpoint "
                                   "takes %s" % (kind, name[:40],
                                                 ", ".join(allowed)
                                                 or "none"))
            if name in form:
                raise _HTTPProblem(400, "%s %r is given twice; send it "
                                   "once" % (kind, name))
            form[name] = value
        return form

    def do_pubkey(self):
        self._read_query(())
        try:
            line = self.server.sugar.public_key()
        except _KeyUnusable as exc:
            raise _HTTPProblem(404, str(exc)) from None
        if line is None:
            raise _HTTPProblem(404, "the server has no public SSH key to "
                               "give; set SSH_KEY, or create one with "
                               "ssh-keygen")
        self._reply(200, line)

    def do_usage(self):
        self._reply(200, _USAGE)

    def do_register(self):
        form = self._read_form(("id", "address", "username", "hostkey",
                                "token"))
        sugar = self.server.sugar
        field = form.get("token")
        admin = self._authorised() or field is not None and \
            hmac.compare_digest(field.encode("utf-8"),
                                sugar.token.encode("utf-8"))
        if sugar.register_token and not admin and not self._has_register_token(
                field, sugar.register_token):
            raise _HTTPProblem(401, "%s; send it as the field token or as "
                               "Authorization: Bearer TOKEN" % (
                                   "the token sent is not the register token"
                                   if field is not None or self._sent_token()
                                   else "registering needs the register "
                                   "token"), _CHALLENGE)
        try:
            client_id = _check_id(_required(
                form, "id", "the machine's id, such as "
                "id=$(</etc/machine-id)"))
            if "address" in form:
                host, port = _parse_address(form["address"])
            else:
                host, port = _requester_host(self.client_address[0]), 22
            username = _check_username(form.get("username", DEFAULT_USERNAME))
            hostkey = form.get("hostkey") and _parse_hostkey(form["hostkey"])
        except _BadField as exc:
            raise _HTTPProblem(400, str(exc)) from None
        self._keep_pin(sugar.registry.get(client_id), hostkey, admin)
        entry, previous = sugar.registry.register(
            client_id, host, port, username, hostkey)
        if previous and (previous["host"], previous["port"],
                         previous["username"], previous.get("hostkey")) != (
                host, port, username, entry["hostkey"]):
            sugar.forget(client_id)
        address = _format_address(host, port)
        document = {"result": "added" if previous is None else "updated",
                    "id": client_id, "address": address,
                    "username": username}
        if previous is None:
            logger.info("%s: registered client %s", address, client_id)
            text = "added client %s at %s as %s" % (client_id, address,
                                                    username)
        else:
            before = _format_address(previous["host"], previous["port"])
            logger.info("%s: client %s registered again (was %s)", address,
                        client_id, before)
            replaced = bool(previous.get("hostkey")) and \
                previous["hostkey"] != entry["hostkey"]
            text = "updated client %s at %s as %s (was %s as %s)%s" % (
                client_id, address, username, before, previous["username"],
                "; its pinned host key is replaced" if replaced else "")
            document.update(was_address=before,
                            was_username=previous["username"],
                            hostkey_replaced=replaced)
        status = 201 if previous is None else 200
        if self._wants_json():
            self._reply_json(status, document)
        else:
            self._reply(status, text)

    def _has_register_token(self, field, expected):
        if field is not None:
            return hmac.compare_digest(field.encode("utf-8"),
                                       expected.encode("utf-8"))
        return self._authorised(expected)

    @staticmethod
    def _keep_pin(previous, hostkey, admin):
        """409 unless *hostkey* may replace the pinned key of *previous*."""
        pinned = previous and previous.get("hostkey")
        if pinned and hostkey and hostkey != pinned and not admin:
            raise _HTTPProblem(409, (
                "client %s has another pinned host key (%s); replacing it "
                "needs the API token (Authorization: Bearer TOKEN or the "
                "field token), as for a re-installed machine" % (
                    previous["id"], _hostkey_object(pinned).fingerprint)))

    def do_run(self):
        form = self._read_form(_RUN_FIELDS)
        timeout = _seconds(form, "timeout", MAX_COMMAND_TIMEOUT)
        stream, background = _flag(form, "stream"), _flag(form, "async")
        if stream and background:
            raise _HTTPProblem(400, "fields 'stream' and 'async' exclude "
                               "each other; send one of them")
        key = _idempotency_key(self._header("Idempotency-Key"))
        sources = [name for name in ("command", "url", "script", "rerun")
                   if name in form]
        if len(sources) > 1:
            raise _HTTPProblem(400, "fields %s exclude each other; send one "
                               "of them" % " and ".join(map(repr, sources)))
        if "args" in form and not {"url", "script"} & set(sources):
            raise _HTTPProblem(400, "field 'args' goes with 'url' or "
                               "'script'; send one of them too")
        script, ids = None, None
        if "rerun" in form:
            command, ids, timeout, script = self._rerun(form, timeout)
        elif sources:
            command = form[sources[0]]
            try:
                script = self._script(form, sources[0])
            except _BadField as exc:
                raise _HTTPProblem(400, str(exc)) from None
            if script is None:
                command = _command(form)
        else:
            raise _HTTPProblem(400, "field 'command' is missing; send the "
                               "shell command to run (or 'url', 'script' or "
                               "'rerun')")
        try:
            job = self.server.sugar.start_job(
                command, timeout=timeout, target=form.get("target"),
                ids=ids, include_stale=_flag(form, "stale"),
                requester=self.address_string(), key=key,
                fingerprint=_fingerprint(form), script=script,
                rerun=int(form["rerun"]) if ids is not None else None)
        except _BadField as exc:
            raise _HTTPProblem(400, str(exc)) from None
        except _Refused as exc:
            raise _HTTPProblem(exc.status, str(exc)) from None
        headers = {"Location": "/jobs/%d" % job.id}
        if job.replayed:
            headers["Idempotent-Replayed"] = "true"
        if background:
            self._reply_job_started(job, headers)
        elif stream:
            self._stream_run(job, headers)
        else:
            job.done.wait()
            self._reply_results(job, headers)

    def _rerun(self, form, timeout):
        """Command, client ids and timeout of a ``rerun`` request."""
        for name in ("target",):
            if name in form:
                raise _HTTPProblem(400, "field %r does not go with 'rerun', "
                                   "which runs that job's command on its "
                                   "clients; send one or the other" % name)
        only = form.get("only", "all")
        if only not in ("all", "failed"):
            raise _HTTPProblem(400, "field 'only': %r is not allowed; send "
                               "failed or all" % only[:40])
        earlier = self._job(form["rerun"], "rerun")
        record = earlier.snapshot()
        targets = record.get("targets") or [c["id"] for c in
                                            record["clients"]]
        done_ok = {c["id"] for c in record["clients"] if c["status"] == "ok"}
        ids = [i for i in targets if only == "all" or i not in done_ok]
        if not ids:
            raise _HTTPProblem(404, "job %d has no client%s; nothing ran"
                               % (earlier.id, "" if only == "all" else
                                  " that did not end ok"))
        script = earlier.record.get("script")
        return earlier.record["command"], ids, (
            timeout or earlier.record["timeout"]), (
            script and _Script.from_record(script))

    def _script(self, form, source):
        """The `_Script` a /run asks for with *source*, or None for a
        command.  Fetches a ``url`` (502 if that fails) and checks its
        ``sha256`` (409 if it differs).
        """
        sugar = self.server.sugar
        digest = form.get("sha256", "")
        if digest and not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise _HTTPProblem(400, "field 'sha256': %r is not 64 hex "
                               "digits" % digest[:80])
        digest = digest.lower()
        if source == "command":
            if digest:
                raise _HTTPProblem(400, "field 'sha256' goes with 'url' or "
                                   "'script'")
            return None
        if source == "url":
            name = form["url"]
            _check_url(name)
            _parse_args(form.get("args", ""))
            if sugar.require_sha256 and not digest:
                raise _HTTPProblem(400, "field 'sha256' is missing; this "
                                   "server runs scripts from URLs only with "
                                   "their digest (REQUIRE_SHA256)")
            try:
                content = _download(name, sugar.max_script, DOWNLOAD_TIMEOUT)
            except ValueError as exc:
                raise _HTTPProblem(502, "could not fetch %r: %s; nothing "
                                   "ran" % (name[:200], exc)) from None
        else:
            # The name only labels logs and jobs: keep it one plain word.
            content = form["script"]
            name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(
                self._upload_name or "")) or "upload"
        if not content:
            raise _HTTPProblem(400, "the script from %r is empty; nothing "
                               "ran" % name[:200])
        script = _Script(content, name, form.get("args", ""))
        if digest and digest != script.sha256:
            raise _HTTPProblem(409, "the script from %r has sha256 %s, not "
                               "%s as asked; nothing ran" % (
                                   name[:200], script.sha256, digest))
        return script

    def _job(self, text, field=None):
        """The job whose id is *text*; 404 (or 400 for a field) if none."""
        job = self.server.sugar.job(int(text)) if re.fullmatch(
            r"0|[1-9][0-9]{0,17}", text) else None
        if job is None:
            where = "field %r: " % field if field else ""
            raise _HTTPProblem(400 if field else 404, "%sno job %r; GET "
                               "/jobs lists them" % (where, text[:40]))
        return job

    def _reply_job_started(self, job, headers):
        if self._wants_json():
            self._reply_json(202, {"job": job.id, "url": "/jobs/%d" % job.id,
                                   "state": job.record["state"]}, headers)
        else:
            self._reply(202, "job %d started on %d client%s; see GET /jobs/%d"
                        % (job.id, len(job.futures),
                           "s"[len(job.futures) == 1:], job.id), headers)

    def _reply_results(self, job, headers):
        results = job.results()
        if self._wants_json():
            self._reply_json(200, _run_document(job, results), headers)
        else:
            self._reply(200, _run_text(results) + "job %d\n" % job.id,
                        headers)

    def _stream_run(self, job, headers):
        """Answer /run in chunks: a line per client as it ends, then all."""
        ndjson = self._accepts("application/x-ndjson")
        self._chunked = self.request_version != "HTTP/1.0"
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson" if ndjson
                         else "text/plain; charset=utf-8")
        for name, value in headers.items():
            self.send_header(name, value)
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        self.end_headers()
        width = max([len(f.address) for f in job.futures] or [0])
        for future in concurrent.futures.as_completed(job.futures):
            result = future.result()
            self._send_chunk(
                json.dumps(result.as_dict()) + "\n" if ndjson
                else "%-*s  %s\n" % (width, result.address, result.outcome))
        job.done.wait()
        results = job.results()
        if ndjson:
            document = _run_document(job, results)
            del document["clients"]
            self._send_chunk(json.dumps(document) + "\n")
        else:
            self._send_chunk(_run_text(results, outcomes=False)
                             + "job %d\n" % job.id)
        if self._chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _send_chunk(self, text):
        """Send *text* now, as a chunk unless the client speaks HTTP/1.0."""
        data = text.encode("utf-8")
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self.wfile.write(data)
        self.wfile.flush()

    def do_list_clients(self):
        query = self._read_query(("target",))
        entries = self.server.sugar.registry.clients()
        if "target" in query:
            try:
                entries, _ = _select(entries, query["target"])
            except _BadField as exc:
                raise _HTTPProblem(400, "query %r: %s" % (
                    exc.field, exc.problem)) from None
            if not entries:
                raise _HTTPProblem(404, "target %r matches no registered "
                                   "client" % query["target"][:200])
        documents = [self._client_document(e) for e in entries]
        if self._wants_json():
            self._reply_json(200, {"clients": documents})
        else:
            self._reply(200, _clients_text(documents))

    def _client_document(self, entry):
        return {
            "id": entry["id"], "address": _address_of(entry),
            "username": entry["username"],
            "registered": entry["registered"],
            "last_seen": entry["last_seen"],
            "stale": self.server.sugar.is_stale(entry),
            "last_run": entry.get("last_run"),
            "hostkey": _hostkey_fingerprint(entry.get("hostkey")),
        }

    def _client(self, client_id):
        entry = self.server.sugar.registry.get(client_id.lower())
        if entry is None:
            raise _unknown_client(client_id)
        return entry

    def do_show_client(self, client_id):
        self._read_query(())
        document = self._client_document(self._client(client_id))
        if self._wants_json():
            self._reply_json(200, document)
        else:
            self._reply(200, "".join(
                "%s: %s\n" % (name, "none" if value is None and name ==
                               "hostkey" else _cell(value))
                for name, value in document.items()))

    def do_delete_client(self, client_id):
        entry = self.server.sugar.registry.remove(client_id.lower())
        self.server.sugar.forget(client_id.lower())
        if entry is None:
            raise _unknown_client(client_id)
        address = _address_of(entry)
        logger.info("%s: client %s removed", address, client_id)
        log = _log_path(self.server.sugar.log_dir, address)
        self._reply(200, "removed client %s at %s; %s" % (
            client_id, address, "its log stays in %s" % log
            if os.path.exists(log) else "it has no log"))

    def do_list_jobs(self):
        query = self._read_query(("limit",))
        limit = query.get("limit", "50")
        if not re.fullmatch(r"[0-9]{1,6}", limit) or \
                not 1 <= int(limit) <= 100000:
            raise _HTTPProblem(400, "query 'limit': %r is not a whole number "
                               "from 1 to 100000" % limit[:40])
        sugar = self.server.sugar
        # Only a running job has results newer than its kept record.
        records, jobs = [], []
        for record in sugar.jobs.recent(int(limit)):
            job = record["state"] == "running" and sugar.job(record["id"])
            records.append(job.snapshot() if job else record)
            jobs.append(job)
        summaries = [_job_summary(record) for record in records]
        if self._wants_json():
            self._reply_json(200, {"jobs": summaries})
            return
        lines = []
        for summary, record, job in zip(summaries, records, jobs):
            results = [Result.from_dict(c) for c in record["clients"]]
            if job and record["state"] == "running":
                counts = _counts(results)
                recap = "%d of %d clients done%s" % (
                    len(results), len(job.futures), counts and ": " + counts)
            else:
                recap = _recap(results).split("\n")[0]
            lines.append("%d  %s  %s  %s  %s\n" % (
                summary["id"], summary["state"], summary["started"], recap,
                _one_line(summary["command"])))
        self._reply(200, "".join(lines) or "no jobs yet\n")

    def do_show_job(self, job_id):
        self._read_query(())
        job = self._job(job_id)
        record = job.snapshot()
        results = [Result.from_dict(c) for c in record["clients"]]
        if self._wants_json():
            document = _run_document(job, results)
            document.update(_job_summary(record))
            self._reply_json(200, document)
            return
        head = "job %d: %s" % (job.id, record["state"])
        if record["state"] == "running":
            head += " (%d of %d clients done)" % (len(results),
                                                 len(job.futures))
        self._reply(200, "%s\ncommand: %s\ntarget: %s\nrequested by %s at "
                    "%s, ended %s\n%s" % (
                        head, record["command"], record["target"] or "all",
                        record["requester"], record["started"],
                        record["ended"] or ("not yet" if record["state"]
                                            == "running" else "unknown"),
                        _run_text(results) if results else ""))


_RUN_FIELDS = ("command", "timeout", "stream", "target", "stale", "async",
               "rerun", "only", "url", "sha256", "args", "script")


def _unknown_client(client_id):
    return _HTTPProblem(404, "no client %r; GET /clients lists them"
                        % client_id[:200])


def _command(form):
    command = _required(form, "command")
    if not command.strip():
        raise _HTTPProblem(400, "field 'command' is empty; send the shell "
                           "command to run")
    if "\0" in command:
        raise _HTTPProblem(400, "field 'command' holds a NUL byte, which no "
                           "shell command can carry; remove it")
    if "only" in form:
        raise _HTTPProblem(400, "field 'only' goes with 'rerun'; send "
                           "rerun=<job id> too")
    return command


def _idempotency_key(key):
    if key is not None and not re.fullmatch(r"[!-~]{1,255}", key):
        # http.server reads header bytes as Latin-1; curl sends UTF-8.
        shown = key[:40].encode("latin-1", "replace").decode(
            "utf-8", "replace")
        raise _HTTPProblem(400, "header 'Idempotency-Key': %r is not 1 to "
                           "255 visible ASCII characters" % shown)
    return key


def _cell(value):
    if isinstance(value, dict):
        return "%s (job %s) at %s" % (value["outcome"], value["job"],
                                      value["time"])
    if value is None:
        return "never"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _clients_text(documents):
    """A table of clients, a line each."""
    if not documents:
        return "no clients are registered\n"
    columns = ("id", "address", "username", "registered", "last_seen",
               "last_run")
    rows = [[name.upper().replace("_", " ") for name in columns]]
    for document in documents:
        row = [_cell(document[name]) for name in columns]
        if document["stale"]:
            row[4] += " (stale)"
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "".join("  ".join(cell.ljust(width) for cell, width in
                             zip(row, widths)).rstrip() + "\n"
                   for row in rows)


def _one_line(text, most=120):
    """*text*'s first line, at most *most* characters, marked if cut."""
    line = text.split("\n", 1)[0]
    if len(line) > most or line != text:
        return line[:most] + " ..."
    return line


def _job_summary(record):
    """A job record without its clients' outputs."""
    return {
        "id": record["id"], "state": record["state"],
        "requester": record["requester"], "command": record["command"],
        "target": record["target"], "timeout": record["timeout"],
        "rerun": record["rerun"], "started": record["started"],
        "ended": record["ended"], "authorised": record.get("authorised"),
        "script": record.get("script") and _Script.from_record(
            record["script"]).as_record(with_content=False),
        "totals": _totals([Result.from_dict(c) for c in record["clients"]]),
    }


def _required(form, name, what=None):
    """*form*'s field *name*; 400 if missing, saying *what* to send."""
    if name not in form:
        raise _HTTPProblem(400, "field %r is missing%s" % (
            name, what and "; send " + what or ""))
    return form[name]


def _seconds(form, name, most):
    """The optional number of seconds in *form*, or None when absent."""
    if name not in form:
        return None
    value = float(form[name]) if re.fullmatch(
        r"[0-9]{1,9}(\.[0-9]{1,9})?", form[name]) else -1.0
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


def _counts(results):
    """How many *results* ended with each status: ``2 ok, 1 failed``."""
    return ", ".join("%d %s" % (n, status)
                     for status, n in _totals(results).items()
                     if status != "clients")


def _recap(results):
    """Counts per status, then the clients of each (unless all are ok)."""
    lines = ["%d client%s: %s" % (len(results), "s"[len(results) == 1:],
                                  _counts(results))]
    summary = _summary(results)
    if list(summary) != ["ok"]:
        lines += ["%s: %s" % (status, ", ".join(addresses))
                  for status, addresses in summary.items()]
    return "\n".join(lines)


def _run_document(job, results):
    return {
        "job": job.id,
        "command": job.record["command"],
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

POST /register      id=<machine-id> [address=<host[:port]>] [username=<user>]
                    [hostkey=<type base64>] [token=<register token>]
POST /run           command=<shell command> [target=<globs>] [timeout=<s>]
                    [stream=1] [async=1] [stale=1]
POST /run           url=<script URL> [sha256=<hex>] [args=<arguments>] ...
POST /run           script=@<file> (multipart) [sha256=<hex>] [args=...] ...
POST /run           rerun=<job id> [only=failed]
                    header Idempotency-Key: <key> makes a /run safe to repeat
GET  /clients       [?target=<globs>]
GET  /clients/<id>  DELETE /clients/<id>
GET  /jobs          [?limit=<n>]
GET  /jobs/<id>

GET  /pubkey

  curl -d "address=client.fqdn&id=$(</etc/machine-id)" SERVER/register
  curl -u ":$TOKEN" -d "command=whoami" SERVER/run
"""


# ---------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------

class _HTTPServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer bound to the address family *host* needs, and
    speaking TLS when given an `ssl.SSLContext`.
    """

    request_queue_size = 1024

    def __init__(self, host, port, sugar, tls=None):
        self.sugar = sugar
        self.tls = tls
        self.address_family, bind_host = _family(host)
        super().__init__((bind_host, port), _Handler)

    def get_request(self):
        connection, address = super().get_request()
        if self.tls:
            # The handshake happens in the request's own thread.
            connection = self.tls.wrap_socket(
                connection, server_side=True, do_handshake_on_connect=False)
        return connection, address

    def handle_error(self, request, client_address):
        kind = sys.exc_info()[0]
        if issubclass(kind, (ssl.SSLError, ConnectionError, TimeoutError)):
            logger.debug("%s connection failed", client_address[0],
                         exc_info=True)
        else:
            logger.exception("%s request failed", client_address[0])

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY,
                                   0)
        super().server_bind()


def _tls_context(cert, key):
    """A server-side TLS context with the standard library's defaults."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def _load_token(path):
    """The API token kept in *path*, made (owner-only) if there is none."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                             0o600)
    except FileExistsError:
        with open(path, encoding="utf-8") as kept:
            return kept.read().strip()
    token = secrets.token_urlsafe(32)
    with os.fdopen(descriptor, "w", encoding="utf-8") as made:
        made.write(token + "\n")
    logger.info("made a new API token in %s", path)
    return token


def _make_private_folder(path):
    """Create *path* for the owner only, if it does not exist yet."""
    os.makedirs(path, mode=0o700, exist_ok=True)


def _family(host):
    """The socket family and bind address for *host* ('' is every one)."""
    if not host:
        return (socket.AF_INET6, "::") if socket.has_ipv6 else (
            socket.AF_INET, "0.0.0.0")
    info = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM,
                              flags=socket.AI_PASSIVE)
    return info[0][0], info[0][4][0]


class Server:
    """The Sugar server: a registry, a job store, an HTTP API and a pool of
    SSH workers.

    Binds at once (so a taken port fails here); `serve` answers requests
    until `shutdown` is called from another thread.  At most *workers* SSH
    sessions are open at once, over all runs together.  *stale*, in
    seconds, makes runs skip clients not registered again for that long.

    Example, with three clients of which one is down::

        server = Server(workers=8, port=9999)
        for result in server.run("uptime"):
            print(result.address, result.outcome)
        # 10.0.0.5  exit code 0
        # 10.0.0.6  unreachable: connection refused by 10.0.0.6 port 22 ...
        # 10.0.0.7  exit code 0
    """

    def __init__(self, workers=DEFAULT_WORKERS, port=DEFAULT_PORT, *,
                 host="", registry=DEFAULT_REGISTRY, jobs=DEFAULT_JOBS,
                 log_dir=".", connect_timeout=DEFAULT_CONNECT_TIMEOUT,
                 command_timeout=DEFAULT_COMMAND_TIMEOUT,
                 max_output=DEFAULT_MAX_OUTPUT, keep_jobs=DEFAULT_KEEP_JOBS,
                 stale=None, ssh_key=None, token=None, register_token=None,
                 tls_cert=None, tls_key=None,
                 request_timeout=DEFAULT_REQUEST_TIMEOUT,
                 grace=DEFAULT_GRACE, log_max_bytes=DEFAULT_LOG_MAX_BYTES,
                 log_backups=DEFAULT_LOG_BACKUPS,
                 max_script=DEFAULT_MAX_SCRIPT, require_sha256=False,
                 pool=True, idle_close=DEFAULT_IDLE_CLOSE):
        self.workers = _fit_workers(workers)
        self.width = max(self.workers, min(WARM_WIDTH, _room_for_sessions()))
        self.max_script = max_script
        self.require_sha256 = require_sha256
        self.log_dir = log_dir
        self.stale = stale
        self.ssh_key = ssh_key
        self.register_token = register_token
        self.request_timeout = request_timeout
        _make_private_folder(log_dir)
        self.registry = _Registry(registry)
        try:
            self.jobs = _JobStore(jobs, keep_jobs)
        except BaseException:
            self.registry.close()
            raise
        # A crash left these jobs' ends unrecorded in the registry.
        for record in self.jobs.cut_short:
            self.registry.note_runs(record["id"], [
                Result.from_dict(client) for client in record["clients"]])
        self.pool = None if not pool else _Pool(idle_close, max(
            self.workers, _room_for_connections(self.width)))
        self._client_options = {
            "pool": self.pool,
            "handshakes": threading.BoundedSemaphore(self.workers),
            "log_dir": log_dir, "connect_timeout": connect_timeout,
            "command_timeout": command_timeout, "max_output": max_output,
            "ssh_key": ssh_key, "on_new_hostkey": self._pin,
            "log_rotation": (log_max_bytes, log_backups),
        }
        self.grace = grace
        self._running = {}
        self._active = set()
        self._stopping = False
        self._hurry = threading.Event()
        self._starting = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self.width, thread_name_prefix="sugar-ssh")
        try:
            self._http = _HTTPServer(host, port, self, _tls_context(
                tls_cert, tls_key) if tls_cert else None)
        except BaseException:
            self._pool.shutdown()
            self.registry.close()
            self.jobs.close()
            raise
        self.token_file = None
        if token is None:
            self.token_file = os.path.join(
                os.path.dirname(os.path.abspath(registry)), TOKEN_FILE)
            token = _load_token(self.token_file)
        self.token = token
        if self.public_key() is None:
            logger.warning("no SSH key to log in with: set SSH_KEY, or "
                           "create one with ssh-keygen -t ed25519")

    @property
    def address(self):
        """``(host, port)`` the server listens on."""
        return self._http.server_address[:2]

    def run(self, command, timeout=None, target=None):
        """Run *command* on the registered clients; return the Results.

        Clients are taken in a sliding window of at most ``workers`` at
        once; the list is in registry order (by address) and has one Result
        per client, whatever happened to the others.  *timeout* bounds the
        command on each client (default: the server's command timeout);
        *target* picks clients as ``/run`` does.  The run is kept as a job.
        """
        job = self.start_job(command, timeout=timeout, target=target)
        job.done.wait()
        return job.results()

    def start_job(self, command, *, timeout=None, target=None, ids=None,
                  include_stale=False, requester=None, key=None,
                  fingerprint=None, rerun=None, script=None):
        """Start a run as a job and return it (a `_Job`) at once.

        With *script* (a `_Script`), that script runs instead of *command*.
        *ids*, when given, limits the run to those client ids.  Raises
        _Refused when the target matches no client.  With *key*, a job
        started with the same key in the last day is returned instead,
        if it had the same *fingerprint* (else _Refused).
        """
        with self._starting:
            if key:
                earlier = self._job_for_key(key, fingerprint)
                if earlier:
                    return earlier
            entries = self._chosen(target, ids, include_stale)
            if script is not None:
                command = script.describe()
            record = {
                "id": self.jobs.new_id(), "requester": requester,
                "command": command, "target": target, "timeout": timeout
                or self._client_options["command_timeout"],
                "started": _timestamp(), "ended": None, "state": "running",
                "clients": [], "key": key, "fingerprint": fingerprint,
                "rerun": rerun, "authorised": True,
                "script": script and script.as_record(),
            }
            job = _Job(record, self._finished)
            self._running[job.id] = job
            record["targets"] = [entry["id"] for entry, _ in entries]
            clients = [Client.from_entry(entry, **self._client_options)
                       for entry, _ in entries]
            # Stored as if cut short, so that after a crash the job still
            # lists its clients and a rerun finds them.
            self.jobs.save(dict(record, clients=[
                _interrupted(client, command, "the server stopped before the "
                             "result was known").as_dict()
                for client in clients]))
            logger.info("job %d: %s (authorised) runs %r on %d client%s",
                        job.id, requester, command, len(entries),
                        "s"[len(entries) == 1:])
            job.start([self._submit(client, entry, stale, record, script)
                       for client, (entry, stale) in zip(clients, entries)])
        return job

    def _job_for_key(self, key, fingerprint):
        found = self.jobs.by_key(key)
        running = [job for job in self._running.values()
                   if job.record["key"] == key]
        if running:
            found = running[0].id, running[0].record["fingerprint"]
        if not found:
            return None
        job_id, earlier = found
        if earlier != fingerprint:
            raise _Refused(422, (
                "Idempotency-Key %r was used for another request (job %d); "
                "use a new key for a new request" % (key, job_id)))
        job = copy.copy(self.job(job_id))
        job.replayed = True
        return job

    def _chosen(self, target, ids, include_stale):
        """``[(entry, is skipped as stale)]`` for a run; may raise."""
        entries = self.registry.clients()
        if ids is not None:
            chosen = [e for e in entries if e["id"] in ids]
            named = list(ids)
        else:
            chosen, named = _select(entries, target)
        if not chosen and (target or ids is not None):
            raise _Refused(404, "target %r matches no registered client; "
                           "nothing ran (GET /clients lists them)"
                           % (target or ",".join(ids))[:200])
        return [(entry, not include_stale and entry["id"] not in named
                 and self.is_stale(entry)) for entry in chosen]

    def is_stale(self, entry):
        """True if *entry* was last seen longer ago than `stale` allows."""
        return bool(self.stale) and _age(entry["last_seen"]) > self.stale

    def _submit(self, client, entry, stale, record, script):
        if stale:
            future = concurrent.futures.Future()
            future.set_result(_stale_result(client, record["command"],
                                            entry, self.stale))
        else:
            future = self._pool.submit(self._run_tracked, client,
                                       record["command"], record["timeout"],
                                       script)
        future.address = client.address
        future.client = client
        return future

    def public_key(self):
        """The public key line of the server's SSH key, or None;
        _KeyUnusable if SSH_KEY names a key that cannot be read now.
        """
        if self.ssh_key:
            candidates = [self.ssh_key + ".pub"]
        else:
            candidates = [os.path.expanduser("~/.ssh/id_%s.pub" % kind)
                          for kind in ("ed25519", "ecdsa", "rsa")]
        for path in candidates:
            try:
                with open(path, encoding="utf-8") as public:
                    return public.read().strip()
            except OSError:
                pass
        if self.ssh_key:
            key = _private_key(self.ssh_key)
            return "%s %s sugar" % (key.get_name(), key.get_base64())
        return None

    def _run_tracked(self, client, command, timeout, script):
        self._active.add(client)
        if self._stopping:
            client.stop()
        try:
            return _run_safely(client, command, timeout, script)
        finally:
            self._active.discard(client)

    def forget(self, client_id):
        """Close the kept connection of *client_id*, whose entry changed."""
        if self.pool:
            self.pool.drop(client_id)

    def _pin(self, client, hostkey):
        self.registry.pin(client.id, hostkey)

    def _finished(self, job):
        self.jobs.save(job.record)
        self.registry.note_runs(job.id, job.results())
        self._running.pop(job.id, None)
        logger.info("job %d: finished: %s", job.id,
                    _recap(job.results()).split("\n")[0])

    def job(self, job_id):
        """The `_Job` of *job_id*, running or kept, or None."""
        job = self._running.get(job_id)
        if job is None:
            record = self.jobs.get(job_id)
            job = record and _Job.from_record(record)
        return job

    def serve(self):
        """Answer requests until `shutdown`, or an exception such as
        KeyboardInterrupt; then `close`.
        """
        try:
            self._http.serve_forever()
        finally:
            self.close()

    def shutdown(self):
        """Make `serve` return; call it from another thread."""
        self._http.shutdown()

    def hurry(self):
        """Cut short the grace period of a `close` under way."""
        self._hurry.set()

    def close(self, grace=None):
        """Stop: no new requests; running jobs get *grace* seconds (default
        `grace`) to finish, then their commands are stopped and recorded as
        interrupted; then every connection and store is closed.
        """
        self._http.server_close()
        deadline = time.monotonic() + (self.grace if grace is None
                                       else grace)
        while self._running and not self._hurry.is_set() and \
                time.monotonic() < deadline:
            self._hurry.wait(0.1)
        if self._running:
            logger.warning("stopping %d running job%s", len(self._running),
                           "s"[len(self._running) == 1:])
        self._stopping = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        for client in list(self._active):
            client.stop()
        for job in list(self._running.values()):
            job.done.wait(10)
        self._pool.shutdown(wait=True)
        if self.pool:
            self.pool.close()
        self.registry.close()
        self.jobs.close()


def _file_limit():
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 10 ** 6 if limit == resource.RLIM_INFINITY else limit


def _room_for_sessions():
    """How many SSH sessions the open-file limit allows at once."""
    return max(1, (_file_limit() - FILES_BESIDES_SESSIONS)
               // FILES_PER_SESSION)


def _room_for_connections(sessions):
    """How many idle connections fit beside *sessions* running ones."""
    return _file_limit() - FILES_BESIDES_SESSIONS - \
        sessions * FILES_PER_SESSION


def _fit_workers(workers):
    """*workers*, lowered (with a warning) to what the open-file limit
    allows: each SSH session holds a few descriptors at once.
    """
    limit, fitting = _file_limit(), _room_for_sessions()
    if workers > fitting:
        logger.warning(
            "WORKERS=%d needs about %d open files but the limit is %d; "
            "using %d workers: raise the limit (ulimit -n) for more",
            workers, workers * FILES_PER_SESSION + FILES_BESIDES_SESSIONS,
            limit, fitting)
        return fitting
    return workers


def _run_safely(client, command, timeout, script=None):
    """`Client.run_command`, with a fault in Sugar kept to that client."""
    try:
        return client.run_command(command, timeout, script)
    except Exception as exc:
        logger.exception("%s: running %r failed inside Sugar",
                         client.address, command)
        result = Result(client, command)
        result.error = "internal error in Sugar: %s" % exc
        return result


def _stale_result(client, command, entry, stale):
    result = Result(client, command)
    result.status = "stale"
    result.error = ("not seen for %ds (STALE is %gs), so not tried; name it "
                    "in target or send stale=1" % (_age(entry["last_seen"]),
                                                   stale))
    return result


# ---------------------------------------------------------------------------
# Settings from the environment (used by the launcher)
# ---------------------------------------------------------------------------

class SettingError(Exception):
    """A setting Sugar cannot start with; the message is one line."""


def _number(environ, name, default, kind, low, high, unit=""):
    raw = environ.get(name, "")
    if raw == "":
        return default
    pattern = r"[0-9]+" if kind is int else r"[0-9]+(\.[0-9]+)?"
    value = kind(raw) if re.fullmatch(pattern, raw, re.ASCII) else None
    if value is None or not low <= value <= high:
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
        "jobs": environ.get("JOBS", "") or DEFAULT_JOBS,
        "keep_jobs": _number(environ, "KEEP_JOBS", DEFAULT_KEEP_JOBS, int,
                             1, 10 ** 6),
        "stale": _number(environ, "STALE", None, float, 1, 10 ** 9,
                         " seconds"),
        "log_dir": environ.get("LOG_DIR", "") or ".",
        "ssh_key": environ.get("SSH_KEY", "") or None,
        "token": environ.get("TOKEN", "") or None,
        "register_token": environ.get("REGISTER_TOKEN", "") or None,
        "tls_cert": environ.get("TLS_CERT", "") or None,
        "tls_key": environ.get("TLS_KEY", "") or None,
        "request_timeout": _number(environ, "REQUEST_TIMEOUT",
                                   DEFAULT_REQUEST_TIMEOUT, float, 1, 3600,
                                   " seconds"),
        "grace": _number(environ, "GRACE", DEFAULT_GRACE, float, 0, 86400,
                         " seconds"),
        "log_max_bytes": _number(environ, "LOG_MAX_BYTES",
                                 DEFAULT_LOG_MAX_BYTES, int, 1024,
                                 1024 ** 4, " bytes"),
        "log_backups": _number(environ, "LOG_BACKUPS", DEFAULT_LOG_BACKUPS,
                               int, 1, 1000),
        "max_script": _number(environ, "MAX_SCRIPT", DEFAULT_MAX_SCRIPT,
                              int, 1, 64 * 1024 ** 2, " bytes"),
        "require_sha256": _number(environ, "REQUIRE_SHA256", 0, int, 0,
                                  1) == 1,
        "pool": _number(environ, "POOL", 1, int, 0, 1) == 1,
        "idle_close": _number(environ, "IDLE_CLOSE", DEFAULT_IDLE_CLOSE,
                              float, 0.1, 86400, " seconds"),
    }
    _check_tls(settings["tls_cert"], settings["tls_key"])
    if settings["host"]:
        try:
            _check_host(settings["host"], "HOST")
        except _BadField:
            raise SettingError("HOST=%r is not allowed; use an IP address "
                               "or host name of this machine, or leave it "
                               "unset for all" % settings["host"]) from None
    _check_log_dir(settings["log_dir"])
    _check_registry(settings["registry"], "REGISTRY")
    _check_registry(settings["jobs"], "JOBS")
    if os.path.abspath(settings["registry"]) == os.path.abspath(
            settings["jobs"]):
        raise SettingError("REGISTRY and JOBS name the same file %r; give "
                           "each its own" % settings["jobs"])
    if settings["token"] is not None and not re.fullmatch(
            r"[!-~]{16,256}", settings["token"]):
        raise SettingError("TOKEN is not allowed; use 16 to 256 visible "
                           "ASCII characters (its value is not shown)")
    if settings["ssh_key"]:
        _check_ssh_key(settings["ssh_key"])
    return settings


def _check_ssh_key(path):
    if not os.access(path, os.R_OK) or os.path.isdir(path):
        raise SettingError("SSH_KEY=%r cannot be read; name a private key "
                           "file this user can read" % path)
    try:
        paramiko.PKey.from_path(path)
    except (paramiko.SSHException, ValueError, OSError, TypeError) as exc:
        raise SettingError("SSH_KEY=%r is not a private key Sugar can use "
                           "(%s); name an unencrypted private key, such as "
                           "~/.ssh/id_ed25519" % (path, exc)) from None


def _check_tls(cert, key):
    if bool(cert) != bool(key):
        raise SettingError("TLS_CERT and TLS_KEY go together; set both (PEM "
                           "files) for HTTPS, or neither")
    if not cert:
        return
    for name, path in (("TLS_CERT", cert), ("TLS_KEY", key)):
        if not os.access(path, os.R_OK):
            raise SettingError("%s=%r cannot be read; name a PEM file this "
                               "user can read" % (name, path))
    try:
        _tls_context(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise SettingError("TLS_CERT=%r and TLS_KEY=%r do not make a "
                           "certificate and its key: %s"
                           % (cert, key, exc)) from None


def _check_log_dir(path):
    if os.path.exists(path) and not os.path.isdir(path):
        raise SettingError("LOG_DIR=%r is not a folder; name a folder, or "
                           "a path where one can be made" % path)
    try:
        _make_private_folder(path)
    except OSError as exc:
        raise SettingError("LOG_DIR=%r cannot be created: %s"
                           % (path, exc.strerror)) from None
    try:
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        raise SettingError("LOG_DIR=%r is not writable; choose a folder "
                           "this user can write" % path) from None


def _check_registry(path, name):
    folder = os.path.dirname(os.path.abspath(path))
    if path.endswith("/") or os.path.isdir(path):
        raise SettingError("%s=%r is a folder; name a file in it, such as "
                           "%s" % (name, path, os.path.join(
                               path, "sugar-" + name.lower())))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise SettingError("%s=%r: folder %r does not exist or is not "
                           "writable" % (name, path, folder))


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
