"""Injected API faults, so that an adapter's retry and error handling can be tested.

A fault rule matches actions of one or more services (default: every EC2 action; `services`
names others, e.g. ["sqs", "events"]; `actions` narrows to some) and fires for the next `count`
matching calls or at random with probability `rate`. Kinds:

* `RequestLimitExceeded` (HTTP 503, EC2's throttling), `InternalError` (500), `Unavailable`
  (503), any other error code (400; auth codes 401/403): the call fails and does nothing;
* `timeout`: the call hangs for `delay` seconds, then fails with 500, having done nothing;
* `latency`: the call hangs for `delay` seconds and is then carried out as usual, whether or
  not the client is still waiting, as AWS does with a request it has accepted (a client whose
  read timeout is shorter gives up, and a RunInstances launches all the same).

`echo_credentials: true` makes the error message repeat the caller's access key id and session
token from the request, as a badly behaved proxy could; `message` replaces the default text.
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
    delay: float = 30.0  # for "timeout" and "latency"
    message: str = ""
    services: frozenset[str] = frozenset({"ec2"})
    echo_credentials: bool = False

    def matches(self, action: str, service: str = "ec2") -> bool:
        return service in self.services and (self.actions is None or action in self.actions)

    def as_json(self) -> dict[str, Any]:
        return {
            "code": self.code, "actions": sorted(self.actions) if self.actions else None,
            "count": self.count, "rate": self.rate, "delay": self.delay,
            "services": sorted(self.services), "echo_credentials": self.echo_credentials,
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
        services = body.get("services") or ["ec2"]
        if not isinstance(services, list) or not services:
            raise ValueError("services must be a list such as [\"ec2\", \"sqs\", \"events\"]")
        rule = FaultRule(
            code=code,
            actions=frozenset(str(a) for a in actions) if actions else None,
            count=int(count) if count is not None else None,
            rate=float(rate) if rate is not None else None,
            delay=float(body.get("delay", 30.0)),
            message=str(body.get("message") or ""),
            services=frozenset(str(x) for x in services),
            echo_credentials=bool(body.get("echo_credentials", False)),
        )
        self.rules.append(rule)
        return rule

    def clear(self) -> None:
        self.rules.clear()

    def take(self, action: str, service: str = "ec2") -> FaultRule | None:
        """The fault to inject into this call, if any (consumes one of a counted rule)."""
        for rule in list(self.rules):
            if not rule.matches(action, service):
                continue
            if rule.count is not None:
                rule.count -= 1
                if rule.count <= 0:
                    self.rules.remove(rule)
                return rule
            if rule.rate is not None and self._random.random() < rule.rate:
                return rule
        return None


AUTH_STATUS = {"AuthFailure": 401, "UnauthorizedOperation": 403, "InvalidClientTokenId": 403, "AccessDenied": 403}

DEFAULT_MESSAGES = {
    "RequestLimitExceeded": "Request limit exceeded.",
    "InternalError": "An internal error has occurred",
    "Unavailable": "The server is overloaded and can't handle the request.",
}


def error_message(rule: FaultRule, caller: str) -> str:
    """What the failed call says: the rule's text (or AWS's default), and the caller's
    credentials when the rule echoes them."""
    text = rule.message or DEFAULT_MESSAGES.get(rule.code, rule.code)
    if rule.echo_credentials:
        text += f" (request signed by {caller})"
    return text
