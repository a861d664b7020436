"""Spot interruption warnings, seen from outside the instance: EventBridge routes EC2's
"EC2 Spot Instance Interruption Warning" events to an SQS queue per region, which the daemon
long-polls. This module creates that plumbing (idempotently) and parses the events.

EC2 sends the warning two minutes before the reclaim; the event carries only its own time, so
the deadline is that time plus the notice. A message is deleted once parsed (or found to be no
warning at all), so each notice is returned once.

With `rebalance_notices` the same rule also routes "EC2 Instance Rebalance Recommendation"
events (an instance at elevated risk, no reclaim announced yet). They come back as notices with
action "rebalance" and, as deadline, the earliest the instance could be taken (a warning that
has not come yet, plus its two minutes), so the engine prepares the replacement as early as it
can. Without it the rule's pattern leaves them out (put_rule rewrites the pattern either way).
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from adapters.aws.client import AwsApi
from adapters.base import Interruption

log = logging.getLogger(__name__)

DETAIL_TYPE = "EC2 Spot Instance Interruption Warning"
REBALANCE_DETAIL_TYPE = "EC2 Instance Rebalance Recommendation"
REBALANCE = "rebalance"  # the Interruption.action of a rebalance recommendation


def event_pattern(rebalance: bool) -> str:
    types = [DETAIL_TYPE, REBALANCE_DETAIL_TYPE] if rebalance else [DETAIL_TYPE]
    return json.dumps({"source": ["aws.ec2"], "detail-type": types})


def rule_name(queue: str) -> str:
    return f"{queue}-spot-warning"


async def ensure_plumbing(api: AwsApi, region: str, queue: str, rebalance: bool = False) -> str:
    """Create the queue, its policy, the rule and the target when missing; returns the queue URL."""
    created = await api.call("sqs", region, "create_queue", QueueName=queue)
    url = str(created["QueueUrl"])
    attrs = await api.call("sqs", region, "get_queue_attributes", QueueUrl=url, AttributeNames=["QueueArn"])
    queue_arn = str(attrs["Attributes"]["QueueArn"])
    rule = await api.call(
        "events", region, "put_rule", Name=rule_name(queue), EventPattern=event_pattern(rebalance),
        State="ENABLED", Description="gpuhop: spot interruption warnings to SQS",
    )
    policy = {
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "gpuhop-eventbridge",
            "Effect": "Allow",
            "Principal": {"Service": "events.amazonaws.com"},
            "Action": "sqs:SendMessage",
            "Resource": queue_arn,
            "Condition": {"ArnEquals": {"aws:SourceArn": rule["RuleArn"]}},
        }],
    }
    await api.call("sqs", region, "set_queue_attributes", QueueUrl=url, Attributes={"Policy": json.dumps(policy)})
    await api.call("events", region, "put_targets", Rule=rule_name(queue), Targets=[{"Id": "gpuhop-sqs", "Arn": queue_arn}])
    return url


def parse_event(body: str, notice_seconds: float, received: datetime) -> Interruption | None:
    try:
        event = json.loads(body)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("detail-type") not in (DETAIL_TYPE, REBALANCE_DETAIL_TYPE):
        return None
    detail = event.get("detail") or {}
    instance_id = detail.get("instance-id") if isinstance(detail, dict) else None
    if not instance_id:
        return None
    try:
        sent = datetime.fromisoformat(str(event.get("time", "")).replace("Z", "+00:00"))
    except ValueError:
        sent = received
    if sent.tzinfo is None:
        sent = sent.replace(tzinfo=UTC)
    if event.get("detail-type") == REBALANCE_DETAIL_TYPE:
        return Interruption(
            instance_id=str(instance_id), action=REBALANCE,
            deadline=max(sent, received) + timedelta(seconds=notice_seconds), received=received,
        )
    return Interruption(
        instance_id=str(instance_id),
        action=str(detail.get("instance-action") or "terminate"),
        deadline=sent + timedelta(seconds=notice_seconds),
        received=received,
    )


async def poll_queue(api: AwsApi, region: str, url: str, wait_seconds: float, notice_seconds: float) -> list[Interruption]:
    answer = await api.call(
        "sqs", region, "receive_message", QueueUrl=url, MaxNumberOfMessages=10,
        WaitTimeSeconds=max(0, min(20, int(wait_seconds + 0.999))),
    )
    messages: list[dict[str, Any]] = answer.get("Messages") or []
    received = datetime.now(UTC)
    found = []
    for message in messages:
        notice = parse_event(str(message.get("Body", "")), notice_seconds, received)
        if notice is None:
            log.warning("aws: dropping a message on %s that is no spot warning or rebalance recommendation", region)
        else:
            found.append(notice)
    if messages:
        entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
        await api.call("sqs", region, "delete_message_batch", QueueUrl=url, Entries=entries)
    return found


class Poller:
    """Long-polls every region's queue at once. A poll still waiting when the caller's time is
    up stays in flight and is collected by the next call, so no answer is dropped."""

    def __init__(self, api: AwsApi, notice_seconds: float) -> None:
        self.api = api
        self.notice_seconds = notice_seconds
        self.urls: dict[str, str] = {}
        self._inflight: dict[str, asyncio.Task[list[Interruption]]] = {}

    async def poll(self, wait_seconds: float) -> list[Interruption]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait_seconds)
        while True:
            remaining = max(0.0, deadline - loop.time())
            for region, url in self.urls.items():
                if region not in self._inflight:
                    self._inflight[region] = loop.create_task(
                        poll_queue(self.api, region, url, remaining, self.notice_seconds)
                    )
            await asyncio.wait(list(self._inflight.values()), timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            notices, errors = self._harvest()
            if notices:
                return notices
            if errors:
                raise errors[0]
            if loop.time() >= deadline:
                return []

    def _harvest(self) -> tuple[list[Interruption], list[BaseException]]:
        notices: list[Interruption] = []
        errors: list[BaseException] = []
        for region, task in list(self._inflight.items()):
            if not task.done():
                continue
            del self._inflight[region]
            if task.cancelled():
                continue
            error = task.exception()
            if error is not None:
                errors.append(error)
            else:
                notices.extend(task.result())
        for error in errors if notices else ():
            log.warning("aws: polling spot warnings failed in one region: %s", error)
        return notices, errors

    async def close(self) -> None:
        """Drop polls in flight; their messages become visible again after the queue's
        visibility timeout, so a notice is delayed, never lost."""
        for task in self._inflight.values():
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        self._inflight.clear()
