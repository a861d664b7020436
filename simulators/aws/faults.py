"""Injected API faults, so that an adapter's retry and error handling can be tested.

A fault rule matches EC2 actions (all, or a list) and fires for the next `count` matching calls
or at random with probability `rate`. Kinds: `RequestLimitExceeded` (HTTP 503, EC2's
throttling), `InternalError` (500), `Unavailable` (503), any other EC2 error code (400), and
`timeout` (the call hangs for `delay` seconds, then fails with 500).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any


@dataclass
class FaultRule:
    code: str
    actions: frozenset[str] | None = None  # None = every EC2 action
    count: int | None = None  # fire for this many calls, then retire
    rate: float | None = None  # or fire at random with this probability
    delay: float = 30.0  # for "timeout"
    message: str = ""

    def matches(self, action: str) -> bool:
        return self.actions is None or action in self.actions

    def as_json(self) -> dict[str, Any]:
        return {
            "code": self.code, "actions": sorted(self.actions) if self.actions else None,
            "count": self.count, "rate": self.rate, "delay": self.delay,
        }


class Faults:
    def __init__(self, seed: int | None = None) -> None:
        self.rules: list[FaultRule] = []
        self._random = random.Random(seed)

    def add(self, body: dict[str, Any]) -> FaultRule:
        code = str(body.get("code") or body.get("kind") or "")
        if not code:
            raise ValueError("a fault needs a 'code' (RequestLimitExceeded, InternalError, timeout, ...)")
        count = body.get("count")
        rate = body.get("rate")
        if count is None and rate is None:
            count = 1
        if rate is not None and not 0.0 <= float(rate) <= 1.0:
            raise ValueError("rate must be between 0 and 1")
        actions = body.get("actions")
        rule = FaultRule(
            code=code,
            actions=frozenset(str(a) for a in actions) if actions else None,
            count=int(count) if count is not None else None,
            rate=float(rate) if rate is not None else None,
            delay=float(body.get("delay", 30.0)),
            message=str(body.get("message") or ""),
        )
        self.rules.append(rule)
        return rule

    def clear(self) -> None:
        self.rules.clear()

    def take(self, action: str) -> FaultRule | None:
        """The fault to inject into this call, if any (consumes one of a counted rule)."""
        for rule in list(self.rules):
            if not rule.matches(action):
                continue
            if rule.count is not None:
                rule.count -= 1
                if rule.count <= 0:
                    self.rules.remove(rule)
                return rule
            if rule.rate is not None and self._random.random() < rule.rate:
                return rule
        return None


DEFAULT_MESSAGES = {
    "RequestLimitExceeded": "Request limit exceeded.",
    "InternalError": "An internal error has occurred",
    "Unavailable": "The server is overloaded and can't handle the request.",
}
