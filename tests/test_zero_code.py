"""Zero-code enablement: ``HIVE_RATELIMIT_ENABLED=1`` + ``hive_ratelimit_autoload.pth``,
``hive-ratelimit run``, and ``enable()`` / ``disable()``.

The end-to-end tests run real interpreters (``sys.executable``) on small scripts. They exercise
the ``.pth`` line exactly as Python's ``site`` module runs it: from the installed file when this
interpreter has the package installed (``pip install -e .`` included), otherwise from a copy of
``packaging/hive_ratelimit_autoload.pth`` in a temporary site directory added with
``site.addsitedir`` before the script runs (``site`` processes it the same way at start-up).
Each interpreter that imports LiteLLM costs seconds, so the four of them start together once per
module and the tests read their results.
"""

from __future__ import annotations

import builtins
import os
import site
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import litellm
import pytest
from litellm.integrations.custom_logger import CustomLogger

import hive_ratelimit_plugin
from hive_ratelimit_plugin import _autoload, _enable, disable, enable
from hive_ratelimit_plugin.cli import main as cli_main
from hive_ratelimit_plugin.cli import run_environment
from hive_ratelimit_plugin.plugin import HiveLimiter, unregister

ROOT = Path(__file__).resolve().parents[1]
PTH_NAME = "hive_ratelimit_autoload.pth"
PTH = ROOT / "packaging" / PTH_NAME

ONE_PER_MINUTE_YAML = "rate_limiting:\n  global: {requests_per_minute: 1}\n  queue: {max_wait_seconds: 0}\n"
BAD_YAML = "rate_limiting:\n  global:\n    requests_per_minute: -5\n    requets_per_minute: 3\n"


def _installed_pth() -> Path | None:
    """This interpreter's installed copy of the .pth, if it is the same as the repository's."""
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    for d in dirs:
        candidate = Path(d) / PTH_NAME
        if candidate.is_file() and candidate.read_text() == PTH.read_text():
            return candidate
    return None


# ----------------------------------------------------------------- scripts for the interpreters
SCRIPT_ENABLED = """
    import sys
    assert "litellm" not in sys.modules
    assert "hive_ratelimit_plugin._autoload" in sys.modules, "the .pth did not run"
    assert "hive_ratelimit_plugin.config" not in sys.modules, "start-up imported more than the hook"
    import litellm
    from litellm.integrations.custom_logger import CustomLogger

    def names():
        return [type(cb).__name__ for cb in litellm.callbacks]

    assert names() == ["HiveLimiter"], names()
    class Mine(CustomLogger):
        pass
    litellm.callbacks.append(Mine())
    assert names() == ["HiveLimiter", "Mine"], names()
    litellm.callbacks = [Mine()]          # replaced by the program: the limiter comes back, with a WARNING
    assert names() == ["Mine", "HiveLimiter"], names()

    import hive_ratelimit_plugin as h
    from hive_ratelimit_plugin.testing import FakeProvider, ProviderState
    limiter = h.enable()                  # the autoloaded limiter, not a second one
    assert limiter is litellm.callbacks[-1] and names().count("HiveLimiter") == 1
    with FakeProvider(ProviderState()) as p:
        kw = dict(model="openai/gpt-4o-mini", api_base=p.url, api_key="sk-not-a-key", max_retries=0,
                  messages=[{"role": "user", "content": "hi"}])
        litellm.completion(**kw)
        try:
            litellm.completion(**kw)      # HIVE_RATELIMIT_CONFIG: 1 request per minute, no waiting
            raise AssertionError("second call was not limited")
        except h.RateLimitQueueTimeout:
            print("LIMITED")
        assert p.state.count() == 1
    h.disable()
    assert names() == ["Mine"], names()
    litellm.callbacks = []                # after disable(): nothing comes back
    assert names() == [], names()
    print("OK")
"""

SCRIPT_LATE = """
    import os, site, sys
    import litellm
    from litellm.integrations.custom_logger import CustomLogger

    class Mine(CustomLogger):
        pass
    mine = Mine()
    litellm.callbacks.append(mine)        # a callback registered before hive-ratelimit is
    os.environ["HIVE_RATELIMIT_ENABLED"] = "1"
    site.addsitedir(sys.argv[1])          # the .pth runs now, with litellm already imported
    names = [type(cb).__name__ for cb in litellm.callbacks]
    assert names == ["Mine", "HiveLimiter"] and litellm.callbacks[0] is mine, names
    print("OK")
"""

SCRIPT_DISABLED = """
    import sys
    import litellm
    assert not any(type(cb).__name__ == "HiveLimiter" for cb in litellm.callbacks), litellm.callbacks
    assert not [m for m in sys.modules if m.startswith("hive_ratelimit_plugin")], "imported while disabled"
    print("OK")
"""

SCRIPT_BAD_CONFIG = """
    import litellm
    print("NOT REACHED: litellm imported without limits")
"""

RUN_CHILD = """
    import os, sys
    from hive_ratelimit_plugin import _autoload
    assert os.environ["HIVE_RATELIMIT_ENABLED"] == "1"
    print("CONFIG", os.environ["HIVE_RATELIMIT_CONFIG"])
    assert _autoload.installed(), "the autoload hook is not waiting for litellm"
    assert "litellm" not in sys.modules
    sys.exit(7)
"""


def _base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVE_RATELIMIT_")}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env.update(extra)
    return env


class _Started:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self._result: tuple[int, str, str] | None = None

    def result(self) -> tuple[int, str, str]:
        if self._result is None:
            out, err = self.proc.communicate(timeout=110)
            self._result = (self.proc.returncode, out, err)
        return self._result


@pytest.fixture(scope="module")
def zc_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zero_code")


@pytest.fixture(scope="module")
def runs(zc_tmp: Path) -> Iterator[dict[str, _Started]]:
    """Start every interpreter at once; tests wait for the one they check."""
    tmp = zc_tmp
    pth_dir = tmp / "site"
    pth_dir.mkdir()
    (pth_dir / PTH_NAME).write_text(PTH.read_text())
    (tmp / "limits.yaml").write_text(ONE_PER_MINUTE_YAML)
    (tmp / "bad.yaml").write_text(BAD_YAML)
    shadowed = tmp / "own_sitecustomize"
    shadowed.mkdir()
    (shadowed / "sitecustomize.py").write_text("print('CHAINED own sitecustomize')\n")
    scripts = {"enabled": SCRIPT_ENABLED, "late": SCRIPT_LATE, "disabled": SCRIPT_DISABLED,
               "bad_config": SCRIPT_BAD_CONFIG, "run_child": RUN_CHILD}
    for name, text in scripts.items():
        (tmp / f"{name}.py").write_text(textwrap.dedent(text))

    def at_startup(script: str) -> list[str]:
        """Run ``script`` with the .pth processed at start-up, before the script's first line."""
        if _installed_pth() is not None:
            return [sys.executable, str(tmp / script)]
        prelude = ("import runpy, site, sys; site.addsitedir(sys.argv[1]); del sys.argv[:2]; "
                   "runpy.run_path(sys.argv[0], run_name='__main__')")
        return [sys.executable, "-c", prelude, str(pth_dir), str(tmp / script)]

    commands: dict[str, tuple[list[str], dict[str, str]]] = {
        "enabled": (at_startup("enabled.py"), _base_env(
            HIVE_RATELIMIT_ENABLED="1", HIVE_RATELIMIT_CONFIG=str(tmp / "limits.yaml"))),
        "late": ([sys.executable, str(tmp / "late.py"), str(pth_dir)], _base_env()),
        "disabled": (at_startup("disabled.py"), _base_env()),
        "bad_config": (at_startup("bad_config.py"), _base_env(
            HIVE_RATELIMIT_ENABLED="true", HIVE_RATELIMIT_CONFIG=str(tmp / "bad.yaml"))),
        # hive-ratelimit run: no .pth needed; the child does not import litellm (cheap).
        "run": ([sys.executable, "-m", "hive_ratelimit_plugin.cli", "run", "--config", str(tmp / "limits.yaml"),
                 "--", sys.executable, str(tmp / "run_child.py")],
                _base_env(PYTHONPATH=os.pathsep.join([str(shadowed), str(ROOT)]))),
    }
    started = {name: _Started(subprocess.Popen(cmd, env=env, cwd=tmp, text=True,
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE))
               for name, (cmd, env) in commands.items()}
    try:
        yield started
    finally:
        for s in started.values():
            if s.proc.poll() is None:
                s.proc.kill()
                s.proc.communicate()


def _ok(run: _Started) -> tuple[str, str]:
    code, out, err = run.result()
    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    return out, err


def test_enabled_registers_a_limiter_when_litellm_is_imported(runs: dict[str, _Started]) -> None:
    """HIVE_RATELIMIT_ENABLED=1: `import litellm` comes back with one HiveLimiter appended, which
    limits real calls, survives the program replacing litellm.callbacks, and disable() removes."""
    out, err = _ok(runs["enabled"])
    assert "LIMITED" in out and "OK" in out
    assert "litellm.callbacks was replaced" in err and "re-attached" in err  # the WARNING


def test_existing_callbacks_are_kept(runs: dict[str, _Started]) -> None:
    """With LiteLLM already imported and a callback registered, the limiter is appended after it."""
    out, _ = _ok(runs["late"])
    assert "OK" in out


def test_disabled_registers_nothing_and_imports_nothing(runs: dict[str, _Started]) -> None:
    """Without HIVE_RATELIMIT_ENABLED: no limiter, and the package is not even imported."""
    out, _ = _ok(runs["disabled"])
    assert "OK" in out


def test_bad_config_fails_loudly_at_import_of_litellm(runs: dict[str, _Started]) -> None:
    """A bad HIVE_RATELIMIT_CONFIG makes `import litellm` raise ConfigError (never unlimited), with
    an ERROR log naming each bad key."""
    code, out, err = runs["bad_config"].result()
    assert code != 0 and "NOT REACHED" not in out
    assert "hive_ratelimit_plugin.errors.ConfigError: hive-ratelimit could not start" in err
    assert "rate_limiting.global.requests_per_minute: -5 is not allowed" in err
    assert "rate_limiting.global.requets_per_minute: unknown key" in err
    assert "refusing to start" in err  # the logged ERROR


def test_run_command_enables_the_child_and_passes_its_exit_code(runs: dict[str, _Started], zc_tmp: Path) -> None:
    """`hive-ratelimit run --config F -- python x.py`: the child has the autoload waiting (through the
    PYTHONPATH sitecustomize, .pth or not), still runs its own sitecustomize, and its exit code is ours."""
    code, out, err = runs["run"].result()
    assert code == 7, (out, err)
    assert f"CONFIG {zc_tmp / 'limits.yaml'}" in out
    assert "CHAINED own sitecustomize" in out


# ----------------------------------------------------------------- the .pth line itself
def _exec_pth(monkeypatch: pytest.MonkeyPatch, value: str | None) -> list[str]:
    """Run the .pth's import line the way site.addpackage does; return what it imported."""
    if value is None:
        monkeypatch.delenv("HIVE_RATELIMIT_ENABLED", raising=False)
    else:
        monkeypatch.setenv("HIVE_RATELIMIT_ENABLED", value)
    imported: list[str] = []
    real_import = builtins.__import__

    def recording_import(name: str, *args: Any, **kwargs: Any) -> Any:
        imported.append(name)
        if name.startswith("hive_ratelimit_plugin"):
            return None
        return real_import(name, *args, **kwargs)

    lines = [ln for ln in PTH.read_text().splitlines() if ln.startswith(("import ", "import\t"))]
    assert len(lines) == 1
    exec(lines[0], {"__builtins__": {**vars(builtins), "__import__": recording_import}})
    return imported


@pytest.mark.parametrize("value", [None, "", "0", "false", "no", "off", "1", "true", "TRUE", " yes ", "on", "2"])
def test_pth_line_agrees_with_autoload(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    """The .pth's inline check and _autoload.is_enabled() agree on every value."""
    imported = _exec_pth(monkeypatch, value)
    assert ("hive_ratelimit_plugin._autoload" in imported) == _autoload.is_enabled()
    assert set(imported) <= {"os", "hive_ratelimit_plugin._autoload"}


def test_pth_line_costs_microseconds_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Disabled, the .pth line is an environment lookup (docs/zero-code.md has the end-to-end figure)."""
    monkeypatch.delenv("HIVE_RATELIMIT_ENABLED", raising=False)
    line = next(ln for ln in PTH.read_text().splitlines() if ln.startswith("import "))
    code = compile(line, PTH_NAME, "exec")
    n = 2000
    # (This thread's CPU time, not the wall clock: on a loaded machine the thread can be off the
    # CPU for longer than the whole budget while the loop runs.)
    t0 = time.thread_time()
    for _ in range(n):
        exec(code, {})
    per_line = (time.thread_time() - t0) / n
    assert per_line < 100e-6, per_line  # measured ~1-2 us; the budget is 1 ms


def test_package_import_is_light() -> None:
    """`import hive_ratelimit_plugin` (what the autoload needs at start-up) loads no submodule."""
    code = ("import sys, hive_ratelimit_plugin._autoload; "
            "print(sorted(m for m in sys.modules if m.startswith(('hive_ratelimit_plugin', 'litellm', 'pydantic'))))")
    out = subprocess.run([sys.executable, "-c", code], env=_base_env(), cwd=ROOT, text=True, capture_output=True,
                         check=True).stdout
    assert out.strip() == "['hive_ratelimit_plugin', 'hive_ratelimit_plugin._autoload']"


def test_wheel_carries_the_pth() -> None:
    """pyproject.toml maps the .pth to the wheel root (regular and editable wheels)."""
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    force = data["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert force == {f"packaging/{PTH_NAME}": PTH_NAME}
    assert "packaging" in data["tool"]["hatch"]["build"]["targets"]["sdist"]["include"]


# ----------------------------------------------------------------- run, in process
def test_run_environment() -> None:
    env = run_environment("limits.yaml", {"PATH": "/bin", "PYTHONPATH": "/x", "HIVE_RATELIMIT_ENABLED": "0"})
    boot = Path(hive_ratelimit_plugin.__file__).parent / "_boot"
    assert env["HIVE_RATELIMIT_ENABLED"] == "1"
    assert env["HIVE_RATELIMIT_CONFIG"] == os.path.abspath("limits.yaml")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(boot), "/x"]
    assert (boot / "sitecustomize.py").is_file()
    again = run_environment(None, env)  # nested runs do not stack the boot dir
    assert again["PYTHONPATH"] == env["PYTHONPATH"]


def test_run_forwards_a_servers_signals_to_the_command(tmp_path: Path) -> None:
    """SIGUSR1 and SIGUSR2 (a server's "reopen logs" and "upgrade") reach the command; they
    killed the wrapper and left the command running, orphaned. SIGTERM still ends it, with the
    command's own exit code. Found by helper-53."""
    import signal

    seen = tmp_path / "seen.txt"
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(f"""
        import signal, sys, time
        def note(signum, _frame):
            with open({str(seen)!r}, "a") as f:
                f.write(signal.Signals(signum).name + "\\n")
            if signum == signal.SIGTERM:
                sys.exit(5)
        for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
            signal.signal(s, note)
        open({str(seen)!r}, "a").write("ready\\n")
        end = time.monotonic() + 120  # (never left running: an orphan, if the wrapper dies, ends too)
        while time.monotonic() < end:
            time.sleep(0.05)
    """))
    env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True")
    wrapper = subprocess.Popen([sys.executable, "-m", "hive_ratelimit_plugin.cli", "run", "--", sys.executable,
                                str(child)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_for(line: str) -> None:
        end = time.monotonic() + 60
        while not (seen.exists() and line in seen.read_text().split()):
            assert time.monotonic() < end and wrapper.poll() is None, (line, wrapper.poll())
            time.sleep(0.05)

    try:
        wait_for("ready")
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            wrapper.send_signal(sig)
            wait_for(sig.name)
        assert wrapper.poll() is None  # the wrapper is still there, waiting for its command
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(30) == 5
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait()


def test_run_rejects_a_bad_config_before_starting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML)
    assert cli_main(["run", "--config", str(bad), "--", sys.executable, "-c", "raise SystemExit(3)"]) == 1
    assert "requests_per_minute: -5 is not allowed" in capsys.readouterr().err
    assert cli_main(["run"]) == 2


# ----------------------------------------------------------------- enable() / disable(), in process
class Mine(CustomLogger):
    pass


@pytest.fixture
def enabled_cleanup() -> Iterator[None]:
    yield
    disable()
    assert type(litellm) is type(sys)  # the module class is restored


CONFIG = {"global": {"requests_per_minute": 100}}


def hive_limiters() -> list[Any]:
    return [cb for cb in litellm.callbacks if isinstance(cb, HiveLimiter)]


def test_enable_is_idempotent(enabled_cleanup: None) -> None:
    first = enable(CONFIG)
    assert enable(CONFIG) is first
    assert enable({"rate_limiting": CONFIG}) is first  # same effective configuration
    assert hive_limiters() == [first]
    litellm.callbacks.remove(first)  # removed in place: a later enable() re-registers it
    assert enable(CONFIG) is first and hive_limiters() == [first]
    assert hive_ratelimit_plugin.enable is enable


def test_enable_with_another_config_replaces(enabled_cleanup: None) -> None:
    first = enable(CONFIG)
    second = enable({"global": {"requests_per_minute": 5}})
    assert second is not first
    assert hive_limiters() == [second]
    assert _enable.enabled_limiter() is second


def test_disable_unregisters(enabled_cleanup: None) -> None:
    mine = Mine()
    litellm.callbacks.append(mine)
    limiter = enable(CONFIG)
    disable()
    assert hive_limiters() == [] and mine in litellm.callbacks
    assert limiter not in getattr(litellm, "_async_success_callback", [])
    disable()  # idempotent
    litellm.callbacks = [Mine()]  # nothing re-attached after disable()
    assert hive_limiters() == []


def test_replaced_callbacks_get_the_limiter_back(enabled_cleanup: None, caplog: pytest.LogCaptureFixture) -> None:
    limiter = enable(CONFIG)
    replacement = [Mine()]
    with caplog.at_level("WARNING", logger="hive_ratelimit_plugin"):
        litellm.callbacks = replacement
    assert litellm.callbacks is replacement and replacement[1] is limiter
    assert "re-attached" in caplog.text
    own = HiveLimiter(CONFIG)  # a list with the program's own limiter is left alone
    litellm.callbacks = [own]
    assert hive_limiters() == [own]
    assert _enable.enabled_limiter() is None
    unregister(own)


def test_callbacks_replaced_by_a_tuple_are_said_to_drop_the_limiter(enabled_cleanup: None,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A tuple cannot take the limiter back: it was dropped silently while ``enabled_limiter()``
    still reported it (found by helper-61). It is now said, and forgotten; enable() restores it."""
    assert enable(CONFIG) in litellm.callbacks
    with caplog.at_level("WARNING", logger="hive_ratelimit_plugin"):
        litellm.callbacks = (Mine(),)  # type: ignore[assignment]
    assert "no longer limited" in caplog.text
    assert _enable.enabled_limiter() is None
    litellm.callbacks = [Mine()]
    restored = enable(CONFIG)
    assert restored in litellm.callbacks and hive_limiters() == [restored]


def test_unregister_is_respected(enabled_cleanup: None) -> None:
    """unregister(limiter) / LiteLLM's callback manager remove it on purpose: no re-attach."""
    limiter = enable(CONFIG)
    unregister(limiter)
    assert hive_limiters() == []
    litellm.callbacks = [Mine()]  # already gone before this replacement: not brought back
    assert hive_limiters() == []
    assert enable(CONFIG) is limiter and hive_limiters() == [limiter]  # enable() brings it back


def test_litellm_callback_manager_reset_is_respected(enabled_cleanup: None, caplog: pytest.LogCaptureFixture) -> None:
    names = ("input_callback", "success_callback", "failure_callback", "_async_success_callback",
             "_async_failure_callback")
    saved = {n: list(getattr(litellm, n)) for n in names}
    enable(CONFIG)
    try:
        with caplog.at_level("WARNING", logger="hive_ratelimit_plugin"):
            litellm.logging_callback_manager._reset_all_callbacks()
    finally:
        for n, lst in saved.items():
            getattr(litellm, n)[:] = lst
    assert hive_limiters() == []
    assert "no longer limited" in caplog.text
    assert _enable.enabled_limiter() is None


def test_disable_cancels_a_pending_autoload(monkeypatch: pytest.MonkeyPatch) -> None:
    """disable() before LiteLLM is imported: the hook leaves sys.meta_path."""
    hook = _autoload.LiteLLMImportHook(lambda module: None)
    monkeypatch.setattr(_autoload, "_hook", hook)
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    assert _autoload.installed()
    disable()
    assert not _autoload.installed() and hook not in sys.meta_path


@pytest.mark.parametrize("first", ["from hive_ratelimit_plugin import HiveLimiter",
                                   "import hive_ratelimit_plugin.plugin"])
def test_importing_the_limiter_wraps_litellms_entry_points_before_any_limiter_exists(first: str) -> None:
    """docs/architecture.md: code that binds ``from litellm import completion`` after importing the
    limiter (before it builds one) must still get the guard, or its sync calls go unlimited."""
    import subprocess
    import sys

    code = (f"{first}\n"
            "import litellm\n"
            "from litellm import completion, acompletion, embedding, text_completion, responses, aresponses\n"
            "print(all(getattr(f, '__hive_ratelimit_guard__', False) for f in "
            "(completion, acompletion, embedding, text_completion, responses, aresponses, "
            "litellm.anthropic.messages.acreate, litellm.anthropic_messages)))\n")
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    env = {k: v for k, v in env.items() if not k.startswith("HIVE_RATELIMIT_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"
