"""The OpenAPI 3.1 document served at /v1/openapi.json. Request schemas come from the same
pydantic models the handlers validate with, so the document cannot drift from what the server
accepts; a test checks that every route is documented and every documented route exists."""

from __future__ import annotations

from functools import cache
from typing import Any

from orchestrator.models import JobSpec, JobStatus

ERROR = {"$ref": "#/components/schemas/Error"}
JOB = {"$ref": "#/components/schemas/Job"}


def _resp(description: str, schema: dict[str, Any] | None = None, ctype: str = "application/json") -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {ctype: {"schema": schema}}
    return out


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "Bad request", 401: "Missing or wrong token", 404: "No such job", 409: "Conflict",
            413: "Body too large", 422: "Invalid job spec"}
    return {str(c): _resp(text[c], ERROR) for c in codes}


JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[0-9a-f]{1,32}$"}}


@cache
def openapi_document() -> dict[str, Any]:
    spec_schema = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = spec_schema.pop("$defs", {})
    attempt = {
        "type": "object",
        "required": ["number", "provider", "instance_id", "status", "end_reason", "cost_usd"],
        "properties": {
            "number": {"type": "integer"}, "name": {"type": "string"}, "provider": {"type": "string"},
            "region": {"type": "string"}, "instance_id": {"type": ["string", "null"]},
            "volume_id": {"type": ["string", "null"]},
            "status": {"type": "string", "enum": ["pending", "launching", "running", "ended"]},
            "end_reason": {"type": ["string", "null"], "enum": [
                "succeeded", "failed", "preempted", "lost", "no_capacity", "cancelled", "budget", None]},
            "detail": {"type": "string"}, "exit_code": {"type": ["integer", "null"]},
            "cost_usd": {"type": "number"}, "price_per_hour": {"type": "number"},
            "capacity": {"type": "string"}, "gpu": {"type": ["string", "null"]},
            "placement_reason": {"type": "string"},
            "launched_at": {"type": ["string", "null"], "format": "date-time"},
            "ended_at": {"type": ["string", "null"], "format": "date-time"},
            "interruption_at": {"type": ["string", "null"], "format": "date-time"},
        },
    }
    job = {
        "type": "object",
        "required": ["id", "name", "status", "cost_usd", "end_reason", "attempts"],
        "properties": {
            "id": {"type": "string"}, "name": {"type": "string"},
            "status": {"type": "string", "enum": [s.value for s in JobStatus]},
            "end_reason": {"type": ["string", "null"]}, "message": {"type": "string"},
            "cost_usd": {"type": "number"}, "relaunches": {"type": "integer"}, "retries": {"type": "integer"},
            "created_at": {"type": "string", "format": "date-time"},
            "finished_at": {"type": ["string", "null"], "format": "date-time"},
            "spec": {"$ref": "#/components/schemas/JobSpec"},
            "attempts": {"type": "array", "items": {"$ref": "#/components/schemas/Attempt"}},
            "events": {"type": "array", "items": {"type": "object"}},
        },
    }
    auth: list[dict[str, list[str]]] = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "gpuhop", "version": "1",
                 "description": "Submit GPU jobs; gpuhop places them on the cheapest suitable capacity and "
                                "relaunches them from their checkpoint when a machine is taken away."},
        "security": auth,
        "paths": {
            "/healthz": {"get": {"summary": "Liveness of the daemon and its providers", "security": [],
                                 "responses": {"200": _resp("Healthy", {"type": "object"}),
                                               "503": _resp("Engine stalled", {"type": "object"})}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                                 "responses": {"200": _resp("Metrics", {"type": "string"}, "text/plain"),
                                               **_errors(401)}}},
            "/v1/openapi.json": {"get": {"summary": "This document", "responses": {"200": _resp("OpenAPI", {"type": "object"}), **_errors(401)}}},
            "/v1/jobs": {
                "post": {"summary": "Submit a job",
                         "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}}}},
                         "responses": {"201": _resp("Job accepted", JOB), **_errors(400, 401, 409, 413, 422)}},
                "get": {"summary": "List jobs, newest first",
                        "parameters": [
                            {"name": "status", "in": "query", "schema": {"type": "string"},
                             "description": "comma-separated statuses: " + ", ".join(s.value for s in JobStatus)},
                            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                        ],
                        "responses": {"200": _resp("Jobs", {"type": "object", "properties": {"jobs": {"type": "array", "items": JOB}}}),
                                      **_errors(400, 401)}},
            },
            "/v1/jobs/{job_id}": {"get": {"summary": "One job with its attempts and events", "parameters": [JOB_ID],
                                          "responses": {"200": _resp("Job", JOB), **_errors(401, 404)}}},
            "/v1/jobs/{job_id}/cancel": {"post": {"summary": "Cancel a job (its instances are stopped)", "parameters": [JOB_ID],
                                                  "responses": {"202": _resp("Cancel requested", JOB), **_errors(401, 404)}}},
            "/v1/jobs/{job_id}/logs": {"get": {
                "summary": "The job's output, every attempt in order",
                "parameters": [JOB_ID,
                               {"name": "tail", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                               {"name": "attempt", "in": "query", "schema": {"type": "integer"}},
                               {"name": "follow", "in": "query", "schema": {"type": "boolean"},
                                "description": "stream until the job ends"}],
                "responses": {"200": _resp("Output", {"type": "string"}, "text/plain"), **_errors(400, 401, 404)}}},
            "/v1/offers": {"get": {"summary": "Current offers from every provider, ranked by expected cost",
                                   "responses": {"200": _resp("Offers", {"type": "object"}), **_errors(401)}}},
            "/v1/agent/report": {"post": {
                "summary": "A job agent's report (start, heartbeat, exit, interruption); per-attempt token",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": {"200": _resp("Recorded", {"type": "object"}), **_errors(401, 404, 422)}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                **defs, "JobSpec": spec_schema, "Attempt": attempt, "Job": job,
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
            },
        },
    }
