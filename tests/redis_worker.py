"""One of several processes sharing limits through Redis (tests/test_redis_backend.py).

Usage: python tests/redis_worker.py CONFIG_JSON PROVIDER_URL TASKS CALLS_PER_TASK
Prints "ready", waits for a line on stdin (so that the processes start together), runs TASKS asyncio tasks
that each make
up to CALLS_PER_TASK calls, and prints one JSON line: {"ok": n, "budget": n, "other": [...], "sent": [wall times],
"admitted": [Redis times]}.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import litellm
from litellm.integrations.custom_logger import CustomLogger

from hive_ratelimit_plugin import HiveLimiter
from hive_ratelimit_plugin.errors import BudgetExceededError


async def main() -> None:
    config, url, tasks, calls = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    litellm.suppress_debug_info = True
    limiter = HiveLimiter(config)
    sent: list[float] = []

    class Sent(CustomLogger):  # when each admitted request is about to go out (wall clock)
        def log_pre_api_call(self, model: Any, messages: Any, kwargs: Any) -> None:
            sent.append(time.time())

    litellm.callbacks.extend([limiter, Sent()])
    # When Redis admitted each call, on Redis' clock (the one its windows use).
    engine: Any = limiter._engine
    admitted: list[float] = []
    release = engine.release

    def recording_release(call_id: str, **kwargs: Any) -> bool:
        res = engine._leases.get(call_id)
        if res is not None:
            admitted.append(res.admitted_at)
        return bool(release(call_id, **kwargs))

    engine.release = recording_release
    counts: dict[str, Any] = {"ok": 0, "budget": 0, "other": [], "sent": sent, "admitted": admitted}

    async def task(i: int) -> None:
        for _ in range(calls):
            try:
                await litellm.acompletion(model="openai/gpt-4o-mini", api_base=url, api_key="sk-x",
                                          messages=[{"role": "user", "content": "hello there"}], max_tokens=5,
                                          max_retries=0, metadata={"agent_id": f"worker-{os.getpid()}-{i}"})
                counts["ok"] += 1
            except BudgetExceededError:
                counts["budget"] += 1
                return
            except Exception as exc:  # reported to the parent, which fails the test
                counts["other"].append(f"{type(exc).__name__}: {exc}"[:200])
                return

    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # the parent says go
    await asyncio.gather(*(task(i) for i in range(tasks)))
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
