"""Persistent spend and audit log in SQLite.

* ``spend``: one row per settled call (append-only). Budget windows are sums over it, so a
  restart, or a process killed with SIGKILL, keeps every settled cent: a settlement returns only
  after its row is committed (WAL journal; a committed transaction survives the death of the
  process). Several processes on one host append to the same file; each one tails the rows the
  others wrote about once a second and adds them to its own counters.
* ``audit``: every budget change (set, reset, configuration reload) with time, host, process,
  OS user, old and new values.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import _fork
from ._budget import KINDS, RUN, SpendRow, dim_keys
from .errors import ConfigError

logger = logging.getLogger("hive_ratelimit_plugin")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spend (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    writer TEXT NOT NULL,
    call_id TEXT,
    provider TEXT, model TEXT, agent TEXT, user TEXT, team TEXT, run TEXT,
    requests INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS spend_ts ON spend(ts);
CREATE INDEX IF NOT EXISTS spend_run ON spend(agent, run);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    host TEXT, pid INTEGER, os_user TEXT,
    action TEXT NOT NULL, scope TEXT, old TEXT, new TEXT
);
CREATE TABLE IF NOT EXISTS resets (
    scope TEXT PRIMARY KEY,
    ts REAL NOT NULL
);
"""


def default_state_path() -> Path:
    """``$XDG_STATE_HOME/hive-ratelimit/state.sqlite`` (``~/.local/state/...`` by default)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "hive-ratelimit" / "state.sqlite"


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


_INT64 = 2**63 - 1
_INSERT = ("INSERT INTO spend (ts, writer, call_id, provider, model, agent, user, team, run, requests,"
           " input_tokens, output_tokens, cost) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)")


def _row(writer: str, r: SpendRow) -> tuple[Any, ...]:
    """A spend row as SQLite takes it (an id given as another type, a count past 64 bits: a row
    the file refused would be lost)."""
    def count(v: Any) -> int:
        return min(max(int(v or 0), 0), _INT64)

    def text(v: Any) -> str | None:
        return None if v is None else str(v)

    return (float(r.ts), writer, text(r.call_id), text(r.provider), text(r.model), text(r.agent), text(r.user),
            text(r.team), text(r.run), count(r.requests), count(r.input_tokens), count(r.output_tokens),
            float(r.cost))


def _insert(conn: sqlite3.Connection, rows: list[tuple[Any, ...]], wait: float) -> None:
    """Append ``rows`` in one transaction, waiting at most ``wait`` seconds for the write lock
    (the connection's usual wait is :data:`RECORD_WAIT`); nothing is written if it fails."""
    if wait != RECORD_WAIT:
        conn.execute(f"PRAGMA busy_timeout = {int(wait * 1000)}")
    try:
        conn.execute("BEGIN IMMEDIATE")
    finally:
        if wait != RECORD_WAIT:
            conn.execute(f"PRAGMA busy_timeout = {int(RECORD_WAIT * 1000)}")
    try:
        conn.executemany(_INSERT, rows)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _write_unsaved(conn: sqlite3.Connection, rows: list[tuple[Any, ...]], path: str) -> None:
    """A ledger's last write (see ``Ledger._finalizer``): the rows it still held."""
    if not rows:
        return
    try:
        _insert(conn, rows, 5.0)
        rows.clear()
    except Exception as exc:
        logger.error("hive-ratelimit: %d settled call(s) could not be written to %s (%s): their spend is lost to "
                     "other processes and the next start", len(rows), path, exc)


def unusable(path: str, exc: BaseException | str) -> ConfigError:
    """The error for a state file that cannot be opened or read."""
    return ConfigError(f"rate_limiting.state_path: cannot use {path!r} as the state file (an SQLite "
                       f"database): {exc}", errors=[f"rate_limiting.state_path: {exc}"])


@contextlib.contextmanager
def read_ledger(path: str) -> Iterator[Ledger]:
    """The state file at ``path`` opened to read (``hive-ratelimit audit`` and ``status``): nothing
    is written to it, and an error reading it (a newer schema, a damaged file) is a
    :class:`ConfigError` naming the file."""
    ledger = Ledger(path, read_only=True)
    try:
        yield ledger
    except sqlite3.Error as exc:
        hint = " (written by another version of hive-ratelimit?)" if "no such column" in str(exc) else ""
        raise unusable(ledger.path, f"{exc}{hint}") from None
    finally:
        ledger.close()


#: Seconds a settlement waits for the state file's write lock before keeping its rows for later.
RECORD_WAIT = 0.25
#: Settled calls kept in memory while the state file cannot be written (~430 bytes each: ~43 MB at most).
MAX_UNSAVED = 100_000


def _create_private(path: str) -> None:
    """Create the state file readable by its owner only (it holds every agent's, user's and team's
    spend and the audit trail of budget changes, with OS user names and hosts), as SQLite then
    creates its -wal and -shm files. A file that exists keeps its permissions (shared on purpose)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError:
        pass  # (it exists, or cannot be made: SQLite says why)


class Ledger:
    """The SQLite file behind budgets. Thread-safe; one connection per instance."""

    def __init__(self, path: str | os.PathLike[str] | None, *, read_only: bool = False) -> None:
        """Open (and create) the state file; ``read_only``: an existing one, to read only (see
        :func:`read_ledger`)."""
        if path is None:
            path = default_state_path()
        self.path = os.path.expanduser(str(path))
        if self.path != ":memory:" and not read_only:
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"rate_limiting.state_path: cannot create the directory of {self.path!r}: {exc}",
                                  errors=[f"rate_limiting.state_path: {exc}"]) from None
            _create_private(self.path)
        self._lock = threading.Lock()
        try:
            self._conn = self._connect_read_only() if read_only else self._connect()
            self.writer = uuid.uuid4().hex
            self._last_seen = self._max_id()
        except (sqlite3.Error, OSError) as exc:  # a directory, not a database, no permission
            raise unusable(self.path, exc) from None
        self.host = socket.gethostname()
        self._inherited: list[sqlite3.Connection] = []
        self._unsaved: list[tuple[Any, ...]] = []  # rows a write could not store, to retry (changed in place)
        self.dropped = 0  # rows given up: past MAX_UNSAVED, or refused by the file
        self._last_write = self._finalizer()
        _fork.track(self)

    def _finalizer(self) -> Any:  # (a weakref.finalize)
        # A ledger dropped with rows still unsaved (its limiter replaced, then collected) writes
        # them when collected, or at exit: without its limiter, nothing else would.
        return weakref.finalize(self, _write_unsaved, self._conn, self._unsaved, self.path)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        conn.execute(f"PRAGMA busy_timeout = {int(RECORD_WAIT * 1000)}")  # (see record; _patient for the rest)
        return conn

    def _connect_read_only(self) -> sqlite3.Connection:
        """A connection that writes nothing to the file: no schema (a file without our tables is
        an error, not one to add them to), no journal mode. Read-write first: a read-only
        connection leaves its ``-wal`` and ``-shm`` behind (owned by whoever ran it, which the
        limiter's user may then be unable to open). Where the file or its directory cannot be
        written (another user's, a read-only mount): read-only, which works while a process has
        the file open; else as an immutable file (nothing is writing it)."""
        if self.path == ":memory:":
            return self._connect()
        uri = Path(self.path).absolute().as_uri()
        first: sqlite3.OperationalError | None = None
        for mode in ("?mode=rw", "?mode=ro", "?mode=ro&immutable=1"):
            conn = sqlite3.connect(uri + mode, uri=True, check_same_thread=False, isolation_level=None, timeout=10.0)
            try:
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            except sqlite3.OperationalError as exc:
                conn.close()
                text = str(exc).lower()
                if "readonly" not in text and "unable to open" not in text:
                    raise
                first = first or exc
                continue
            missing = sorted({"spend", "audit", "resets"} - tables)
            if missing:
                conn.close()
                raise sqlite3.DatabaseError(f"not a hive-ratelimit state file (no table {', '.join(missing)})")
            return conn
        assert first is not None
        raise first

    @contextlib.contextmanager
    def _patient(self) -> Iterator[sqlite3.Connection]:
        """The connection, waiting up to 10 s for a lock (budget changes, loading, pruning: rare,
        and not on a call's path), under the instance lock."""
        with self._lock:
            self._conn.execute("PRAGMA busy_timeout = 10000")
            try:
                yield self._conn
            finally:
                self._conn.execute(f"PRAGMA busy_timeout = {int(RECORD_WAIT * 1000)}")

    def _after_fork_in_child(self) -> None:
        """In a forked child (see :mod:`._fork`): a connection of its own (SQLite's must not be
        used on both sides of a fork) and a writer id of its own, so that the parent and the child
        each read the other's spend as another process'. The parent's connection is kept, unused
        and unclosed: closing it here could release locks that are the parent's."""
        self._lock = threading.Lock()
        self._last_write.detach()  # (the parent writes its own rows; a copy here would write them twice)
        self._unsaved = []
        if self.path == ":memory:":
            self._last_write = self._finalizer()
            return  # a copy of its own already, the parent's rows included
        self._inherited.append(self._conn)
        self.writer = uuid.uuid4().hex
        try:
            self._conn = self._connect()
        except (sqlite3.Error, OSError) as exc:  # (out of file descriptors, say)
            logger.error("hive-ratelimit: a forked process cannot open the state file %s (%s); its spend is "
                         "counted in this process only, not recorded there", self.path, exc)
            self._conn = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
            self._conn.executescript(_SCHEMA)
        self._last_write = self._finalizer()

    def _max_id(self) -> int:
        row = self._conn.execute("SELECT COALESCE(MAX(id), 0) FROM spend").fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            self._last_write()  # (the rows still unsaved, if any: a last try)
            self._conn.close()

    # ---------------------------------------------------------------- spend
    def record(self, rows: list[SpendRow], wait: float = RECORD_WAIT) -> None:
        """Append settled calls, with any an earlier write could not store, in one transaction.

        Waits at most ``wait`` seconds for the file's write lock (this runs on the path of the
        call being settled: another process holding the lock must not stall an agent). When the
        write fails for the file as a whole (locked by another process, busy, a full disk, a file
        turned read-only, an I/O error) the rows are kept, in memory, for the next write (or
        :meth:`flush` at exit), and the error is raised to be logged; past :data:`MAX_UNSAVED`
        rows the oldest are given up. A row the file will not take (any other SQLite error) is
        given up, the others written, and the error raised: kept, it would block every later write.
        """
        data = [_row(self.writer, r) for r in rows]
        with self._lock:
            if self._unsaved:
                data = self._unsaved + data
                self._unsaved.clear()
            if not data:
                return
            conn = self._conn
            try:
                _insert(conn, data, wait)
            except sqlite3.OperationalError:
                # The file refused the write (locked by another process, busy, full, read-only,
                # an I/O error), not a row: keep the rows for the next write.
                self.dropped += max(len(data) - MAX_UNSAVED, 0)
                self._unsaved[:] = data[-MAX_UNSAVED:]
                raise
            except sqlite3.Error:
                # A row this file will not take: write the others one by one; the bad one is not
                # kept (it would block every later write). The caller logs the error.
                bad = 0
                for one in data:
                    try:
                        conn.execute(_INSERT, one)
                    except sqlite3.Error:
                        bad += 1
                self.dropped += bad
                raise

    @property
    def unsaved(self) -> int:
        """Settled calls waiting to be written (an earlier write failed)."""
        return len(self._unsaved)

    def flush(self, wait: float = 5.0) -> None:
        """Write what earlier writes could not (at exit: waiting longer for the lock is fine)."""
        if self._unsaved:
            self.record([], wait=wait)

    def tail(self) -> list[SpendRow]:
        """Rows other writers (processes) appended since the last call."""
        with self._lock:
            cur = self._conn.execute(
                "SELECT id, ts, call_id, provider, model, agent, user, team, run, requests, input_tokens,"
                " output_tokens, cost FROM spend WHERE id > ? AND writer != ? ORDER BY id",
                (self._last_seen, self.writer),
            )
            out = []
            last = self._last_seen
            for row in cur.fetchall():
                last = max(last, row[0])
                out.append(SpendRow(row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9],
                                    row[10], row[11], row[12]))
            self._last_seen = max(last, self._last_seen)
            return out

    def load(self, starts: dict[str, float]) -> list[tuple[str, str, float, float, int, int]]:
        """Aggregate spend per scope key for the current windows.

        Returns:
            ``(scope key, kind, window start, cost, requests, tokens)`` tuples.
        """
        out: list[tuple[str, str, float, float, int, int]] = []
        with self._patient() as conn:
            resets = dict(conn.execute("SELECT scope, ts FROM resets").fetchall())
            self._last_seen = self._max_id()
            oldest = min(starts[k] for k in KINDS)
            rows = conn.execute(
                "SELECT ts, provider, model, agent, user, team, run, requests, input_tokens + output_tokens, cost"
                " FROM spend WHERE ts >= ? OR (run IS NOT NULL AND ts >= ?)",
                (oldest, oldest - 31 * 86400),
            ).fetchall()
        sums: dict[tuple[str, str], list[float]] = {}
        for ts, provider, model, agent, user, team, run, requests, tokens, cost in rows:
            for key in dim_keys(provider, model, agent, user, team, run):
                kinds = (RUN,) if key.startswith("run:") else KINDS
                for kind in kinds:
                    start = starts[kind]
                    if ts < start or ts < resets.get(key, 0.0):
                        continue
                    acc = sums.setdefault((key, kind), [0.0, 0, 0])
                    acc[0] += cost
                    acc[1] += requests
                    acc[2] += tokens
        for (key, kind), (cost, requests, tokens) in sums.items():
            out.append((key, kind, starts[kind], cost, int(requests), int(tokens)))
        return out

    def mark_reset(self, scope: str, ts: float) -> None:
        """Spend of ``scope`` before ``ts`` no longer counts toward its budgets."""
        with self._patient() as conn:
            conn.execute("INSERT OR REPLACE INTO resets (scope, ts) VALUES (?, ?)", (scope, ts))

    def prune(self, before: float) -> int:
        """Delete spend rows older than ``before`` (they are outside every window)."""
        with self._patient() as conn:
            cur = conn.execute("DELETE FROM spend WHERE ts < ?", (before,))
            return cur.rowcount

    # ---------------------------------------------------------------- audit
    def audit(self, action: str, scope: str, old: Any, new: Any) -> None:
        """Record a budget change."""
        with self._patient() as conn:
            conn.execute(
                "INSERT INTO audit (ts, host, pid, os_user, action, scope, old, new) VALUES (?,?,?,?,?,?,?,?)",
                (time.time(), self.host, os.getpid(), _os_user(), action, scope,
                 json.dumps(old, sort_keys=True, default=str), json.dumps(new, sort_keys=True, default=str)),
            )

    def audit_rows(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The audit log, oldest first."""
        with self._lock:
            q = "SELECT ts, host, pid, os_user, action, scope, old, new FROM audit ORDER BY id"
            rows = self._conn.execute(q).fetchall()
        if limit is not None:
            rows = rows[-limit:]
        keys = ("ts", "host", "pid", "user", "action", "scope", "old", "new")
        return [dict(zip(keys, r, strict=True)) for r in rows]
