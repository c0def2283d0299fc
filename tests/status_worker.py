"""A separate process with a registered HiveLimiter that publishes status snapshots.

Usage: python tests/status_worker.py CONFIG_YAML API_BASE CALLS
Makes CALLS real LiteLLM calls against the fake provider at API_BASE, prints "done", then keeps
running (publishing its status) until its stdin is closed; then it exits normally.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import litellm

from hive_ratelimit_plugin import HiveLimiter


def main() -> None:
    config, api_base, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
    litellm.suppress_debug_info = True
    limiter = HiveLimiter(config)
    litellm.callbacks.append(limiter)
    for n in range(calls):
        litellm.completion(model="openai/gpt-4o-mini", api_base=api_base, api_key="sk-worker-SECRET-0123456789",
                           messages=[{"role": "user", "content": f"hello {n}"}], max_tokens=5,
                           metadata={"agent_id": "researcher"}, max_retries=0)
    print("done", flush=True)
    sys.stdin.read()  # until the parent closes our stdin


if __name__ == "__main__":
    main()
