"""The ``hive-ratelimit`` command: ``demo``, ``check-config``, ``audit``, ``status``, ``run`` and ``simulate``."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .errors import ConfigError

# ``yaml`` and ``.config`` (pydantic: ~150 ms) are imported inside the commands, where ``main``
# catches Ctrl-C: imported here, an interrupt while they load was a KeyboardInterrupt traceback.

DEMO_CONFIG: dict[str, Any] = {
    "global": {"requests_per_second": 4, "concurrent_requests": 3},
    "providers": {"openai": {"gpt-4o-mini": {"tokens_per_minute": 20000}}},
    "agents": {"bulk-loader": {"requests_per_second": 1}},
    "queue": {"max_wait_seconds": 2.5},
}


def _describe_usage(stats: dict[str, Any]) -> list[str]:
    lines = []
    for level, scopes in stats["levels"].items():
        for key, entry in scopes.items():
            parts = []
            for name, value in entry.items():
                if isinstance(value, dict) and "limit" in value:
                    parts.append(f"{name} {value['used']:g}/{value['limit']:g}")
            parts.append(f"in flight {entry['in_flight']}, queued {entry['queued']}")
            lines.append(f"  {level:<8} {key:<28} " + "; ".join(parts))
    return lines


def _demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import asyncio
    import time

    import litellm
    import yaml
    from litellm.integrations.custom_logger import CustomLogger

    from .config import load_config
    from .errors import HiveRateLimitError
    from .fake_provider import FakeProvider, ProviderState
    from .plugin import HiveLimiter, unregister

    litellm.suppress_debug_info = True
    litellm.token_counter(model="gpt-4o-mini", text="warm up")  # load the tokenizer before timing
    limiter = HiveLimiter(load_config(DEMO_CONFIG, use_env=False))  # the demo's own limits, whatever the environment
    print("hive-ratelimit demo: simulated agents calling a fake provider on 127.0.0.1 (no key, no network)")
    print("limits: " + yaml.safe_dump(DEMO_CONFIG, default_flow_style=True, width=400).strip())
    print()
    agents = [("researcher", "high", args.calls), ("writer", "normal", args.calls), ("bulk-loader", "low", args.calls)]
    with FakeProvider(ProviderState(latency=0.15)) as provider:
        start = time.monotonic()
        rows: list[tuple[float, str]] = []
        sent_at: dict[str, float] = {}

        class _SendTimes(CustomLogger):
            def log_pre_api_call(self, model: Any, messages: Any, kwargs: dict[str, Any]) -> None:
                sent_at[str(messages[0]["content"])] = time.monotonic()

        litellm.callbacks.append(_SendTimes())

        async def one(agent: str, priority: str, n: int) -> None:
            t0 = time.monotonic()
            prompt = f"{agent} task {n}"
            try:
                resp = await litellm.acompletion(
                    model="openai/gpt-4o-mini",
                    api_base=provider.url,
                    api_key="sk-demo-not-a-real-key",
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=50,
                    metadata={"agent_id": agent, "priority": priority},
                )
                waited = sent_at[prompt] - t0
                rows.append((sent_at[prompt] - start,
                             f"{agent:<12} ({priority:<6}) call {n}: sent after waiting {waited:.2f}s"
                             f" ({resp.usage.total_tokens} tokens)"))
            except HiveRateLimitError as exc:
                rows.append((time.monotonic() - start,
                             f"{agent:<12} ({priority:<6}) call {n}: not sent: {type(exc).__name__}: {exc}"))

        async def run() -> None:
            # One call before the limiter is registered: LiteLLM's first call in a process is slow
            # (clients, lazy imports), and that time is not a wait in the queue.
            await litellm.acompletion(model="openai/gpt-4o-mini", api_base=provider.url,
                                      api_key="sk-demo-not-a-real-key",
                                      messages=[{"role": "user", "content": "warm up"}], max_tokens=5)
            provider.state.reset()
            litellm.callbacks.append(limiter)
            nonlocal start
            start = time.monotonic()
            await asyncio.gather(*(one(a, p, i) for a, p, k in agents for i in range(1, k + 1)))

        # (its own table says what each refusal was: the plugin's log lines, on stderr, would come
        # out ahead of it when the output is piped)
        plugin_log = logging.getLogger("hive_ratelimit_plugin")
        level = plugin_log.level
        plugin_log.setLevel(logging.ERROR)
        try:
            asyncio.run(run())
        finally:
            plugin_log.setLevel(level)
        for at, line in sorted(rows):
            print(f"  t={at:5.2f}s  {line}")
        print()
        print(f"provider received {provider.state.count()} requests, {provider.state.count(429)} answered 429; "
              f"at most {provider.state.max_in_flight} at once")
        print("live usage per level:")
        for line in _describe_usage(limiter.get_usage_stats()):
            print(line)
    for cb in list(litellm.callbacks):
        unregister(cb)
    return 0


def _check_config(args: argparse.Namespace) -> int:
    import yaml

    from .config import env_overrides, load_config

    try:
        cfg = load_config(args.file, use_env=not args.no_env)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if cfg.providers:
        # The limiter warns at construction about a providers key LiteLLM does not know (a typo:
        # its limits would never apply); say it here too, where a configuration is checked.
        from .plugin import _warn_unknown_providers  # (imports LiteLLM: seconds, only with providers)

        _warn_unknown_providers(cfg)
    raw = cfg.model_dump(mode="json", exclude_none=True, by_alias=False)
    if raw.get("backend", "memory") != "memory":
        from ._redis import safe_url

        raw["backend"] = safe_url(raw["backend"])  # never print the Redis password
    for pconf in raw.get("providers", {}).values():
        pconf.update(pconf.pop("models", {}))
    data: dict[str, Any] = {}
    for key, value in raw.items():
        name = "global" if key == "global_" else key
        if value in ({}, None):
            continue
        data[name] = value
    overrides = [] if args.no_env else env_overrides()
    print(f"# effective configuration of {args.file}"
          + (f" (overridden by the environment: {', '.join(overrides)})" if overrides else ""))
    print(yaml.safe_dump({"rate_limiting": data}, sort_keys=False), end="")
    return 0


def _audit(args: argparse.Namespace) -> int:
    import datetime as dt
    import json

    from ._ledger import default_state_path, read_ledger

    path = args.state_path or os.environ.get("HIVE_RATELIMIT_STATE_PATH") or str(default_state_path())
    if path != ":memory:" and not os.path.exists(path):
        print(f"no state file at {path} (nothing recorded yet)", file=sys.stderr)
        return 1
    with read_ledger(path) as ledger:
        rows = ledger.audit_rows(args.limit)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no budget changes recorded in {path}")
        return 0
    print(f"budget changes recorded in {path}:")
    for r in rows:
        when = dt.datetime.fromtimestamp(r["ts"], dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        print(f"{when}  {r['action']:<6} {r['scope']:<28} {r['old']} -> {r['new']}  "
              f"(by {r['user']} on {r['host']}, pid {r['pid']})")
    return 0


def _status(args: argparse.Namespace) -> int:
    import json
    import time

    from .config import load_config
    from .status import DEFAULT_LEVELS, read_status, render_dashboard

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    levels = list(DEFAULT_LEVELS)
    for flag, level in (("agents", "agent"), ("users", "user"), ("teams", "team")):
        if getattr(args, flag) or args.all:
            levels.append(level)
    if args.all:
        levels += ["key", "run"]
    sources = []
    if cfg.backend != "memory":  # processes sharing Redis publish there, from every host
        from .status import RedisStatusSource

        sources.append(RedisStatusSource(cfg.backend, cfg.redis.key_prefix))
    # --count and --interval have no meaning but watching: either one watches (they were ignored
    # without --watch, and one frame printed)
    watch = args.watch or args.count is not None or args.interval is not None
    interval = 1.0 if args.interval is None else args.interval
    frames = 0
    tty = sys.stdout.isatty()
    try:
        while True:
            state = read_status(args.state_path, cfg, max_age=args.max_age, sources=sources)
            if args.json:
                text = json.dumps(state, indent=None if watch else 2, default=str) + "\n"
            else:
                text = render_dashboard(state, levels=levels)
            if watch and tty and not args.json:
                text = "\x1b[H\x1b[J" + text  # redraw in place
            elif watch and frames and not args.json:
                text = "\n" + text
            sys.stdout.write(text)
            sys.stdout.flush()
            frames += 1
            if not watch or (args.count and frames >= args.count):
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        if watch:  # the way a watch ends ("until Ctrl-C")
            return 0
        raise  # one status, interrupted: 130, as anywhere else (it was 0, as if printed)


def run_environment(config: str | None = None, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment ``hive-ratelimit run`` gives its command.

    ``HIVE_RATELIMIT_ENABLED=1``, ``HIVE_RATELIMIT_CONFIG`` if ``config`` is given, and this
    package's ``_boot`` directory first on ``PYTHONPATH``: its ``sitecustomize`` turns the
    autoload on even in an interpreter without ``hive_ratelimit_autoload.pth`` (and then runs the
    ``sitecustomize`` it shadows).
    """
    env = dict(os.environ if environ is None else environ)
    env["HIVE_RATELIMIT_ENABLED"] = "1"
    if config is not None:
        env["HIVE_RATELIMIT_CONFIG"] = os.path.abspath(config)
    boot = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_boot")
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != boot]
    env["PYTHONPATH"] = os.pathsep.join([boot, *rest])
    return env


def _run(args: argparse.Namespace) -> int:
    import signal
    import subprocess

    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("error: nothing to run; usage: hive-ratelimit run [--config FILE] -- COMMAND [ARG ...]", file=sys.stderr)
        return 2
    if args.config is not None:
        from .config import load_config

        try:
            load_config(args.config)  # fail here, with the message, rather than in the child's import
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    try:
        child = subprocess.Popen(command, env=run_environment(args.config))
    except OSError as exc:
        print(f"error: cannot run {command[0]!r}: {exc.strerror or exc}", file=sys.stderr)
        # As env(1) and the shells: 127 for a command not found, 126 for one found but not run (not
        # executable, a directory, not a program)
        return 127 if exc.errno == errno.ENOENT else 126
    # SIGINT and SIGQUIT are left out: a terminal sends them to the child as well. SIGUSR1/2 (a
    # server's "reopen logs", "upgrade") would otherwise kill this wrapper and orphan the command.
    forwarded = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")
                      if hasattr(signal, name))
    previous = {sig: signal.signal(sig, lambda signum, _frame: child.send_signal(signum)) for sig in forwarded}
    try:
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:  # the terminal sent SIGINT to the child too; wait for it
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as shells report it


def _simulate(args: argparse.Namespace) -> int:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import json

    import litellm

    from .simulate import SimulationError, simulate_from_args

    # (else LiteLLM prints a "Provider List" banner to stdout for a model it does not know, and
    # --json is not JSON)
    litellm.suppress_debug_info = True
    try:
        report, text = simulate_from_args(args)
    except (SimulationError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else text)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, and finite, got {text}")
    return value


MIN_INTERVAL = 0.1  # as watch(1): a smaller --interval would redraw in a busy loop (the snapshot moves once a second)


def _interval(text: str) -> float:
    value = _seconds(text)
    if value > 86400:  # (time.sleep raises OverflowError from ~9.2e9 s; less often than daily is a typo)
        raise argparse.ArgumentTypeError(f"must be at most 86400 seconds (a day), got {text}")
    return max(value, MIN_INTERVAL)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hive-ratelimit", description="Rate limits for LiteLLM agents.")
    parser.add_argument("--version", action="version", version=f"hive-ratelimit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="run simulated agents against a built-in fake provider",
        description="Three simulated agents (high, normal and low priority) call a fake provider on "
                    "127.0.0.1 under small limits: what was sent, what waited and for how long, what timed "
                    "out, and the live usage per level. No API key, no network.")
    demo.add_argument("--calls", type=_positive_int, default=4, help="calls per agent (default 4)")
    demo.set_defaults(func=_demo)
    check = sub.add_parser(
        "check-config", help="validate a YAML file and print the effective configuration",
        description="Validate a limits file (with the HIVE_RATELIMIT_* environment overrides, as HiveLimiter "
                    "reads it) and print the effective configuration, or every error; exit status 1 on error.")
    check.add_argument("file", help="the YAML file (its root key: rate_limiting)")
    check.add_argument("--no-env", action="store_true", help="ignore HIVE_RATELIMIT_* environment overrides")
    check.set_defaults(func=_check_config)
    audit = sub.add_parser("audit", help="print the audit log of budget changes")
    audit.add_argument("--state-path", help="the state file (default: HIVE_RATELIMIT_STATE_PATH or "
                       "$XDG_STATE_HOME/hive-ratelimit/state.sqlite, by default ~/.local/state/...)")
    audit.add_argument("--limit", type=_positive_int, default=None, help="only the last N changes")
    audit.add_argument("--json", action="store_true", help="print JSON")
    audit.set_defaults(func=_audit)
    status = sub.add_parser(
        "status", help="show live usage against limits and budgets (running processes, else the state file)",
        description="Draw request, token and concurrency usage against limits, and every budget, from the "
                    "snapshots running processes publish next to the state file; with nothing running, the "
                    "budgets persisted in the state file.")
    status.add_argument("--config", help="the limits YAML, for budget limits when nothing runs "
                        "(default: HIVE_RATELIMIT_CONFIG)")
    status.add_argument("--state-path", help="the state file (default: the configuration's state_path, "
                        "HIVE_RATELIMIT_STATE_PATH or $XDG_STATE_HOME/hive-ratelimit/state.sqlite, by default "
                        "~/.local/state/...)")
    status.add_argument("--agents", action="store_true", help="also draw per-agent limits")
    status.add_argument("--users", action="store_true", help="also draw per-user limits")
    status.add_argument("--teams", action="store_true", help="also draw per-team limits")
    status.add_argument("--all", action="store_true", help="draw every level (agents, users, teams, API keys, runs)")
    status.add_argument("--json", action="store_true", help="print the state as JSON instead")
    status.add_argument("--watch", action="store_true", help="refresh until interrupted (Ctrl-C: exit status 0)")
    status.add_argument("--interval", type=_interval, default=None,
                        help="seconds between refreshes (default 1, at least 0.1, at most 86400); implies --watch")
    status.add_argument("--count", type=_positive_int, default=None,
                        help="stop after N refreshes; implies --watch")
    status.add_argument("--max-age", type=_seconds, default=10.0,
                        help="ignore snapshots older than this many seconds (default 10)")
    status.set_defaults(func=_status)
    run = sub.add_parser(
        "run", help="run a command with hive-ratelimit enabled in every Python program it starts (no code change)",
        description="Run COMMAND with HIVE_RATELIMIT_ENABLED=1: any Python program it starts registers a "
                    "HiveLimiter when it imports litellm. Exits with the command's exit code (126 if it "
                    "cannot be executed, 127 if it is not found, as env and the shells).",
        usage="hive-ratelimit run [--config FILE] -- COMMAND [ARG ...]")
    run.add_argument("--config", help="the limits YAML (sets HIVE_RATELIMIT_CONFIG; default: inherited)")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    run.set_defaults(func=_run)
    sim = sub.add_parser(
        "simulate", help="run a configuration against a simulated load on a virtual clock (no provider, no waiting)",
        description="Drive the plugin's real admission engine with a simulated load on a virtual clock and "
                    "print what would be admitted, queued and rejected, the queue waits, the 429s a provider "
                    "would send, and when budgets would trip. An hour of traffic takes seconds.")
    from .simulate import add_arguments

    add_arguments(sim)
    sim.set_defaults(func=_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hive-ratelimit`` command."""
    try:
        args = _parser().parse_args(argv)  # (it imports the simulation, and with it pydantic: ~150 ms)
        code = int(args.func(args))
        sys.stdout.flush()  # (here, not at exit: a reader that went away is answered below)
        return code
    except ConfigError as exc:  # (a state file that is not one, an environment variable naming no field)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while it starts or works (pydantic's or LiteLLM's import, a long
        # simulation): no traceback
        print("interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it
    except BrokenPipeError:
        # The output was piped into a reader that stopped reading (`| head`). Python would also
        # fail flushing what is left at exit: send it to /dev/null instead.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a program killed by it exits with


if __name__ == "__main__":
    raise SystemExit(main())
