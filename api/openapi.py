"""The OpenAPI document, completed: every error answer, every limit, and links between operations.

FastAPI derives the request and response models; this adds what it cannot know:

- the limits that are settings (sizes, steps, seeds, text lengths, object counts), so that the
  schema states exactly what a request may hold and a generated client or a fuzzer builds
  valid requests;
- the rule "a prompt is required unless a layout is given", the text rule (no control
  characters but tab and newline, not blank) and the id formats;
- each operation's error answers (401, 404, 409, 413, 429, 503, 507, ...) with ``ErrorBody``;
- what this deployment allows that a type cannot say (``refine: true`` only with a refiner),
  and how to send the API key (``securitySchemes``, on the operations that need one);
- links from a created job to its status, image, overlay, events, cancel and session.
"""

from __future__ import annotations

import copy

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.errors import ErrorBody
from layout_planner.layout import ID_PATTERN as OBJECT_ID_PATTERN
from lmd.settings import Settings

# JSON Schema patterns (ECMA 262 and Python's re read them alike; \uXXXX escapes, which generators understand).
# What layout_planner.text refuses: control characters but tab and newline (lone surrogates too,
# which a pattern cannot name portably: a generator drops a pattern with a surrogate range).
_REFUSED = r"\u0000-\u0008\u000b-\u001f\u007f-\u009f"
_ALLOWED_CHARS = rf"[^{_REFUSED}]"
TEXT_PATTERN = rf"^{_ALLOWED_CHARS}*$"
NON_BLANK_TEXT_PATTERN = rf"^{_ALLOWED_CHARS}*[^\s{_REFUSED}]{_ALLOWED_CHARS}*$"
ID_PATTERN = r"^[0-9a-f]{32}$"

_ERRORS = {
    400: "the body is not JSON",
    401: "missing or wrong API key (only when LMD_API_KEYS is set)",
    404: "unknown, expired, or another key's",
    408: "the body stalled longer than LMD_API_BODY_TIMEOUT_S between two reads",
    409: "conflict with the record's state (see the detail)",
    413: "the body is larger than 256 KiB",
    429: "a limit was reached (active jobs, request rate, open streams); retry after Retry-After",
    503: "the store or the queue is unreachable; retry after Retry-After",
    507: "the store is full; retry later",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}

# Which errors each operation can answer, by operationId (422 is FastAPI's own where bodies or parameters are read).
_OPERATION_ERRORS: dict[str, tuple[int, ...]] = {
    "generate": (400, 401, 404, 408, 409, 413, 429, 503, 507),
    "plan": (400, 401, 404, 408, 409, 413, 429, 503, 507),
    "get_mask": (401, 404, 409, 503),
    "get_report": (401, 404, 409, 503),
    "get_preview": (401, 404, 503),
    "limits": (),
    "instruct": (400, 401, 404, 408, 409, 413, 429, 503, 507),
    "get_job": (401, 404, 503),
    "get_image": (401, 404, 409, 503),
    "get_overlay": (401, 404, 409, 503),
    "cancel_job": (401, 404, 409, 503),
    "job_events": (401, 404, 429, 503),
    "get_session": (401, 404, 503),
    "list_sessions": (401, 503),
    "readyz": (503,),
    "metrics": (401, 503),
    "healthz": (),
}

_JOB_LINKS = {
    "GetJob": ("get_job", "job_id", "the job's state and progress"),
    "GetImage": ("get_image", "job_id", "the image, once the job has succeeded"),
    "GetOverlay": ("get_overlay", "job_id", "the image with the layout drawn on it"),
    "JobEvents": ("job_events", "job_id", "the job's progress as server-sent events"),
    "CancelJob": ("cancel_job", "job_id", "cancel the job"),
    "GetSession": ("get_session", "session_id", "the session the job belongs to"),
    "Instruct": ("instruct", "session_id", "revise the session's layout once the job has finished"),
}


def complete_openapi(app: FastAPI, settings: Settings) -> dict:
    """The app's OpenAPI document with this deployment's limits (built once, then cached)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                         description=app.description, routes=app.routes)
    schemas = schema["components"]["schemas"]
    schemas["ErrorBody"] = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    _limit_requests(schemas, settings)
    schema["components"]["securitySchemes"] = security_schemes()
    for path, methods in schema["paths"].items():
        for operation in methods.values():
            _complete_operation(operation, path)
            if (security := _security(operation.get("operationId", ""), settings)) is not None:
                operation["security"] = security
            if operation.get("operationId") in ("generate", "plan") and "422" in operation["responses"]:
                operation["responses"]["422"]["description"] = (
                    "a field breaks a rule or a limit (detail[].loc names it); also refine: true when this "
                    "deployment has no SDXL refiner (LMD_REFINER unset). A model or LoRA name this deployment "
                    "does not list is {code: unknown_model | unknown_lora, detail} (the schema's enums list them)")
    app.openapi_schema = schema
    return schema


def _nullable(prop: dict) -> dict:
    """The non-null branch of a FastAPI ``X | None`` property (the property itself otherwise)."""
    for branch in prop.get("anyOf", []):
        if branch.get("type") != "null":
            return branch
    return prop


def _limit_requests(schemas: dict, s: Settings) -> None:
    obj = schemas["LayoutObject"]["properties"]
    obj["id"].update(pattern=OBJECT_ID_PATTERN.pattern, minLength=1, maxLength=32)
    obj["phrase"].update(pattern=NON_BLANK_TEXT_PATTERN)
    for item in obj["box"].get("prefixItems", []):
        item.update(minimum=0.0, maximum=1.0)
    lay = schemas["Layout"]["properties"]
    for name in ("background", "negative"):
        lay[name]["pattern"] = TEXT_PATTERN
    schemas["LayoutWarning"]["properties"]["text"]["pattern"] = TEXT_PATTERN

    for name in ("GenerateRequest", "PlanRequest"):  # the render settings they share
        props = schemas[name]["properties"]
        _nullable(props["prompt"]).update(minLength=1, maxLength=s.max_prompt_chars, pattern=NON_BLANK_TEXT_PATTERN)
        _nullable(props["seed"]).update(minimum=0, maximum=s.max_seed)
        _nullable(props["steps"]).update(minimum=1, maximum=s.max_steps)
        for size in ("width", "height"):
            props[size].update(minimum=s.min_size, maximum=s.max_size, multipleOf=8)
        _nullable(props["negative_prompt"]).update(pattern=TEXT_PATTERN)
        _nullable(props["session_id"]).update(pattern=ID_PATTERN)
        if "language" in props:  # ISO 639-1, optionally with a region ("fr", "zh-CN")
            _nullable(props["language"]).update(pattern=r"^[A-Za-z]{2}([-_][A-Za-z0-9]{1,8})?$")
    gen = schemas["GenerateRequest"]["properties"]
    # A request's layout: at most LMD_MAX_OBJECTS objects (none: the background alone is rendered).
    request_layout = copy.deepcopy(schemas["Layout"])
    request_layout["properties"]["objects"].update(maxItems=s.max_objects)
    request_layout["required"] = sorted({*request_layout.get("required", []), "objects"})
    request_layout["title"] = "LayoutRequest"
    schemas["LayoutRequest"] = request_layout
    gen["layout"]["anyOf"] = [{"$ref": "#/components/schemas/LayoutRequest"}, {"type": "null"}]
    # "prompt is required unless a layout is given", each branch repeating its property in full
    # (generators merge the branch with the properties, and a bare {"type": "string"} loses the pattern).
    schemas["GenerateRequest"]["anyOf"] = [
        {"required": ["prompt"], "properties": {"prompt": copy.deepcopy(_nullable(gen["prompt"]))}},
        {"required": ["layout"], "properties": {"layout": {"$ref": "#/components/schemas/LayoutRequest"}}},
    ]
    schemas["GenerateRequest"]["description"] = "A prompt, or a layout (then the prompt may be left out), and render settings."

    for name in ("GenerateRequest", "PlanRequest"):
        _refine_as_deployed(schemas[name]["properties"]["refine"], s)
        _model_as_deployed(schemas[name]["properties"]["model"], s)
    _loras_as_deployed(schemas, s)

    ins = schemas["InstructRequest"]["properties"]
    ins["instruction"].update(minLength=1, maxLength=s.max_instruction_chars, pattern=NON_BLANK_TEXT_PATTERN)
    _nullable(ins["seed"]).update(minimum=0, maximum=s.max_seed)



def _refine_as_deployed(prop: dict, s: Settings) -> None:
    """``refine: true`` needs an SDXL refiner: without one (LMD_REFINER unset) the schema allows
    only false or null, so a generated client or a fuzzer knows before it meets the 422."""
    if s.refiner:
        return
    _nullable(prop).update(enum=[False])
    prop["description"] = ("finish with the SDXL refiner: this deployment has none (LMD_REFINER is unset), so only "
                           "false or null are accepted; true is a 422")


def _model_as_deployed(prop: dict, s: Settings) -> None:
    """``model``: a name of LMD_MODELS, or null; without the list, null only (another name is a 422 ``unknown_model``)."""
    if s.models:
        _nullable(prop).update(enum=list(s.models))
    else:
        prop.pop("anyOf", None)
        prop.update(type="null", description="this deployment renders one model (LMD_MODELS is unset): leave model out")


def _loras_as_deployed(schemas: dict, s: Settings) -> None:
    """A LoRA's ``name``: one of LMD_LORAS (another is a 422 ``unknown_lora``); without any, no adapters at all."""
    if s.loras:
        schemas["LoraRequest"]["properties"]["name"].update(enum=list(s.loras))
        return
    for name in ("GenerateRequest", "PlanRequest"):
        schemas[name]["properties"]["loras"]["maxItems"] = 0
    _nullable(schemas["InstructRequest"]["properties"]["loras"])["maxItems"] = 0


def security_schemes() -> dict:
    """The two ways to send an API key. Both headers sent: ``X-API-Key`` is the one read."""
    return {
        "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                   "description": "an LMD_API_KEYS key (LMD_OPS_KEYS for /metrics); when both this header and "
                                  "Authorization are sent, this one is read and Authorization is ignored"},
        "Bearer": {"type": "http", "scheme": "bearer",
                   "description": "Authorization: Bearer <key>, read only when X-API-Key is absent"},
    }


# Operations any caller may use without a key (readyz: with one, an operator sees the workers too).
_OPEN_OPERATIONS = {"healthz", "limits"}
_OPTIONAL_KEY_OPERATIONS = {"readyz"}


def _security(op_id: str, s: Settings) -> list[dict] | None:
    """The operation's security requirement in this deployment; None where keys are off."""
    if not (s.api_keys or s.ops_keys) or op_id in _OPEN_OPERATIONS:
        return None
    either = [{"ApiKey": []}, {"Bearer": []}]
    return [{}, *either] if op_id in _OPTIONAL_KEY_OPERATIONS else either


def _complete_operation(operation: dict, path: str) -> None:
    op_id = operation.get("operationId", "")
    responses = operation.setdefault("responses", {})
    # An operation not listed (added later) gets the errors every record lookup can answer.
    default = (401, 404, 409, 503) if "{" in path else (503,)
    for status in _OPERATION_ERRORS.get(op_id, default):
        response = {"description": _ERRORS[status],
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
        if status in (429, 503, 507):
            response["headers"] = dict(_RETRY_AFTER)
        responses.setdefault(str(status), response)
    for param in operation.get("parameters", []):
        if param["in"] == "path" and param["name"] in ("job_id", "session_id"):
            param["schema"].update(pattern=ID_PATTERN)
            param["description"] = f"the {param['name'].split('_')[0]}'s id: 32 lowercase hex digits"
        if param["in"] == "header" and param["name"].lower() == "idempotency-key":
            _nullable(param["schema"]).update(minLength=1, maxLength=200, pattern=r"^[!-~]+$")
    if op_id in ("generate", "plan", "instruct"):
        responses["202"]["links"] = {
            name: {"operationId": target, "parameters": {param: f"$response.body#/{param}"}, "description": text}
            for name, (target, param, text) in _JOB_LINKS.items()
        }
