"""Live status of running limiters: snapshots, sources, and the text dashboard.

* Each process with a registered :class:`~hive_ratelimit_plugin.HiveLimiter` (memory backend)
  publishes a JSON snapshot of its state about once a second to ``status/<pid>.json`` next to
  its state file (``rate_limiting.state_path``, default
  ``$XDG_STATE_HOME/hive-ratelimit/state.sqlite``). A daemon thread writes it (temp file +
  rename, so readers never see half a file); the file is removed at exit. Turn it off with
  ``status: {enabled: false}``.
* A :class:`StatusSource` turns what is published into one *dashboard state* dict:
  :class:`ProcessStatusSource` reads the snapshot files (ignoring those of dead processes and
  old ones), :class:`LedgerStatusSource` the persisted budgets of the SQLite ledger when nothing
  runs. Another backend (Redis) adds its own source.
* :func:`render_dashboard` draws a dashboard state as text; it is a pure function of the dict.

This module imports neither LiteLLM nor the plugin, so ``hive-ratelimit status`` starts fast.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import logging
import math
import os
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from . import _fork

__all__ = [
    "LedgerStatusSource",
    "ProcessStatusSource",
    "RedisStatusSource",
    "StatusSource",
    "merge_snapshots",
    "read_status",
    "render_dashboard",
    "status_dir",
]

logger = logging.getLogger("hive_ratelimit_plugin")

SNAPSHOT_VERSION = 1
DEFAULT_MAX_AGE = 10.0
LEVELS = ("global", "provider", "model", "key", "agent", "user", "team", "run")
DEFAULT_LEVELS = ("global", "provider", "model")
BAR_WIDTH = 20
SNAPSHOT_CHUNK = 256  # scopes read per hold of the engine's lock while publishing
MAX_DUTY = 0.02  # publishing may take at most this share of the publisher's time (interval stretches)


# ---------------------------------------------------------------------------- where
def status_dir(state_path: str | os.PathLike[str] | None) -> Path:
    """The directory snapshots go to: ``status/`` next to the state file."""
    from ._ledger import default_state_path

    path = str(state_path) if state_path is not None else ""
    base = default_state_path() if not path or path == ":memory:" else Path(os.path.expanduser(path))
    return base.parent / "status"


# -------------------------------------------------------------------------- sources
class StatusSource(Protocol):
    """Where ``hive-ratelimit status`` gets its state from."""

    def read(self) -> dict[str, Any]:
        """A dashboard state (see docs/monitoring.md); ``processes`` is empty when nothing runs."""
        ...


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except OSError:
        return False
    return True


class ProcessStatusSource:
    """Reads the snapshots running processes publish into ``directory``.

    A file is ignored when it is older than ``max_age`` seconds, or when it comes from this host
    and its process is gone (killed before it could remove it), or when it cannot be parsed.
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_age: float = DEFAULT_MAX_AGE,
                 now: Callable[[], float] = time.time, pid_alive: Callable[[int], bool] = _pid_alive) -> None:
        self.directory = Path(directory)
        self.max_age = max_age
        self.now = now
        self.pid_alive = pid_alive

    def snapshots(self) -> list[dict[str, Any]]:
        """The fresh, parseable snapshot files of live processes."""
        out: list[dict[str, Any]] = []
        try:
            entries = sorted(self.directory.glob("*.json"))
        except OSError:
            return out
        now = self.now()
        host = socket.gethostname()
        for path in entries:
            try:
                if now - path.stat().st_mtime > self.max_age:
                    continue
                data = _loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if not isinstance(data, dict) or data.get("version") != SNAPSHOT_VERSION:
                continue
            pid = data.get("pid")
            if not isinstance(pid, int):
                continue
            if data.get("host") == host and not self.pid_alive(pid):
                continue
            if not _usable(data):
                logger.debug("status: %s is not a snapshot this version can read; ignored", path)
                continue
            out.append(data)
        return out

    def read(self) -> dict[str, Any]:
        state = merge_snapshots(self.snapshots(), now=self.now())
        state["directory"] = str(self.directory)
        return state


class RedisStatusSource:
    """The snapshots that processes sharing a Redis backend publish there (every host)."""

    def __init__(self, url: str, key_prefix: str, *, now: Callable[[], float] = time.time,
                 client: Any = None) -> None:
        self.url = url
        self.pattern = "{" + key_prefix + "}:status:*"
        self.now = now
        self.client = client

    def read(self) -> dict[str, Any]:
        docs: list[dict[str, Any]] = []
        try:
            client = self.client
            if client is None:
                import redis

                client = self.client = redis.Redis.from_url(self.url, socket_timeout=2.0,
                                                            socket_connect_timeout=2.0)
            for key in client.scan_iter(match=self.pattern, count=500):
                raw = client.get(key)
                if raw is None:
                    continue
                with contextlib.suppress(ValueError):
                    doc = _loads(raw)
                    if isinstance(doc, dict) and doc.get("version") == SNAPSHOT_VERSION and _usable(doc):
                        docs.append(doc)
        except Exception as exc:  # unreachable Redis: say so, fall back to the local view
            from ._redis import safe_url

            logger.warning("status: cannot read snapshots from %s (%s)", safe_url(self.url), type(exc).__name__)
        state = merge_snapshots(docs, now=self.now())
        state["source"] = "redis"
        return state


class LedgerStatusSource:
    """The persisted budgets of the SQLite ledger (what ``status`` shows when nothing runs).

    Spend comes from the ledger; budget limits and warning thresholds from ``config`` (a
    :class:`~hive_ratelimit_plugin.config.RateLimitingConfig`), if given.
    """

    def __init__(self, state_path: str | os.PathLike[str], config: Any = None,
                 *, now: Callable[[], float] = time.time) -> None:
        self.state_path = str(state_path)
        self.config = config
        self.now = now

    def read(self) -> dict[str, Any]:
        from ._budget import Calendar

        cfg = self.config
        tz = cfg.budget.timezone if cfg is not None else "UTC"
        currency = cfg.budget.currency if cfg is not None else "USD"
        thresholds = list(cfg.budget.warning_thresholds) if cfg is not None else [0.8]
        state = _empty_state(self.now(), "ledger")
        state.update({"currency": currency, "warning_thresholds": thresholds, "state_path": self.state_path})
        if self.state_path != ":memory:" and not os.path.exists(self.state_path):
            state["source"] = "none"
            return state
        from ._ledger import read_ledger

        calendar = Calendar(tz)
        wall = self.now()
        starts = calendar.starts(wall)
        with read_ledger(self.state_path) as ledger:
            rows = ledger.load(starts)
        spend: dict[str, dict[str, Any]] = {}
        for key, kind, _start, cost, requests, tokens in rows:
            spend.setdefault(key, {})[kind] = {"cost": cost, "requests": requests, "tokens": tokens}
        state["spend"] = spend
        budgets: dict[str, dict[str, Any]] = {}
        for key, name, kind, limit in _configured_budgets(cfg, spend):
            spent = spend.get(key, {}).get(kind, {}).get("cost", 0.0)
            budgets.setdefault(key, {})[name] = {
                "window": kind, "window_label": calendar.label(kind, wall), "spent": spent, "reserved": 0.0,
                "limit": limit, "remaining": max(limit - spent, 0.0), "tripped": spent >= limit,
            }
        # Today's spend without a configured budget is still worth seeing (limit None; the
        # dashboard draws those of the levels it shows).
        for key in sorted(spend, key=_scope_sort_key):
            for kind in ("day",):
                if kind in spend[key] and not any(b["window"] == kind for b in budgets.get(key, {}).values()):
                    budgets.setdefault(key, {})[f"spend_{kind}"] = {
                        "window": kind, "window_label": calendar.label(kind, wall),
                        "spent": spend[key][kind]["cost"], "reserved": 0.0, "limit": None,
                        "remaining": None, "tripped": False,
                    }
        state["budgets"] = budgets
        return state


def _configured_budgets(cfg: Any, seen: Iterable[str] = ()) -> Iterable[tuple[str, str, str, float]]:
    """``(scope key, limit field, window, amount)`` of every money budget named in a configuration.

    A model's block also holds its dated snapshots (``claude-sonnet-4`` holds
    ``claude-sonnet-4-20250514``), each a scope of its own: the ``seen`` scope keys of snapshots
    get the block's budgets, and the block's own key is left out when only snapshots of it were
    seen (it would show a budget untouched beside the one being spent)."""
    if cfg is None:
        return
    from ._budget import COST_FIELDS
    from .config import undated

    seen = set(seen)
    snapshots: dict[str, list[str]] = {}  # "model:p/name" -> seen keys of its snapshots
    for key in seen:
        if key.startswith("model:"):
            base = undated(key)
            if base is not None:
                snapshots.setdefault(base, []).append(key)

    b = cfg.budget
    for name, field in (("max_cost_per_hour", "max_hourly_spend"), ("max_cost_per_day", "max_daily_spend"),
                        ("max_cost_per_month", "max_monthly_spend")):
        value = getattr(b, field) or getattr(cfg.global_, name, None)
        if value:
            yield "global", name, COST_FIELDS[name], float(value)
    blocks: list[tuple[str, Any]] = []
    for p, pconf in cfg.providers.items():
        blocks.append((f"provider:{p}", pconf))
        for m, mconf in pconf.models.items():
            key = f"model:{p}/{m}"
            dated = snapshots.get(key, ())
            blocks.extend((k, mconf) for k in sorted(dated))
            if key in seen or not dated:
                blocks.append((key, mconf))
    for level, table in (("agent", cfg.agents), ("user", cfg.users), ("team", cfg.teams)):
        blocks.extend((f"{level}:{name}", blk) for name, blk in table.items())
    for key, blk in blocks:
        if any(c in key for c in "*?["):
            continue  # a glob names no single scope
        for name, kind in COST_FIELDS.items():
            value = getattr(blk, name, None)
            if value:
                yield key, name, kind, float(value)


def read_status(state_path: str | None = None, config: Any = None, *, max_age: float = DEFAULT_MAX_AGE,
                now: Callable[[], float] = time.time,
                sources: Iterable[StatusSource] = ()) -> dict[str, Any]:
    """The state of running processes, or, if none runs, the persisted budgets.

    ``sources`` are asked first (e.g. a shared backend's); the first with running processes wins,
    then the snapshot files next to the state file, then the state file itself.
    """
    from ._ledger import default_state_path

    path = state_path or (config.state_path if config is not None else None) or str(default_state_path())
    for source in sources:
        found = source.read()
        if found.get("processes"):
            return found
    state = ProcessStatusSource(status_dir(path), max_age=max_age, now=now).read()
    if state["processes"]:
        return state
    fallback = LedgerStatusSource(path, config, now=now).read()
    fallback["directory"] = state["directory"]
    return fallback


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(text: str | bytes) -> Any:
    """``json.loads`` without Python's NaN and Infinity (publishers write null): they would break
    the dashboard's bars and make ``status --json`` print what is not JSON."""
    return json.loads(text, parse_constant=_no_constant)


def _usable(snap: Mapping[str, Any]) -> bool:
    """Whether a snapshot (a file in the status directory, a key in Redis) has the shape this
    version publishes: a file of another program, or hand-edited, is left out rather than stop
    the dashboard with a traceback."""
    try:
        render_dashboard(merge_snapshots([snap], now=0.0), levels=LEVELS)
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError, ZeroDivisionError):
        return False
    return True


# ----------------------------------------------------------------------------- merge
def _empty_state(now: float, source: str) -> dict[str, Any]:
    return {
        "version": SNAPSHOT_VERSION, "source": source, "generated_at": now, "processes": [],
        "currency": "USD", "warning_thresholds": [0.8], "scopes": {}, "budgets": {}, "spend": {},
        "circuits": {},
        "totals": {"admitted_total": 0, "queued_total": 0, "queued": 0, "retried_total": 0,
                   "provider_429s": 0, "rejected": {}},
    }


_CIRCUIT_RANK = {"closed": 0, "half_open": 1, "open": 2}


def _add(a: float, b: float) -> float:
    return a + b


def merge_snapshots(snapshots: Iterable[Mapping[str, Any]], *, now: float) -> dict[str, Any]:
    """Combine process snapshots into one dashboard state.

    With the memory backend every process enforces its own limits, so usage *and* limits are
    summed (the fleet's load against the fleet's allowance). Budgets are shared through the
    ledger: the largest spent of any process is shown, reservations are summed. With the Redis
    backend every process reports the same shared counters: the largest of each is shown (queued
    calls, which wait in each process, are still summed).
    """
    state = _empty_state(now, "processes")
    scopes: dict[str, dict[str, Any]] = state["scopes"]
    budgets: dict[str, dict[str, Any]] = state["budgets"]
    totals = state["totals"]
    for snap in snapshots:
        for lim in snap.get("limiters", ()):
            state["processes"].append({
                "pid": snap.get("pid"), "host": snap.get("host"), "backend": lim.get("backend", "memory"),
                "age_seconds": max(now - float(snap.get("written_at", now)), 0.0),
            })
            state["currency"] = lim.get("currency", state["currency"])
            state["warning_thresholds"] = lim.get("warning_thresholds", state["warning_thresholds"])
            stats = lim.get("stats", {})
            shared = lim.get("backend") == "redis"
            for level, entries in stats.get("levels", {}).items():
                for key, entry in entries.items():
                    into = scopes.setdefault(key, {"level": level, "limits": {}, "in_flight": 0, "queued": 0})
                    in_flight = int(entry.get("in_flight", 0))
                    into["in_flight"] = max(into["in_flight"], in_flight) if shared else into["in_flight"] + in_flight
                    into["queued"] += int(entry.get("queued", 0))
                    for name, value in entry.items():
                        if isinstance(value, dict) and value.get("limit") is not None:
                            acc = into["limits"].setdefault(name, {"used": 0.0, "limit": 0.0})
                            if shared:
                                acc["used"] = max(acc["used"], float(value["used"]))
                                acc["limit"] = max(acc["limit"], float(value["limit"]))
                            else:
                                acc["used"] += float(value["used"])
                                acc["limit"] += float(value["limit"])
            for key, entry in lim.get("budgets", {}).items():
                into_b = budgets.setdefault(key, {})
                for name, b in entry.items():
                    cur = into_b.get(name)
                    if cur is None:
                        into_b[name] = dict(b)
                    else:
                        reserved = (max if shared else _add)(float(cur.get("reserved") or 0.0),
                                                              float(b.get("reserved") or 0.0))
                        if float(b.get("spent") or 0.0) > float(cur.get("spent") or 0.0):
                            cur.update(b)
                        cur["reserved"] = reserved
            for key, p in stats.get("providers", {}).items():
                cur_c = state["circuits"].get(key)
                if cur_c is None or _CIRCUIT_RANK.get(p.get("circuit", "closed"), 0) > \
                        _CIRCUIT_RANK.get(cur_c.get("circuit", "closed"), 0):
                    state["circuits"][key] = dict(p)
            for name in ("admitted_total", "queued_total", "queued", "retried_total"):
                totals[name] += int(stats.get(name, 0))
            counters = lim.get("counters", {})
            totals["provider_429s"] += int(counters.get("provider_429s", 0))
            # The limiter's counters name every rejection by level and reason; the engine's own
            # ``rejected`` (budget names only) is the fallback for snapshots without them.
            rejections = counters.get("rejections") if "rejections" in counters else stats.get("rejected", {})
            for reason, n in rejections.items():
                totals["rejected"][reason] = totals["rejected"].get(reason, 0) + int(n)
    return state


# ---------------------------------------------------------------------------- render
_UNITS = {
    "requests_per_second": "RPS", "requests_per_minute": "RPM", "requests_per_hour": "RPH",
    "requests_per_day": "RPD", "tokens_per_second": "TPS", "tokens_per_minute": "TPM",
    "tokens_per_hour": "TPH", "tokens_per_day": "TPD", "input_tokens_per_minute": "input TPM",
    "output_tokens_per_minute": "output TPM", "learned_requests_per_minute": "RPM (learned)",
    "learned_tokens_per_minute": "TPM (learned)", "learned_input_tokens_per_minute": "input TPM (learned)",
    "learned_output_tokens_per_minute": "output TPM (learned)",
    "concurrent_requests": "concurrent",
}
_UNIT_ORDER = list(_UNITS)
_WINDOW_TITLE = {"hour": "This hour", "day": "Today", "month": "This month", "run": "This run"}
_WINDOW_ADJ = {"hour": "hourly", "day": "daily", "month": "monthly", "run": "per-run"}
_LEVEL_TITLE = {"global": "Global", "provider": "Provider", "model": "Model", "key": "API key / endpoint",
                "agent": "Agent", "user": "User", "team": "Team", "run": "Run"}
WARN = "⚠"
FULL = "✖"


def _num(value: float) -> str:
    """450, 240K, 1.5M; 1e+300 (not 300 digits and a G)."""
    v = float(value)
    if 1e12 <= abs(v) < math.inf:  # (from a thousand G on)
        return f"{v:.3g}"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= div:
            q = v / div
            text = f"{q:.0f}" if q >= 100 or q == int(q) else f"{q:.1f}".rstrip("0").rstrip(".")
            return text + suffix
    return f"{v:.0f}" if v == int(v) else f"{v:.1f}"


def _money(amount: float, currency: str) -> str:
    from ._budget import money

    return money(amount, currency)  # (never a misleading $0.00)


def _pct_text(pct: float) -> str:
    return "<1%" if 0 < pct < 1 else f"{pct:.0f}%"


def _bar(fraction: float, width: int = BAR_WIDTH) -> str:
    frac = min(max(fraction, 0.0), 1.0)
    filled = math.floor(frac * width + 1e-9)
    if frac > 0 and filled == 0:
        filled = 1
    return "█" * filled + "░" * (width - filled)


def _pct(used: float, limit: float) -> float:
    return used / limit * 100.0 if limit else 0.0


def _marker(pct: float, warn_at: float, full_word: str = "FULL") -> str:
    if pct >= 100.0:
        return f" {FULL} {full_word}"
    if pct >= warn_at:
        return f" {WARN}"
    return ""


def _scope_sort_key(key: str) -> tuple[int, str]:
    level = key.split(":", 1)[0]
    return (LEVELS.index(level) if level in LEVELS else len(LEVELS), key)


def _scope_title(key: str, level: str) -> str:
    name = key.split(":", 1)[1] if ":" in key else ""
    title = _LEVEL_TITLE.get(level, level.capitalize())
    return f"{title} {name}".strip()


def render_dashboard(state: Mapping[str, Any], *, levels: Iterable[str] = DEFAULT_LEVELS,
                     width: int = 60) -> str:
    """Draw a dashboard state (from a :class:`StatusSource`) as text, like the specification's mockup.

    Pure: the same dict always gives the same text (times are read from the dict).

    Args:
        state: a dashboard state.
        levels: which levels' rate limits (and unbudgeted spend) to draw; budgets of every level
            are always drawn.
        width: the smallest inner width of the box.
    """
    shown = set(levels)
    warn_at = min(state.get("warning_thresholds") or [0.8]) * 100.0
    currency = str(state.get("currency", "USD"))
    lines: list[str] = []
    procs = state.get("processes", [])
    when = dt.datetime.fromtimestamp(float(state.get("generated_at", 0.0)), dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    source = state.get("source")
    live = source == "processes" or (source == "redis" and bool(procs))
    if live:
        n = len(procs)
        if source == "redis":  # (processes on several hosts: the host says which one)
            who = "host:pid " + ", ".join(f"{p.get('host')}:{p.get('pid')}" for p in procs[:3])
            who += ", ..." if n > 3 else ""
        else:
            who = "pid " + ", ".join(str(p.get("pid")) for p in procs[:4]) + (", ..." if n > 4 else "")
        header = f"Rate Limit Status · {n} process{'es' if n != 1 else ''} ({who})"
        if source == "redis":
            header += " · redis"
    elif source == "redis":
        header = "Rate Limit Status · nothing running · redis"
    elif source == "ledger":
        header = "Rate Limit Status · nothing running · persisted budgets"
    else:
        header = "Rate Limit Status · nothing running · no state recorded"
    body: list[str] = []

    scopes = state.get("scopes", {})
    circuits = state.get("circuits", {})
    for key in sorted(scopes, key=_scope_sort_key):
        entry = scopes[key]
        level = entry.get("level", key.split(":", 1)[0])
        if level not in shown:
            continue
        rows = []
        limits = entry.get("limits", {})
        for name in sorted(limits, key=lambda n: _UNIT_ORDER.index(n) if n in _UNIT_ORDER else len(_UNIT_ORDER)):
            used, limit = float(limits[name]["used"]), float(limits[name]["limit"])
            pct = _pct(used, limit)
            unit = _UNITS.get(name, name)
            rows.append(f"{_bar(used / limit if limit else 0.0)} {_num(used)}/{_num(limit)} {unit} "
                        f"({_pct_text(pct)}){_marker(pct, warn_at)}")
        extras = []
        if entry.get("queued"):
            extras.append(f"{entry['queued']} queued")
        c = circuits.get(key)
        if c is not None and c.get("circuit", "closed") != "closed":
            extras.append(f"{FULL} circuit {c['circuit'].replace('_', '-')}")
        if c is not None and c.get("cooldown_seconds"):
            extras.append(f"{WARN} provider cooldown {float(c['cooldown_seconds']):.0f}s")
        if not rows and not extras:
            continue
        if body:
            body.append("")
        body.append(_scope_title(key, level))
        body.extend(rows)
        if extras:
            body.append("  " + " · ".join(extras))

    budgets = state.get("budgets", {})
    order = {"hour": 0, "day": 1, "month": 2, "run": 3}
    items = [(key, name, b) for key in sorted(budgets, key=_scope_sort_key) for name, b in budgets[key].items()]
    items.sort(key=lambda it: (_scope_sort_key(it[0]), order.get(it[2].get("window", ""), 9)))
    spend_only = False
    for key, name, b in items:
        limit = b.get("limit")
        if limit is None and key.split(":", 1)[0] not in shown:
            continue
        window = str(b.get("window", ""))
        who = "" if key == "global" else f" · {_scope_title(key, key.split(':', 1)[0]).lower()}"
        spent = float(b.get("spent", 0.0))
        if limit is None:  # spend without a budget: one line each
            if body and not spend_only:
                body.append("")
            body.append(f"Spend ({_WINDOW_TITLE.get(window, window)}){who}: {_money(spent, currency)}"
                        " (no budget set)")
            spend_only = True
            continue
        spend_only = False
        title = f"Budget ({_WINDOW_TITLE.get(window, window)}){who}"
        if b.get("window_label"):
            title += f" · {b['window_label']}"
        if body:
            body.append("")
        body.append(title)
        if name == "max_requests_per_run":
            fmt: Callable[[float], str] = lambda v: f"{v:g} requests"  # noqa: E731
        else:
            fmt = lambda v: _money(v, currency)  # noqa: E731
        pct = _pct(spent, float(limit))
        body.append(f"{_bar(spent / float(limit))} {fmt(spent)}/{fmt(float(limit))} ({_pct_text(pct)})"
                    f"{_marker(pct, warn_at, 'EXCEEDED')}")
        if b.get("reserved"):
            body.append(f"  + {fmt(float(b['reserved']))} reserved by calls in flight")
        adj = _WINDOW_ADJ.get(window, window)
        if b.get("tripped") or pct >= 100.0:
            body.append(f"{FULL}  EXCEEDED: {adj} limit reached; calls here are stopped")
        elif pct >= warn_at:
            body.append(f"{WARN}  WARNING: Approaching {adj} limit")

    totals = state.get("totals", {})
    if live:
        rejected = sum(int(v) for v in totals.get("rejected", {}).values())
        if body:
            body.append("")
        body.append(f"admitted {totals.get('admitted_total', 0)} · queued now {totals.get('queued', 0)} "
                    f"(total {totals.get('queued_total', 0)}) · rejected {rejected}")
        body.append(f"provider 429s {totals.get('provider_429s', 0)} (retried {totals.get('retried_total', 0)})")
    if not body:
        body.append("no usage recorded")
    when = f"updated {when}"
    lines = [header, *body, when]
    inner = max(width, *(len(line) for line in lines)) + 2
    out = ["┌" + "─" * inner + "┐", _boxed(header, inner), "├" + "─" * inner + "┤"]
    out.extend(_boxed(line, inner) for line in body)
    out.append("├" + "─" * inner + "┤")
    out.append(_boxed(when, inner))
    out.append("└" + "─" * inner + "┘")
    return "\n".join(out) + "\n"


def _boxed(line: str, inner: int) -> str:
    return "│ " + line.ljust(inner - 1) + "│"


# ------------------------------------------------------------------------ publishing
def build_snapshot(limiter: Any) -> dict[str, Any] | None:
    """What one limiter publishes: its usage stats, configured budgets, thresholds, counters.

    ``None`` when the limiter is disabled or not registered with LiteLLM (not "running").
    """
    cfg = limiter.config
    if not cfg.enabled or not getattr(cfg, "status", None) or not cfg.status.enabled:
        return None
    litellm = sys.modules.get("litellm")
    callbacks = getattr(litellm, "callbacks", None) if litellm is not None else None
    if not isinstance(callbacks, list) or not any(cb is limiter for cb in callbacks):
        return None
    stats = limiter._usage_stats(SNAPSHOT_CHUNK)
    eng = limiter._engine
    wall = eng.wall()
    budgets = {k: dict(v) for k, v in stats["budgets"].items()}
    for key, name, kind, limit in _configured_budgets(cfg, budgets):
        if name in budgets.get(key, {}):
            continue
        spent = eng.spend(key, kind)[0]
        budgets.setdefault(key, {})[name] = {
            "window": kind, "window_label": eng.calendar.label(kind, wall), "spent": spent, "reserved": 0.0,
            "limit": limit, "remaining": max(limit - spent, 0.0), "tripped": spent >= limit,
        }
    obs = getattr(limiter, "_obs", None)
    return {
        "backend": stats.get("backend", {}).get("type", "memory"),
        "currency": stats["currency"],
        "warning_thresholds": list(cfg.budget.warning_thresholds),
        "budgets": budgets,
        "stats": stats,
        "counters": obs.as_dict() if obs is not None else {},
    }


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


class StatusPublisher:
    """One daemon thread per process writing ``status/<pid>.json`` for every registered limiter.

    Limiters are held by weak reference; a snapshot is built off the calling threads, so calls
    never wait for it. Every error is swallowed (logged at DEBUG): publishing must never disturb
    the agent.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._publishing = threading.Lock()  # one publish at a time (the thread, or a test's call)
        self._entries: list[tuple[weakref.ref[Any], Path, float]] = []
        self._written: set[Path] = set()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stopped = False
        self._pid = os.getpid()
        self.tick_hooks: list[Callable[[], None]] = []
        _fork.track(self)

    def _after_fork_in_child(self) -> None:
        """(See :mod:`._fork`.) The publishing thread is the parent's: :meth:`register` starts
        one here when a limiter registers."""
        self._lock = threading.Lock()
        self._publishing = threading.Lock()
        self._wake = threading.Event()
        # The parent's files are the parent's: this process must not remove them when it exits.
        self._pid, self._thread, self._written = os.getpid(), None, set()

    def register(self, limiter: Any, directory: Path, interval: float) -> None:
        with self._lock:
            self._entries = [(r, d, i) for r, d, i in self._entries if r() is not None and r() is not limiter]
            self._entries.append((weakref.ref(limiter), directory, interval))
            if self._pid != os.getpid():  # forked: the parent's thread does not exist here
                self._pid, self._thread, self._written = os.getpid(), None, set()
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, name="hive-ratelimit-status", daemon=True)
                self._thread.start()
                atexit.register(self.stop)

    def _interval(self) -> float:
        with self._lock:
            intervals = [i for r, _, i in self._entries if r() is not None]
        return min(intervals) if intervals else 1.0

    def _run(self) -> None:
        while not self._stopped:
            started = time.perf_counter()
            self.publish_once()
            cost = time.perf_counter() - started
            # Thousands of scopes make a snapshot expensive: publish less often rather than
            # spend more than MAX_DUTY of a core on it.
            self._wake.wait(max(self._interval(), cost / MAX_DUTY))
            self._wake.clear()

    def publish_once(self) -> None:
        """Write (or remove) this process' snapshot file in every status directory."""
        with self._publishing:
            self._publish()

    def _publish(self) -> None:
        for hook in list(self.tick_hooks):
            with contextlib.suppress(Exception):
                hook()
        with self._lock:
            self._entries = [(r, d, i) for r, d, i in self._entries if r() is not None]
            entries = list(self._entries)
        per_dir: dict[Path, list[dict[str, Any]]] = {}
        for ref, directory, _ in entries:
            limiter = ref()
            if limiter is None:
                continue
            per_dir.setdefault(directory, [])
            try:
                snap = build_snapshot(limiter)
            except Exception as exc:  # never let a snapshot problem reach the agent
                logger.debug("status snapshot failed: %s", exc)
                continue
            if snap is not None:
                per_dir[directory].append(snap)
                publish = getattr(limiter._engine, "publish_status", None)
                if publish is not None:  # a shared backend: also where other hosts can read it
                    doc = {"version": SNAPSHOT_VERSION, "pid": os.getpid(), "host": socket.gethostname(),
                           "written_at": time.time(), "limiters": [snap]}
                    with contextlib.suppress(Exception):
                        publish(json.dumps(_clean(doc), default=str, separators=(",", ":")),
                                max(DEFAULT_MAX_AGE, 3 * limiter.config.status.interval_seconds))
        pid = os.getpid()
        for directory, snaps in per_dir.items():
            path = directory / f"{pid}.json"
            try:
                if snaps:
                    doc = {"version": SNAPSHOT_VERSION, "pid": pid, "host": socket.gethostname(),
                           "written_at": time.time(), "limiters": snaps}
                    _write_atomic(path, json.dumps(_clean(doc), default=str, separators=(",", ":")))
                    self._written.add(path)
                elif path in self._written:
                    path.unlink(missing_ok=True)
                    self._written.discard(path)
            except Exception as exc:
                logger.debug("could not write status snapshot %s: %s", path, exc)

    def stop(self) -> None:
        """Stop publishing and remove this process' snapshots (at exit): its files, and in a shared
        backend its key (else the process would be listed for the key's lifetime after it is gone)."""
        self._stopped = True
        self._wake.set()
        with self._publishing:  # (not while the thread writes one: it would be back)
            for path in list(self._written):
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
            self._written.clear()
            with self._lock:
                limiters = [r() for r, _, _ in self._entries]
            for limiter in limiters:  # (a limiter gone since: its key expires on its own)
                unpublish = getattr(getattr(limiter, "_engine", None), "unpublish_status", None)
                if unpublish is not None:
                    with contextlib.suppress(Exception):
                        unpublish()


def _clean(value: Any) -> Any:
    """JSON has no infinity: unbounded values become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


PUBLISHER = StatusPublisher()
