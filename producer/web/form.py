"""Request bodies for the HTTP API: a size-capped read, and multipart uploads as
SDK items. The media type of an upload is found by decoding its bytes; the
filename and the part's Content-Type are never trusted."""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.config import Settings
from core.errors import InvalidInput
from core.inputs import sniff_modality
from core.jobs import TASKS
from producer.web.errors import ApiError

FORM_FIELDS = {"modality", "task", "labels", "top_k", "timeout_s", "model_version", "file",
               "files", "webhook_url", "webhook_embedding"}


FORM_TYPES = ("application/json", "multipart/form-data")


def content_kind(request: Request, refusal: str) -> str:
    """The request's media type, one of ``FORM_TYPES``, or a 415 that says ``refusal``."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in FORM_TYPES:
        raise ApiError(415, "unsupported_media_type", refusal)
    return ctype


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing it (413) as soon as it passes ``limit`` bytes: a declared
    Content-Length is checked before reading, a chunked body while it streams."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise _too_large(n, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(n: int, limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"request body is over the limit of "
                    f"{limit} bytes (at least {n})")


async def upload_items(request: Request, body: bytes, *, batch: bool,
                       settings: Settings) -> list[dict]:
    # Starlette's form parser replays a body the request has cached, so the capped
    # read above is what it parses (nothing unbounded is spooled to disk first).
    request._body = body
    try:
        form = await request.form(max_files=settings.max_batch_items, max_fields=64)
    except (UnicodeDecodeError, ValueError) as e:  # a field's bytes in no usable charset
        raise _invalid(f"unreadable form field: {e}") from None
    except StarletteHTTPException as e:  # Starlette's plain 400 for a form it refused
        raise _form_refused(str(e.detail), settings.max_batch_items) from None
    files = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    unknown = sorted(set(k for k, _ in form.multi_items()) - FORM_FIELDS)
    if unknown:
        raise _invalid(f"unknown form field(s): {', '.join(unknown)}")
    want = "files" if batch else "file"
    if batch and not files:
        raise _invalid("a batch upload needs one or more files in the 'files' field")
    if not batch and (len(files) != 1 or files[0][0] != "file"):
        raise _invalid("upload exactly one file in the 'file' field (many: /v1/jobs:batch)")
    if any(k not in ("file", "files") for k, _ in files) or (
            batch and any(k != want for k, _ in files)):
        raise _invalid(f"files go in the '{want}' field")
    common = _common_fields(fields, form.getlist("labels"))
    items = []
    for index, (_, f) in enumerate(files):
        data = await f.read()
        if not data:  # refused here: sniffing nothing would say "unsupported" (415)
            raise ApiError(422, "invalid_input", f"item {index}: file is empty (0 bytes)",
                           details=[{"item": index}])
        if len(data) > settings.max_payload_bytes:
            raise ApiError(413, "payload_too_large", f"item {index}: file is {len(data)} "
                           f"bytes, over the limit of {settings.max_payload_bytes}",
                           details=[{"item": index}])
        try:
            modality = common["modality"] or sniff_modality(data, index)
        except InvalidInput as e:  # a 415, named as the JSON route names it
            raise ApiError(415, "unsupported_media_type", str(e),
                           details=[{"item": index}]) from None
        items.append({**common, "modality": modality, "input": data})
    return items


def _common_fields(fields: dict[str, str], labels: list) -> dict:
    modality = fields.get("modality") or None
    if modality not in (None, "image", "audio"):
        raise _invalid("modality: uploads are image or audio (text jobs are JSON)")
    task = fields.get("task", "embed")
    if task not in TASKS:
        raise _invalid(f"task: must be one of {', '.join(TASKS)}, got {task!r}")
    # labels=a,b,c or repeated labels=a&labels=b: both are what people send.
    names = [p.strip() for v in labels if isinstance(v, str) for p in v.split(",")]
    out = {"modality": modality, "task": task, "labels": [n for n in names if n] or None,
           "model_version": fields.get("model_version") or None}
    if fields.get("webhook_url"):
        flag = fields.get("webhook_embedding", "false").strip().lower()
        if flag not in ("", "true", "false", "1", "0"):
            raise _invalid(f"webhook_embedding: true or false, got {flag!r}")
        out |= {"webhook_url": fields["webhook_url"],
                "webhook_embedding": flag in ("true", "1")}
    # Parsed here, bounded by the SDK (core/params.py): one bound for JSON and forms.
    for name, kind, what in (("top_k", int, "an integer"), ("timeout_s", float, "a number")):
        if fields.get(name) not in (None, ""):
            try:
                out[name] = kind(fields[name])
            except ValueError:
                raise _invalid(f"{name}: not {what}: {fields[name]!r}") from None
    return out


def _form_refused(detail: str, max_files: int) -> ApiError:
    if detail.startswith("Too many files"):  # README: too many items is a 413
        return ApiError(413, "payload_too_large", f"more than {max_files} files in one "
                        f"request (the limit, MMQ_MAX_BATCH_ITEMS)")
    if detail.startswith("Field exceeded"):
        return ApiError(413, "payload_too_large", f"a form field is too large: {detail}")
    return _invalid(f"unreadable multipart form: {detail}")


def _invalid(message: str) -> ApiError:
    return ApiError(422, "invalid_input", message)
