"""A separate process that spends money through HiveLimiter (for persistence tests).

Usage: python tests/spend_worker.py STATE_PATH CALLS TAG
Prints "settled <n> <cumulative cost>" after each call, flushed, so a parent can kill it mid-run.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import litellm

from hive_ratelimit_plugin import HiveLimiter
from hive_ratelimit_plugin.testing import FakeProvider


def main() -> None:
    state_path, calls, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    litellm.suppress_debug_info = True
    limiter = HiveLimiter({
        "state_path": state_path,
        "budget": {"max_monthly_spend": 1_000_000},
        "pricing": {"gpt-4o-mini": {"input_per_million": 1_000_000, "output_per_million": 1_000_000}},
        "runaway": {"enabled": False},
    })
    litellm.callbacks.append(limiter)
    total = 0.0
    with FakeProvider() as provider:
        print("ready", flush=True)
        for n in range(1, calls + 1):
            resp = litellm.completion(model="openai/gpt-4o-mini", api_base=provider.url, api_key="sk-x",
                                      messages=[{"role": "user", "content": "hello there"}], max_tokens=5,
                                      metadata={"agent_id": tag}, max_retries=0)
            total += resp.usage.prompt_tokens + resp.usage.completion_tokens
            print(f"settled {n} {total}", flush=True)


if __name__ == "__main__":
    main()
