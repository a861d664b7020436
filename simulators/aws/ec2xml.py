"""EC2 Query-API wire format for the answers the simulator gives itself instead of moto.

EC2 speaks form-encoded requests and XML responses in one namespace; errors are a `<Response>`
with an `<Errors>` list and HTTP 400 (client faults) or 5xx (throttling is 503). botocore turns
these into `ClientError` with the `Code`, so the tests (and the adapter) see what EC2 would send.
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"

# code -> HTTP status, as EC2 answers them
ERROR_STATUS = {
    "RequestLimitExceeded": 503,
    "Unavailable": 503,
    "InternalError": 500,
    "InsufficientInstanceCapacity": 500,
    "AuthFailure": 401,
    "UnauthorizedOperation": 403,
}


def parse_params(query: str, body: bytes) -> dict[str, str]:
    """The flat `Name.N.Key=value` parameters of a Query-API request (URL and form body)."""
    params: dict[str, str] = {}
    for source in (query, body.decode("utf-8", "replace")):
        for key, values in parse_qs(source, keep_blank_values=True).items():
            params[key] = values[-1]
    return params


def indexed(params: dict[str, str], prefix: str) -> list[str]:
    """Values of `prefix.1`, `prefix.2`, ... (EC2's list encoding)."""
    out = []
    i = 1
    while f"{prefix}.{i}" in params:
        out.append(params[f"{prefix}.{i}"])
        i += 1
    return out


def request_id() -> str:
    return str(uuid.uuid4())


def error_xml(code: str, message: str) -> tuple[int, str]:
    status = ERROR_STATUS.get(code, 400)
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"</Error></Errors><RequestID>{request_id()}</RequestID></Response>"
    )
    return status, body


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def spot_price_history_xml(rows: list[tuple[str, str, float, float]], next_token: str) -> str:
    items = "".join(
        "<item>"
        f"<instanceType>{escape(t)}</instanceType>"
        "<productDescription>Linux/UNIX</productDescription>"
        f"<spotPrice>{price:.6f}</spotPrice>"
        f"<timestamp>{iso(ts)}</timestamp>"
        f"<availabilityZone>{escape(zone)}</availabilityZone>"
        "</item>"
        for t, zone, ts, price in rows
    )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<DescribeSpotPriceHistoryResponse xmlns="{EC2_NS}">'
        f"<requestId>{request_id()}</requestId><spotPriceHistorySet>{items}</spotPriceHistorySet>"
        f"<nextToken>{escape(next_token)}</nextToken></DescribeSpotPriceHistoryResponse>"
    )


def terminate_xml(changes: list[tuple[str, tuple[int, str], tuple[int, str]]]) -> str:
    """changes: (instance id, (previous code, name), (current code, name))."""
    items = "".join(
        f"<item><instanceId>{escape(iid)}</instanceId>"
        f"<currentState><code>{cur[0]}</code><name>{cur[1]}</name></currentState>"
        f"<previousState><code>{prev[0]}</code><name>{prev[1]}</name></previousState></item>"
        for iid, prev, cur in changes
    )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<TerminateInstancesResponse xmlns="{EC2_NS}">'
        f"<requestId>{request_id()}</requestId><instancesSet>{items}</instancesSet>"
        "</TerminateInstancesResponse>"
    )


def console_output_xml(instance_id: str, output_b64: str) -> str:
    output = f"<output>{output_b64}</output>" if output_b64 else ""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<GetConsoleOutputResponse xmlns="{EC2_NS}">'
        f"<requestId>{request_id()}</requestId><instanceId>{escape(instance_id)}</instanceId>"
        f"<timestamp>{iso(datetime.now(UTC).timestamp())}</timestamp>{output}</GetConsoleOutputResponse>"
    )


def empty_describe_xml() -> str:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<DescribeInstancesResponse xmlns="{EC2_NS}">'
        f"<requestId>{request_id()}</requestId><reservationSet/></DescribeInstancesResponse>"
    )


def run_instances_from_describe(describe_body: bytes) -> str | None:
    """Turn moto's DescribeInstances answer for one reservation into the RunInstances answer EC2
    repeats for a ClientToken it has seen before."""
    root = ET.fromstring(describe_body)
    item = root.find("{*}reservationSet/{*}item")
    if item is None:
        return None
    for el in item.iter():  # drop the namespace; it is set once on the new root
        el.tag = el.tag.rsplit("}", 1)[-1]
    out = ET.Element("RunInstancesResponse", {"xmlns": EC2_NS})
    ET.SubElement(out, "requestId").text = request_id()
    for child in list(item):
        out.append(child)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(out, encoding="unicode")


def xml_values(body: bytes, tag: str) -> list[str]:
    """Text of every element named `tag` (any depth) in an EC2 answer."""
    root = ET.fromstring(body)
    return [el.text or "" for el in root.findall(f".//{{*}}{tag}")]


def pending_run_response(body: bytes) -> bytes:
    """moto reports new instances as running at once; EC2 says pending until they boot."""
    text = body.decode("utf-8")
    text = text.replace(
        "<instanceState><code>16</code><name>running</name></instanceState>",
        "<instanceState><code>0</code><name>pending</name></instanceState>",
    )
    return text.encode("utf-8")
