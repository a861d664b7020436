"""The OpenAPI 3.1 document served at /v1/openapi.json. Request AND response schemas are generated
from the same pydantic models the handlers validate with and serialize (orchestrator.api.views),
so the document cannot drift from what the server accepts or sends. tests/test_api.py checks
that every route is documented and every documented route exists, and a test replays every
documented response shape against the live server; bench/schemathesis_run.py fuzzes it."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from orchestrator.api import views, workdir_routes
from orchestrator.api.agent_routes import ATTEMPT_HEADER, AgentReport
from orchestrator.api.cursor import CURSOR_PATTERN
from orchestrator.api.sync_routes import CommitRequest, RestoreRequest, UploadRequest
from orchestrator.models import JobSpec, JobStatus

REF = "#/components/schemas/{model}"
STATUS_PATTERN = "^((" + "|".join(s.value for s in JobStatus) + ")(,(" + "|".join(s.value for s in JobStatus) + "))*)?$"
JOB_ID = {"name": "job_id", "in": "path", "required": True,
          "schema": {"type": "string", "pattern": "^[0-9a-f]{1,32}$"}}
# what a client can do next with a job it submitted (schemathesis follows these too)
JOB_LINKS = {
    name: {"operationId": op, "parameters": {"job_id": "$response.body#/id"}}
    for name, op in (("GetJob", "getJob"), ("CancelJob", "cancelJob"), ("JobLogs", "jobLogs"))
}
_ERROR_TEXT = {400: "Bad request (the message says what)", 401: "Missing or wrong token", 404: "No such job",
               409: "Conflict", 410: "The attempt has ended", 413: "Body too large",
               422: "Invalid content (the message names the field)", 429: "Too many log followers for this token",
               502: "The provider refused; nothing was changed (the message says what it said)",
               503: "The provider cannot be reached now; nothing was changed (see Retry-After)"}
VOLUME_NAME = {"name": "name", "in": "path", "required": True,
               "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"}}


def _resp(description: str, schema: dict[str, Any] | None = None, ctype: str = "application/json") -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {ctype: {"schema": schema}}
    return out


@cache
def openapi_document(providers: tuple[str, ...] = ()) -> dict[str, Any]:
    """The document; `providers` (the configured ones) become the enum of placement.providers."""
    wanted: list[tuple[type[BaseModel], Any]] = [
        (JobSpec, "validation"), (AgentReport, "validation"), (views.Job, "serialization"),
        (views.JobList, "serialization"), (views.Health, "serialization"), (views.Offers, "serialization"),
        (views.Status, "serialization"), (views.Costs, "serialization"), (views.Volumes, "serialization"),
        (views.DeletedVolume, "serialization"),
        (views.AgentAck, "serialization"), (views.Error, "serialization"),
        (RestoreRequest, "validation"), (UploadRequest, "validation"), (CommitRequest, "validation"),
    ]
    refs, top = models_json_schema(wanted, ref_template=REF)
    schemas: dict[str, Any] = top.get("$defs", {})
    if providers:
        for schema in schemas.values():
            if schema.get("title") == "Placement":
                any_of = schema["properties"]["providers"]["anyOf"]
                for option in any_of:
                    if option.get("type") == "array":
                        option["items"] = {"type": "string", "enum": list(providers)}

    def ref(model: type[BaseModel], mode: str = "serialization") -> dict[str, Any]:
        return dict(refs[(model, mode)])  # type: ignore[index]

    error = ref(views.Error)

    def errors(*codes: int) -> dict[str, Any]:
        return {str(c): _resp(_ERROR_TEXT[c], error) for c in codes}

    job = ref(views.Job)
    int_param = [
        {"name": "tail", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
         "description": "only the last N lines (0: all)"},
        {"name": "attempt", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
         "description": "only this attempt's output"},
        {"name": "follow", "in": "query", "schema": {"type": "boolean"},
         "description": "stream until the job ends"},
    ]
    return {
        "openapi": "3.1.0",
        "info": {"title": "gpuhop", "version": "1",
                 "description": "Submit GPU jobs; gpuhop places them on the cheapest suitable capacity and "
                                "relaunches them from their checkpoint when a machine is taken away."},
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": {"summary": "Liveness of the daemon and its providers", "security": [],
                                 "responses": {"200": _resp("Healthy", ref(views.Health)),
                                               "503": _resp("Engine stalled", ref(views.Health))}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                                 "responses": {"200": _resp("Metrics", {"type": "string"}, "text/plain"),
                                               **errors(401)}}},
            "/v1/openapi.json": {"get": {"summary": "This document",
                                         "responses": {"200": _resp("OpenAPI", {"type": "object"}), **errors(401)}}},
            "/v1/jobs": {
                "post": {"summary": "Submit a job",
                         "parameters": [{"name": "force", "in": "query",
                                         "schema": {"type": "string", "enum": ["true", "false"]},
                                         "description": "queue the job even when no configured provider "
                                                        "offers what it asks for (else 422 unsatisfiable)"},
                                        {"name": "reuse_volume", "in": "query",
                                         "schema": {"type": "string", "enum": ["true", "false"]},
                                         "description": "run on the named volume even when the newest job "
                                                        "that used it succeeded (else 409 volume_finished: "
                                                        "the job would resume from that job's final state)"}],
                         "requestBody": {"required": True, "content": {"application/json": {
                             "schema": ref(JobSpec, "validation")}}},
                         "responses": {"201": {**_resp("Job accepted", job), "links": JOB_LINKS},
                                       **errors(400, 401, 409, 413, 422)}},
                "get": {"summary": "List jobs, newest first",
                        "parameters": [
                            {"name": "status", "in": "query",
                             "schema": {"type": "string", "pattern": STATUS_PATTERN},
                             "description": "comma-separated statuses: " + ", ".join(s.value for s in JobStatus)},
                            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                            {"name": "cursor", "in": "query",
                             "schema": {"type": "string", "pattern": CURSOR_PATTERN, "maxLength": 200},
                             "description": "the previous page's next_cursor: the page after it"},
                        ],
                        "responses": {"200": _resp("Jobs", ref(views.JobList)), **errors(400, 401)}},
            },
            "/v1/jobs/{job_id}": {"get": {"operationId": "getJob", "summary": "One job with its attempts and events", "parameters": [JOB_ID],
                                          "responses": {"200": _resp("Job", job), **errors(401, 404)}}},
            "/v1/jobs/{job_id}/cancel": {"post": {"operationId": "cancelJob", "summary": "Cancel a job (its instances are stopped)",
                                                  "parameters": [JOB_ID],
                                                  "responses": {"202": _resp("Cancel requested", job),
                                                                **errors(401, 404)}}},
            "/v1/jobs/{job_id}/logs": {"get": {
                "operationId": "jobLogs", "summary": "The job's output, every attempt in order",
                "parameters": [JOB_ID, *int_param],
                "responses": {"200": _resp("Output", {"type": "string"}, "text/plain"),
                              **errors(400, 401, 404, 429)}}},
            "/v1/costs": {"get": {"summary": "What was spent, by provider, job or day, and saved against on-demand",
                                  "parameters": [
                                      {"name": "since", "in": "query",
                                       "schema": {"type": "string", "pattern": "^([0-9]{1,6}[mhd]|all)$"},
                                       "description": "a span back from now (30m, 24h, 7d) or all; default 30d"},
                                      {"name": "by", "in": "query",
                                       "schema": {"type": "string", "enum": ["provider", "job", "day"]}},
                                  ],
                                  "responses": {"200": _resp("Costs", ref(views.Costs)), **errors(400, 401)}}},
            "/v1/volumes": {"get": {"summary": "Network volumes: where each lives, the jobs that used it, its storage cost",
                                    "responses": {"200": _resp("Volumes", ref(views.Volumes)), **errors(401)}}},
            "/v1/volumes/{name}": {"delete": {
                "summary": "Delete a volume: at its provider, then here. Refused (409) while a job that has not "
                           "ended uses it; a provider failure (502, or 503 with Retry-After) keeps it",
                "parameters": [VOLUME_NAME],
                "responses": {"200": _resp("Deleted", ref(views.DeletedVolume)),
                              **errors(401, 404, 409, 502, 503)}}},
            "/": {"get": {"summary": "The web dashboard (its data comes from this API, with the token)", "security": [],
                          "responses": {"200": _resp("The dashboard page", {"type": "string"}, "text/html")}}},
            "/ui/{asset}": {"get": {
                "summary": "The dashboard's script and style", "security": [],
                "parameters": [{"name": "asset", "in": "path", "required": True,
                                "schema": {"type": "string", "enum": ["index.html", "app.js", "style.css"]}}],
                "responses": {"200": {"description": "The file", "content": {
                    ctype: {"schema": {"type": "string"}} for ctype in ("text/html", "text/javascript", "text/css")}},
                    **errors(401, 404)}}},
            "/v1/status": {"get": {"summary": "The daemon: version, uptime, loop, providers, jobs by status",
                                   "responses": {"200": _resp("Status", ref(views.Status)), **errors(401)}}},
            "/v1/offers": {"get": {"summary": "Current offers from every provider, ranked by expected cost",
                                   "responses": {"200": _resp("Offers", ref(views.Offers)), **errors(401)}}},
            "/v1/agent/report": {"post": {
                "summary": "A job agent's report (start, heartbeat, exit, interruption); per-attempt token",
                "security": [{"agent": []}],
                "parameters": [{"name": ATTEMPT_HEADER, "in": "header", "required": False,
                                "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"},
                                "description": "the attempt the token is for: lets the daemon check the "
                                               "token before it reads the body"}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": ref(AgentReport, "validation")}}},
                "responses": {"200": _resp("Recorded", ref(views.AgentAck)),
                              **errors(400, 401, 404, 409, 410, 413, 422)}}},
            **{f"/v1/agent/sync/{what}": {"post": {
                "summary": summary, "security": [{"agent": []}],
                "parameters": [{"name": ATTEMPT_HEADER, "in": "header", "required": True,
                                "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"}}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": ref(model, "validation")}}},
                "responses": {"200": _resp("Answer", {"type": "object"}), **errors(400, 401, 404, 409, 410, 413, 422, 503)},
            }} for what, model, summary in (
                ("restore", RestoreRequest, "The newest complete checkpoint of the attempt's volume, with presigned "
                                            "GET URLs (restore: false when the volume holds it already)"),
                ("upload", UploadRequest, "Presigned PUT URLs for the blobs object storage lacks"),
                ("commit", CommitRequest, "Commit a checkpoint once every blob is stored with its size (409 if not)"),
            )},
            **workdir_routes.openapi_paths(error),
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "the daemon's API token"},
                "agent": {"type": "http", "scheme": "bearer", "description": "the attempt's own token"},
            },
            "schemas": schemas,
        },
    }
