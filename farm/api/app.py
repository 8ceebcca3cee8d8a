"""The FastAPI app of ``farm api``: A1111-compatible routes, agent-scheduler's queue, the farm's own
``/v1/jobs``; every generation goes through ``Farm.submit_many`` (the one request path)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import time
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBasic, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from farm.api import a1111, campaigns, jobs, keys
from farm.api.config import ApiSettings
from farm.api.keys import ANONYMOUS, Caller
from farm.api.limits import RateLimiter, Waiter, retry_after
from farm.api.webhooks import WebhookSender
from farm.errors import FarmError, NotFound, StorageError, ValidationError
from farm.settings import Settings, redact

__all__ = ["create_app"]

log = logging.getLogger("farm.api")
_KEY_CACHE_SECONDS = 5.0
_KEY_CACHE_MAX = 10_000


# -- request bodies (A1111's field names; unknown fields are accepted and ignored) ----------------
class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Txt2Img(_Open):
    prompt: str = ""
    negative_prompt: str | None = None
    seed: int | None = -1
    batch_size: int | None = None
    n_iter: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    override_settings: dict[str, Any] | None = None
    enable_hr: bool | None = None
    alwayson_scripts: dict[str, Any] | None = None
    send_images: bool | None = None


class Img2Img(Txt2Img):
    init_images: list[str] = Field(default_factory=list, description="base64 PNG/JPEG/WebP (one)")
    mask: str | None = None
    mask_blur: int | None = None
    resize_mode: int | None = None
    denoising_strength: float | None = None
    inpainting_mask_invert: int | None = None


class QueuedTxt2Img(Txt2Img):
    callback_url: str | None = None
    checkpoint: str | None = None


class QueuedImg2Img(Img2Img):
    callback_url: str | None = None
    checkpoint: str | None = None


class JobRequest(BaseModel):
    """The farm's own request (``GenerationRequest``'s fields); images as base64."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    negative_prompt: str | None = None
    num_images: int | None = None
    seed: int | None = None
    seeds: list[int] | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    model: str | None = None
    init_image: str | None = None
    mask: str | None = None
    strength: float | None = None
    resize_mode: str | None = None
    mask_blur: int | None = None
    paste_back: bool | None = None
    clip_skip: int | None = None
    loras: list[Any] | None = None
    callback_url: str | None = None


class PngInfoRequest(BaseModel):
    image: str


# -- the app --------------------------------------------------------------------------------------
class _State:
    def __init__(self, farm, api: ApiSettings):
        self.farm = farm
        self.api = api
        self.limiter = RateLimiter()
        self.waiter = Waiter(farm, api.poll_interval)
        self.webhooks = WebhookSender(farm, api)
        self.anonymous_options: dict[str, Any] = {}
        self.key_cache: dict[str, tuple[float, Caller | None]] = {}
        self.submit_locks: dict[str | None, asyncio.Lock] = {}


def _loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413, by Content-Length or as they stream."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = True
                if too_big:
                    return await _refuse_large(send, self.limit)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _refuse_large(send, self.limit)


class _TooLarge(Exception):
    pass


async def _refuse_large(send, limit: int) -> None:
    body = f'{{"error":"TooLarge","detail":"request body over {limit} bytes (FARM_API_MAX_BODY_BYTES)"}}'.encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings | None = None, api_settings: ApiSettings | None = None, *, farm=None) -> FastAPI:
    """The API app on ``settings`` (default: ``FARM_*``) and ``api_settings`` (``FARM_API_*``).

    ``farm``: an open :class:`farm.Farm` to use (kept open); default: one opened at startup and
    closed at shutdown."""
    api = api_settings or ApiSettings()
    own_farm = farm is None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal farm
        if farm is None:
            from farm.client import Farm

            farm = Farm(settings or Settings())
        state = _State(farm, api)
        app.state.farm_api = state
        state.waiter.start()
        state.webhooks.start()
        try:
            yield
        finally:
            await state.waiter.stop()
            await state.webhooks.stop()
            if own_farm:
                farm.close()

    app = FastAPI(title="farm API", version="1", lifespan=lifespan,
                  description="AUTOMATIC1111-compatible API of the farm (docs/api.md)")
    app.add_middleware(_BodyLimit, limit=api.max_body_bytes)

    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
    basic = HTTPBasic(auto_error=False, description="HTTP Basic auth: any user, the key as password")

    def state_of(request: Request) -> _State:
        return request.app.state.farm_api

    async def caller(request: Request, _b=Depends(bearer), _c=Depends(basic)) -> Caller:
        state = state_of(request)
        if not api.auth:
            host = request.client.host if request.client else None
            if not _loopback(host):
                raise _Http(403, "Forbidden", "this farm api runs without keys (--no-auth): loopback clients only")
            return ANONYMOUS
        key = keys.key_from_header(request.headers.get("authorization"))
        if key is None:
            raise _Http(401, "Unauthorized", "an API key is needed: Authorization: Bearer KEY, or Basic auth with the key as password",
                        headers={"WWW-Authenticate": 'Bearer, Basic realm="farm"'})
        digest = keys.hash_key(key)
        cached = state.key_cache.get(digest)
        now = time.monotonic()
        if cached is None or cached[0] < now:
            found = await run_in_threadpool(keys.lookup, state.farm.sessions, key)
            if len(state.key_cache) >= _KEY_CACHE_MAX:  # bounded: made-up keys cannot grow it
                state.key_cache.clear()
            state.key_cache[digest] = cached = (now + _KEY_CACHE_SECONDS, found)
        who = cached[1]
        if who is None:
            raise _Http(401, "Unauthorized", "unknown or revoked API key", headers={"WWW-Authenticate": 'Bearer, Basic realm="farm"'})
        if who.rate:
            wait = state.limiter.take(who.id, who.rate)
            if wait:
                raise _Http(429, "TooManyRequests", f"rate limit of key {who.name!r}: {who.rate:g} request(s)/s",
                            headers={"Retry-After": retry_after(wait)})
        return who

    def options_of(state: _State, who: Caller) -> dict[str, Any]:
        return dict(state.anonymous_options if who.id is None else (who.options or {}))

    async def submit(state: _State, who: Caller, request: dict, kind: str, echo: dict, callback_url: str | None) -> str:
        lock = state.submit_locks.setdefault(who.id, asyncio.Lock())
        async with lock:
            if who.concurrency:
                running = await run_in_threadpool(jobs.unfinished_jobs, state.farm, who)
                if len(running) >= who.concurrency:
                    raise _Http(429, "TooManyRequests",
                                f"key {who.name!r} has {len(running)} unfinished job(s); its limit is {who.concurrency}",
                                headers={"Retry-After": "1"})
            return await run_in_threadpool(
                jobs.submit, state.farm, request, who, kind=kind, callback_url=callback_url, echo=echo
            )

    known = set(Img2Img.model_fields) | set(_ECHOED)

    def echo_of(payload: dict) -> dict:
        """The request as A1111 answers it in ``parameters``: its known fields (images left out)."""
        shown = {k: v for k, v in payload.items() if k in known and k not in ("init_images", "mask", "callback_url")}
        if isinstance(shown.get("override_settings"), dict):
            shown["override_settings"] = {
                k: v for k, v in shown["override_settings"].items() if k in ("sd_model_checkpoint", "CLIP_stop_at_last_layers")
            }
        if "init_images" in payload:
            shown["init_images"] = None
            shown["mask"] = None
        return shown

    async def a1111_sync(request: Request, body: Txt2Img, who: Caller, kind: str) -> Response:
        state = state_of(request)
        payload = body.model_dump()
        farm_request = a1111.to_request(payload, img2img=kind == "img2img", options=options_of(state, who))
        job_id = await submit(state, who, farm_request, kind, echo_of(payload), None)
        if not await state.waiter.wait(job_id, api.sync_timeout):
            return JSONResponse(status_code=504, content={
                "error": "Timeout", "job_id": job_id,
                "detail": f"not finished after {api.sync_timeout:g} s (FARM_API_SYNC_TIMEOUT); it goes on: GET /v1/jobs/{job_id}",
            })
        job = await run_in_threadpool(jobs.owned, state.farm, job_id, who)
        code, answer = await run_in_threadpool(jobs.a1111_answer, state.farm, job, send_images=payload.get("send_images") is not False)
        return JSONResponse(status_code=code, content=answer)

    # -- A1111 ------------------------------------------------------------------------------------
    @app.post("/sdapi/v1/txt2img", tags=["a1111"])
    async def txt2img(request: Request, body: Txt2Img, who: Caller = Depends(caller)):
        return await a1111_sync(request, body, who, "txt2img")

    @app.post("/sdapi/v1/img2img", tags=["a1111"])
    async def img2img(request: Request, body: Img2Img, who: Caller = Depends(caller)):
        return await a1111_sync(request, body, who, "img2img")

    @app.get("/sdapi/v1/sd-models", tags=["a1111"])
    async def sd_models(request: Request, who: Caller = Depends(caller)):
        settings_ = state_of(request).farm.settings
        return [
            {"title": name, "model_name": name, "hash": None, "sha256": None, "filename": redact(location), "config": None}
            for name, location in sorted(settings_.models.items())
        ]

    @app.get("/sdapi/v1/samplers", tags=["a1111"])
    async def samplers(who: Caller = Depends(caller)):
        return a1111.sampler_list()

    @app.get("/sdapi/v1/schedulers", tags=["a1111"])
    async def schedulers(who: Caller = Depends(caller)):
        return a1111.scheduler_list()

    @app.get("/sdapi/v1/loras", tags=["a1111"])
    async def loras(request: Request, who: Caller = Depends(caller)):
        records = await run_in_threadpool(state_of(request).farm.list_loras)
        return [{"name": r.name, "alias": r.name, "path": r.storage_key,
                 "metadata": {"sha256": r.sha256, "format": r.format, "base": r.base}} for r in records]

    @app.get("/sdapi/v1/options", tags=["a1111"])
    async def get_options(request: Request, who: Caller = Depends(caller)):
        state = state_of(request)
        options = options_of(state, who)
        return {
            "sd_model_checkpoint": options.get("sd_model_checkpoint") or state.farm.settings.default_model,
            "CLIP_stop_at_last_layers": options.get("CLIP_stop_at_last_layers", 1),
            "samples_format": "png",
        }

    @app.post("/sdapi/v1/options", tags=["a1111"])
    async def set_options(request: Request, body: dict[str, Any], who: Caller = Depends(caller)):
        state = state_of(request)
        changes: dict[str, Any] = {}
        if body.get("sd_model_checkpoint") is not None:
            name = a1111.model_of(body["sd_model_checkpoint"])
            changes["sd_model_checkpoint"] = state.farm.services.catalogue.check_name(name, field="sd_model_checkpoint")
        if body.get("CLIP_stop_at_last_layers") is not None:
            changes["CLIP_stop_at_last_layers"] = a1111.clip_skip_of(body["CLIP_stop_at_last_layers"])
        if changes:
            if who.id is None:
                state.anonymous_options.update(changes)
            else:
                await run_in_threadpool(_store_options, state.farm, who.id, changes)
                state.key_cache.clear()
        return None

    @app.get("/sdapi/v1/progress", tags=["a1111"])
    async def get_progress(request: Request, who: Caller = Depends(caller)):
        return await run_in_threadpool(jobs.progress, state_of(request).farm, who)

    @app.post("/sdapi/v1/interrupt", tags=["a1111"])
    async def interrupt(request: Request, who: Caller = Depends(caller)):
        count = await run_in_threadpool(jobs.cancel_unfinished, state_of(request).farm, who)
        return {"canceled_images": count}

    @app.post("/sdapi/v1/skip", tags=["a1111"])
    async def skip(who: Caller = Depends(caller)):
        return None

    @app.post("/sdapi/v1/png-info", tags=["a1111"])
    async def png_info(body: PngInfoRequest, who: Caller = Depends(caller)):
        from farm.imaging.pnginfo import read_png_metadata

        data = a1111.decode_image(body.image, "image")
        try:
            parameters, spec = read_png_metadata(data)
        except Exception as exc:  # noqa: BLE001 - not a PNG, a bomb, a bad chunk: the caller's input
            raise ValidationError("image", f"{len(data)} bytes", _line(str(exc)).split(":")[0] or "is not a readable PNG") from None
        items = {"farm": spec} if spec is not None else {}
        return {"info": parameters or "", "items": items, "parameters": a1111.parse_infotext(parameters) if parameters else {}}

    @app.get("/sdapi/v1/scripts", tags=["a1111"])
    async def scripts(who: Caller = Depends(caller)):
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/sd-vae", tags=["a1111"])
    async def sd_vae(who: Caller = Depends(caller)):
        return []

    @app.get("/sdapi/v1/upscalers", tags=["a1111"])
    async def upscalers(who: Caller = Depends(caller)):
        return []

    @app.post("/sdapi/v1/refresh-checkpoints", tags=["a1111"])
    async def refresh_checkpoints(who: Caller = Depends(caller)):
        return None

    # -- agent-scheduler's queue --------------------------------------------------------------------
    async def queue(request: Request, body: Txt2Img, who: Caller, kind: str) -> dict:
        state = state_of(request)
        payload = body.model_dump()
        callback = jobs.check_callback(payload.get("callback_url"))
        if payload.get("checkpoint"):
            payload.setdefault("override_settings", None)
            payload["override_settings"] = {**(payload["override_settings"] or {}), "sd_model_checkpoint": payload["checkpoint"]}
        farm_request = a1111.to_request(payload, img2img=kind == "img2img", options=options_of(state, who))
        job_id = await submit(state, who, farm_request, kind, echo_of(payload), callback)
        return {"task_id": job_id}

    @app.post("/agent-scheduler/v1/queue/txt2img", tags=["agent-scheduler"])
    async def queue_txt2img(request: Request, body: QueuedTxt2Img, who: Caller = Depends(caller)):
        return await queue(request, body, who, "txt2img")

    @app.post("/agent-scheduler/v1/queue/img2img", tags=["agent-scheduler"])
    async def queue_img2img(request: Request, body: QueuedImg2Img, who: Caller = Depends(caller)):
        return await queue(request, body, who, "img2img")

    @app.get("/agent-scheduler/v1/task/{task_id}", tags=["agent-scheduler"])
    async def task_status(request: Request, task_id: str, who: Caller = Depends(caller)):
        state = state_of(request)
        job = await run_in_threadpool(jobs.owned, state.farm, task_id, who)
        view = await run_in_threadpool(jobs.job_view, state.farm, job)
        status = {"queued": "pending", "running": "running", "succeeded": "done", "partial": "done"}.get(view["status"], view["status"])
        return {"success": True, "data": {"id": task_id, "status": status, "progress": view["progress"]}}

    @app.get("/agent-scheduler/v1/results/{task_id}", tags=["agent-scheduler"])
    async def task_results(request: Request, task_id: str, who: Caller = Depends(caller)):
        state = state_of(request)
        job = await run_in_threadpool(jobs.owned, state.farm, task_id, who)
        if not (await run_in_threadpool(jobs.finished, state.farm, [job.submission_id])):
            return {"success": False, "message": "Task is not completed"}
        code, answer = await run_in_threadpool(jobs.a1111_answer, state.farm, job)
        if code != 200:
            return {"success": False, "message": answer["detail"]}
        import json as _json

        info = _json.loads(answer["info"])
        return {"success": True, "data": [
            {"image": "data:image/png;base64," + image, "infotext": text}
            for image, text in zip(answer["images"], info["infotexts"])
        ]}

    # -- the farm's own jobs -------------------------------------------------------------------------
    @app.post("/v1/jobs", status_code=201, tags=["jobs"])
    async def create_job(request: Request, body: JobRequest, who: Caller = Depends(caller)):
        state = state_of(request)
        fields = {k: v for k, v in body.model_dump().items() if v is not None}
        callback = jobs.check_callback(fields.pop("callback_url", None))
        for name in ("init_image", "mask"):
            if name in fields:
                fields[name] = a1111.decode_image(fields[name], name)
        echo = {k: v for k, v in fields.items() if k not in ("init_image", "mask")}
        job_id = await submit(state, who, fields, "job", echo, callback)
        return {"id": job_id, "url": f"/v1/jobs/{job_id}"}

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    async def get_job(request: Request, job_id: str, who: Caller = Depends(caller)):
        state = state_of(request)
        job = await run_in_threadpool(jobs.owned, state.farm, job_id, who)
        return await run_in_threadpool(jobs.job_view, state.farm, job)

    @app.get("/v1/jobs/{job_id}/images/{position}", tags=["jobs"], response_class=Response,
             responses={200: {"content": {"image/png": {}}}})
    async def get_image(request: Request, job_id: str, position: int, who: Caller = Depends(caller)):
        state = state_of(request)
        job = await run_in_threadpool(jobs.owned, state.farm, job_id, who)
        data = await run_in_threadpool(jobs.image_png, state.farm, job, position)
        return Response(content=data, media_type="image/png")

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"])
    async def cancel_job(request: Request, job_id: str, who: Caller = Depends(caller)):
        state = state_of(request)
        job = await run_in_threadpool(jobs.owned, state.farm, job_id, who)
        count = await run_in_threadpool(lambda: state.farm.submission(job.submission_id).cancel())
        return {"canceled_images": count}

    # -- campaigns: a prompt file × sweeps, owned by the key that made it --------------------------------
    upload_limit = min(api.max_upload_bytes, api.max_body_bytes)

    async def read_upload(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > upload_limit:
            raise _Http(413, "TooLarge", f"upload over {upload_limit} bytes (FARM_API_MAX_UPLOAD_BYTES)")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > upload_limit:
                raise _Http(413, "TooLarge", f"upload over {upload_limit} bytes (FARM_API_MAX_UPLOAD_BYTES)")
        return bytes(body)

    _form = {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "name"],
        "properties": {
            "file": {"type": "string", "format": "binary", "description": "the prompt file: .jsonl, .csv or .parquet"},
            "name": {"type": "string", "description": "the campaign's name (re-submitting adds only what is new)"},
            "sweep": {"type": "array", "items": {"type": "string"}, "description": "FIELD=V1,V2,… (repeat the field)"},
            "priority": {"type": "integer", "minimum": 0, "maximum": 9},
            "dry_run": {"type": "boolean"},
        },
    }}}

    @app.post("/v1/campaigns", status_code=201, tags=["campaigns"],
              openapi_extra={"requestBody": {"required": True, "content": _form}})
    async def create_campaign(request: Request, who: Caller = Depends(caller)):
        state = state_of(request)
        body = await read_upload(request)
        upload = campaigns.parse_upload(request.headers.get("content-type"), body)
        del body
        answer = await run_in_threadpool(campaigns.submit, state.farm, who, upload)
        return JSONResponse(status_code=200 if answer["dry_run"] else 201, content=answer)

    @app.get("/v1/campaigns", tags=["campaigns"])
    async def list_campaigns(request: Request, who: Caller = Depends(caller)):
        return await run_in_threadpool(campaigns.listing, state_of(request).farm, who)

    @app.get("/v1/campaigns/{ref}", tags=["campaigns"])
    async def get_campaign(request: Request, ref: str, who: Caller = Depends(caller)):
        state = state_of(request)
        record = await run_in_threadpool(campaigns.owned, state.farm, ref, who)
        return await run_in_threadpool(campaigns.campaign_view, state.farm, record)

    @app.post("/v1/campaigns/{ref}/{action}", tags=["campaigns"])
    async def control_campaign(request: Request, ref: str, action: str, who: Caller = Depends(caller)):
        """``action``: pause, resume, cancel or retry-failed (what ``farm campaign ACTION`` does)."""
        state = state_of(request)
        record = await run_in_threadpool(campaigns.owned, state.farm, ref, who)
        return await run_in_threadpool(campaigns.control, state.farm, record, action)

    @app.get("/v1/campaigns/{ref}/export", tags=["campaigns"], response_class=Response,
             responses={200: {"content": {"application/x-tar": {}}}})
    async def export_campaign(request: Request, ref: str, format: str = "imagefolder", shard_size: int = 1000,
                              who: Caller = Depends(caller)):
        """The finished images as ``farm campaign export`` writes them, in one tar."""
        from starlette.background import BackgroundTask
        from starlette.responses import FileResponse

        state = state_of(request)
        record = await run_in_threadpool(campaigns.owned, state.farm, ref, who)
        path, count = await run_in_threadpool(
            campaigns.export_archive, state.farm, record, fmt=format, shard_size=shard_size
        )
        import shutil

        return FileResponse(
            path, media_type="application/x-tar", filename=f"{campaigns.archive_name(record.name)}-{format}.tar",
            headers={"X-Farm-Exported": str(count)},
            background=BackgroundTask(shutil.rmtree, path.parent, ignore_errors=True),
        )

    @app.get("/v1/campaigns/{ref}/manifest", tags=["campaigns"], response_class=Response,
             responses={200: {"content": {"application/x-ndjson": {}}}})
    async def campaign_manifest(request: Request, ref: str, expires: int = 3600, who: Caller = Depends(caller)):
        """One JSON line per finished image: its metadata and a URL (presigned on S3 storage)."""
        from starlette.responses import StreamingResponse

        state = state_of(request)
        if not 1 <= expires <= 7 * 24 * 3600:
            raise ValidationError("expires", expires, f"must be between 1 and {7 * 24 * 3600} seconds (7 days, S3's limit)")
        record = await run_in_threadpool(campaigns.owned, state.farm, ref, who)
        return StreamingResponse(campaigns.manifest_lines(state.farm, record, expires=expires), media_type="application/x-ndjson")

    @app.get("/v1/campaigns/{ref}/images/{image_id}", tags=["campaigns"], response_class=Response,
             responses={200: {"content": {"image/png": {}}}})
    async def campaign_image(request: Request, ref: str, image_id: str, who: Caller = Depends(caller)):
        state = state_of(request)
        record = await run_in_threadpool(campaigns.owned, state.farm, ref, who)
        data = await run_in_threadpool(campaigns.image_png, state.farm, record, image_id)
        return Response(content=data, media_type="image/png")

    @app.get("/healthz", tags=["meta"])
    async def healthz():
        return {"ok": True}

    # -- errors: one JSON line each, never a key, never a traceback ----------------------------------
    @app.exception_handler(_Http)
    async def _http(request: Request, exc: _Http):
        return JSONResponse(status_code=exc.status, content={"error": exc.error, "detail": exc.detail}, headers=exc.headers)

    @app.exception_handler(ValidationError)
    async def _invalid(request: Request, exc: ValidationError):
        return JSONResponse(status_code=422, content={"error": "ValidationError", "field": exc.field, "detail": _line(str(exc))})

    @app.exception_handler(campaigns.Conflict)
    async def _conflict(request: Request, exc: campaigns.Conflict):
        return JSONResponse(status_code=409, content={"error": "Conflict", "detail": _line(str(exc))})

    @app.exception_handler(NotFound)
    async def _missing(request: Request, exc: NotFound):
        return JSONResponse(status_code=404, content={"error": "NotFound", "detail": _line(str(exc))})

    @app.exception_handler(FarmError)
    async def _farm_error(request: Request, exc: FarmError):
        status = 503 if isinstance(exc, StorageError) else 500
        return JSONResponse(status_code=status, content={"error": type(exc).__name__, "detail": _line(str(exc))})

    return app


#: Payload fields echoed back in ``parameters`` besides the declared ones (A1111's own names).
_ECHOED = ("denoising_strength", "styles", "subseed", "subseed_strength", "restore_faces", "tiling", "eta",
           "disable_extra_networks", "inpaint_full_res", "inpainting_fill", "save_images")


class _Http(Exception):
    def __init__(self, status: int, error: str, detail: str, *, headers: dict[str, str] | None = None):
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


def _line(text: str) -> str:
    return " ".join(redact(text).split())


def _store_options(farm, key_id: str, changes: dict[str, Any]) -> None:
    from farm.db.tables import ApiKeyRecord

    with farm.sessions.begin() as session:
        record = session.get(ApiKeyRecord, key_id)
        record.options = {**(record.options or {}), **changes}
