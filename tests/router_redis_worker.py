"""One process with its own HiveLimiter and ``litellm.Router``, sharing limits through Redis with
others (tests/test_router_cancel_redis_hostile.py).

Usage: python tests/router_redis_worker.py CONFIG_JSON MODEL_LIST_JSON
Prints "ready", then reads one JSON command per line on stdin and answers each with one JSON line:
  {"op": "call", "id": ID, "kw": {...}}  start ``router.acompletion(messages=..., **kw)``; answers
                                          {"id": ID, "result": "ok" or the exception's type name}
                                          once the call ends
  {"op": "cancel", "id": ID}             cancel that call (its answer then says CancelledError)
  {"op": "stats"}                        {"stats": {"in_flight", "queued", "leases", "requests"}}
  {"op": "quit"}
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import litellm

from hive_ratelimit_plugin import HiveLimiter

MESSAGES = [{"role": "user", "content": "hello there"}]


def say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main() -> None:
    config, model_list = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    litellm.suppress_debug_info = True
    limiter = HiveLimiter(config)
    litellm.callbacks.append(limiter)
    router = litellm.Router(model_list=model_list, num_retries=0)
    tasks: dict[str, asyncio.Task[None]] = {}

    async def call(call_id: str, kw: dict[str, Any]) -> None:
        try:
            await router.acompletion(messages=MESSAGES, **kw)
            result = "ok"
        except BaseException as exc:  # (reported to the parent, cancellation too)
            result = type(exc).__name__
        say({"id": call_id, "result": result})

    loop = asyncio.get_running_loop()
    say({"ready": True})
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        cmd = json.loads(line)
        if cmd["op"] == "call":
            tasks[cmd["id"]] = asyncio.ensure_future(call(cmd["id"], cmd.get("kw", {})))
        elif cmd["op"] == "cancel":
            tasks[cmd["id"]].cancel()
        elif cmd["op"] == "stats":
            stats = limiter.get_usage_stats()
            g = stats["levels"]["global"]["global"]
            say({"stats": {"in_flight": g["in_flight"], "queued": stats["queued"],
                           "leases": len(limiter._engine._leases),
                           "requests": g.get("requests_per_minute", {}).get("used")}})
        elif cmd["op"] == "quit":
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            return


if __name__ == "__main__":
    asyncio.run(main())
