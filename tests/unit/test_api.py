"""farm api without services: the A1111 → farm mapping, keys and auth headers, and the app on an
embedded farm with no worker (FastAPI's TestClient): auth, isolation, limits, errors."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from farm.api import a1111, keys
from farm.api.config import ApiSettings
from farm.api.webhooks import sign, verify
from farm.errors import ValidationError


# -- mapping ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sampler", "schedule", "farm_name"),
    [
        ("DPM++ 2M Karras", None, "dpmpp_2m_karras"), ("DPM++ 2M", "Karras", "dpmpp_2m_karras"),
        ("DPM++ 2M", "automatic", "dpmpp_2m"), ("Euler a", "automatic", "euler_a"), ("DDIM", None, "ddim"),
        ("PLMS", None, "pndm"), ("euler", "uniform", "euler"), ("UniPC", "", "unipc"), (None, None, None),
    ],
)
def test_a1111_sampler_names_map_to_the_farm_schedulers(sampler, schedule, farm_name) -> None:
    assert a1111.to_scheduler(sampler, schedule) == farm_name


@pytest.mark.parametrize(("sampler", "schedule", "field"), [
    ("DPM++ SDE", None, "sampler_name"), ("Euler a", "Karras", "scheduler"), ("Euler", "exponential", "scheduler"),
])
def test_unknown_samplers_and_schedules_are_refused_naming_the_field(sampler, schedule, field) -> None:
    with pytest.raises(ValidationError) as caught:
        a1111.to_scheduler(sampler, schedule)
    assert caught.value.field == field


def test_a_txt2img_payload_as_webuiapi_sends_it_maps_to_a_farm_request() -> None:
    payload = {  # webuiapi 0.9.17's defaults
        "enable_hr": False, "hr_scale": 2, "denoising_strength": 0.7, "prompt": "a red circle <lora:ink:0.5>",
        "styles": [], "seed": 7, "subseed": -1, "subseed_strength": 0.0, "seed_resize_from_h": 0,
        "seed_resize_from_w": 0, "batch_size": 2, "n_iter": 3, "steps": 4, "cfg_scale": 7.0, "width": 64,
        "height": 64, "restore_faces": False, "tiling": False, "negative_prompt": "blurry", "eta": 1.0,
        "override_settings": {"sd_model_checkpoint": "tiny [abcdef12]", "CLIP_stop_at_last_layers": 2},
        "sampler_name": "Euler a", "scheduler": "automatic", "sampler_index": "Euler a", "script_name": None,
        "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {}, "unknown_field": 1,
    }
    assert a1111.to_request(payload, img2img=False) == {
        "prompt": "a red circle", "negative_prompt": "blurry", "num_images": 6, "seed": 7, "steps": 4,
        "guidance_scale": 7.0, "width": 64, "height": 64, "scheduler": "euler_a", "model": "tiny", "clip_skip": 2,
        "loras": [{"name": "ink", "weight": 0.5}],
    }
    assert a1111.to_request({"prompt": "x", "seed": -1}, img2img=False)["seed"] is None
    # the caller's options are defaults; the payload's override_settings win
    assert a1111.to_request({"prompt": "x"}, img2img=False, options={"sd_model_checkpoint": "shapes"})["model"] == "shapes"


@pytest.mark.parametrize("field", ["enable_hr", "alwayson_scripts", "styles", "restore_faces", "script_name", "subseed_strength"])
def test_unsupported_features_are_refused_naming_the_field(field) -> None:
    value = {"enable_hr": True, "alwayson_scripts": {"ControlNet": {"args": []}}, "styles": ["x"], "restore_faces": True,
             "script_name": "xyz", "subseed_strength": 0.5}[field]
    with pytest.raises(ValidationError) as caught:
        a1111.to_request({"prompt": "x", field: value}, img2img=False)
    assert caught.value.field == field


def _png(size=(64, 64), colour=(200, 10, 10), mode="RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_img2img_maps_images_strength_resize_mode_and_an_inverted_mask() -> None:
    mask = _png(colour=0, mode="L")
    request = a1111.to_request(
        {"prompt": "x", "init_images": ["data:image/png;base64," + _png()], "mask": mask, "mask_blur": 4,
         "resize_mode": 1, "denoising_strength": 0.6, "inpainting_mask_invert": 1, "inpaint_full_res": True},
        img2img=True,
    )
    assert request["strength"] == 0.6 and request["resize_mode"] == "crop" and request["mask_blur"] == 4
    assert Image.open(io.BytesIO(request["init_image"])).size == (64, 64)
    assert Image.open(io.BytesIO(request["mask"])).getpixel((0, 0)) == 255  # inverted: black became white
    plain = a1111.to_request({"prompt": "x", "init_images": [_png()], "mask_blur": 4}, img2img=True)
    assert "mask_blur" not in plain and plain["strength"] == 0.75  # no mask: the blur means nothing
    with pytest.raises(ValidationError) as caught:
        a1111.to_request({"prompt": "x", "init_images": [_png()], "resize_mode": 3}, img2img=True)
    assert caught.value.field == "resize_mode"


def test_lora_tags_become_the_request_loras() -> None:
    assert a1111.lora_tags("a cat, <lora:ink:0.8>, <lora:green>") == (
        "a cat", [{"name": "ink", "weight": 0.8}, {"name": "green", "weight": 1.0}])
    with pytest.raises(ValidationError):
        a1111.lora_tags("<hypernet:x:1>")


def test_infotexts_parse_back() -> None:
    text = 'a cat\nNegative prompt: dog\nSteps: 4, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1, Size: 64x64, Model: "a, b"'
    parsed = a1111.parse_infotext(text)
    assert parsed["Prompt"] == "a cat" and parsed["Negative prompt"] == "dog" and parsed["Model"] == "a, b"


# -- keys --------------------------------------------------------------------------------------------
def test_keys_are_random_hashed_and_read_from_bearer_or_basic_headers() -> None:
    key = keys.new_key()
    assert key.startswith("farm_") and len(key) == 48 and keys.new_key() != key
    assert keys.hash_key(key) == __import__("hashlib").sha256(key.encode()).hexdigest()
    assert keys.key_from_header(f"Bearer {key}") == key
    basic = base64.b64encode(f"anyone:{key}".encode()).decode()
    assert keys.key_from_header(f"Basic {basic}") == key
    for bad in (None, "", "Bearer", f"Token {key}", "Bearer farm_short", "Basic !!!", "Basic " + base64.b64encode(key.encode()).decode()):
        assert keys.key_from_header(bad) is None
    assert keys.parse_rate("5/s") == 5 and keys.parse_rate("120/m") == 2 and keys.parse_rate(None) is None
    with pytest.raises(ValidationError):
        keys.parse_rate("fast")


def test_webhook_signatures_verify_and_expire() -> None:
    import time

    now = str(int(time.time()))
    signature = sign("secret", now, b"{}")
    assert verify("secret", now, b"{}", signature)
    assert not verify("other", now, b"{}", signature)
    assert not verify("secret", now, b"{ }", signature)
    old = str(int(time.time()) - 3600)
    assert not verify("secret", old, b"{}", sign("secret", old, b"{}"))


# -- the app on an embedded farm (no worker) ---------------------------------------------------------
@pytest.fixture
def api(embedded_farm):
    from fastapi.testclient import TestClient

    from farm.api import create_app

    app = create_app(api_settings=ApiSettings(sync_timeout=0.5, poll_interval=0.05, max_body_bytes=200_000,
                                              webhook_interval=3600), farm=embedded_farm)
    with TestClient(app) as client:
        yield client, embedded_farm


def _key(farm, name, **limits):
    record, key = keys.create(farm.sessions, name, **limits)
    return {"Authorization": f"Bearer {key}"}


JOB = {"prompt": "a red cube", "model": "tiny", "steps": 2, "width": 64, "height": 64}


def test_keys_are_required_and_each_key_sees_only_its_own_jobs(api) -> None:
    client, farm = api
    assert client.get("/sdapi/v1/sd-models").status_code == 401
    assert client.get("/sdapi/v1/sd-models", headers={"Authorization": "Bearer farm_" + "x" * 43}).status_code == 401
    alice, bob = _key(farm, "alice"), _key(farm, "bob")
    created = client.post("/v1/jobs", json=JOB, headers=alice)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    mine = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    assert mine["status"] == "queued" and mine["images"][0]["url"] is None
    assert client.get(f"/v1/jobs/{job_id}", headers=bob).status_code == 404
    assert client.delete(f"/v1/jobs/{job_id}", headers=bob).status_code == 404
    assert client.get(f"/agent-scheduler/v1/results/{job_id}", headers=bob).status_code == 404
    assert client.get("/sdapi/v1/progress", headers=bob).json()["state"]["job_count"] == 0
    assert client.get("/sdapi/v1/progress", headers=alice).json()["state"]["job_count"] == 1
    assert client.post("/sdapi/v1/interrupt", headers=bob).json() == {"canceled_images": 0}
    assert client.post("/sdapi/v1/interrupt", headers=alice).json() == {"canceled_images": 1}
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["status"] == "canceled"
    # Basic auth with the key as password (webuiapi's set_auth)
    user, _, token = alice["Authorization"].partition(" ")
    basic = base64.b64encode(f"me:{token}".encode()).decode()
    assert client.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    keys.revoke(farm.sessions, "bob")


def test_rate_and_concurrency_limits_answer_429_with_retry_after(api) -> None:
    client, farm = api
    slow = _key(farm, "slow", rate=0.5)
    assert client.get("/sdapi/v1/samplers", headers=slow).status_code == 200
    refused = client.get("/sdapi/v1/samplers", headers=slow)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    one = _key(farm, "one", concurrency=1)
    assert client.post("/v1/jobs", json=JOB, headers=one).status_code == 201
    refused = client.post("/v1/jobs", json=JOB, headers=one)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"


def test_farm_validation_errors_are_422_with_the_farm_message_and_bodies_are_capped(api) -> None:
    client, farm = api
    key = _key(farm, "k")
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 65, "height": 64}, headers=key)
    assert answer.status_code == 422 and answer.json()["field"] == "width" and "multiple of 8" in answer.json()["detail"]
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Nope"}, headers=key)
    assert answer.status_code == 422 and answer.json()["field"] == "sampler_name"
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "enable_hr": True}, headers=key)
    assert answer.status_code == 422 and answer.json()["field"] == "enable_hr"
    answer = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["bm90IGFuIGltYWdl"]}, headers=key)
    assert answer.status_code == 422 and answer.json()["field"] == "init_image"
    answer = client.post("/sdapi/v1/txt2img", content=b"{" + b" " * 300_000 + b"}", headers={**key, "Content-Type": "application/json"})
    assert answer.status_code == 413


def test_sync_requests_time_out_with_the_job_id_and_options_are_per_key(api) -> None:
    client, farm = api
    key, other = _key(farm, "k"), _key(farm, "other")
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64,
                                                    "override_settings": {"sd_model_checkpoint": "tiny"}}, headers=key)
    assert answer.status_code == 504 and client.get(f"/v1/jobs/{answer.json()['job_id']}", headers=key).status_code == 200
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}, headers=key).status_code == 422
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"}, headers=key).status_code == 200
    assert client.get("/sdapi/v1/options", headers=key).json()["sd_model_checkpoint"] == "tiny"
    assert client.get("/sdapi/v1/options", headers=other).json()["sd_model_checkpoint"] == farm.settings.default_model
    assert {m["title"] for m in client.get("/sdapi/v1/sd-models", headers=key).json()} == set(farm.settings.models)
    assert "DPM++ 2M Karras" in {s["name"] for s in client.get("/sdapi/v1/samplers", headers=key).json()}


def test_without_auth_only_loopback_clients_are_served(embedded_farm) -> None:
    from fastapi.testclient import TestClient

    from farm.api import create_app

    app = create_app(api_settings=ApiSettings(auth=False, webhook_interval=3600), farm=embedded_farm)
    with TestClient(app, client=("127.0.0.1", 5000)) as local:
        assert local.get("/sdapi/v1/sd-models").status_code == 200
    with TestClient(app, client=("10.1.2.3", 5000)) as remote:
        assert remote.get("/sdapi/v1/sd-models").status_code == 403


def test_png_info_reads_the_parameters_chunk(api) -> None:
    from farm.imaging.pnginfo import encode_png

    client, farm = api
    data = encode_png(Image.new("RGB", (8, 8)), parameters="a cat\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 3", spec={"seed": 3})
    answer = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(data).decode()}, headers=_key(farm, "k"))
    assert answer.status_code == 200
    assert answer.json()["parameters"]["Seed"] == "3" and answer.json()["items"]["farm"] == {"seed": 3}


def test_the_cli_makes_lists_and_revokes_keys(farm_settings) -> None:
    from click.testing import CliRunner

    from farm.cli.api import api_key

    runner = CliRunner()
    made = runner.invoke(api_key, ["create", "--name", "ci", "--rate", "5/s", "--concurrency", "2"])
    assert made.exit_code == 0, made.output
    key = made.output.strip().splitlines()[-1]
    assert keys.key_from_header(f"Bearer {key}") == key
    listed = runner.invoke(api_key, ["list"]).output
    assert "ci" in listed and "rate 5/s" in listed and key not in listed and "active" in listed
    assert runner.invoke(api_key, ["revoke", "ci"]).exit_code == 0
    assert "revoked" in runner.invoke(api_key, ["list"]).output


def test_lora_tags_in_a1111_prompts_resolve_against_the_registry(api) -> None:
    client, farm = api
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a cube <lora:nope:0.5>", "width": 64, "height": 64},
                         headers=_key(farm, "k"))
    assert answer.status_code == 422 and answer.json()["field"] == "loras[0]" and "nope" in answer.json()["detail"]


def test_farm_api_refuses_no_auth_on_a_non_loopback_host(farm_settings) -> None:
    from click.testing import CliRunner

    from farm.cli.api import api

    refused = CliRunner().invoke(api, ["--no-auth", "--host", "0.0.0.0"])
    assert refused.exit_code == 2 and "loopback" in refused.output


def test_webhooks_are_signed_retried_with_backoff_then_marked_failed(embedded_farm) -> None:
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from farm.api import jobs
    from farm.api.webhooks import WebhookSender
    from farm.db.tables import ApiJobRecord

    farm = embedded_farm
    record, _ = keys.create(farm.sessions, "hooks")
    caller = keys.lookup(farm.sessions, _)
    seen: list[tuple[dict, bytes]] = []
    answers = [500, 503, 200]

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            seen.append((dict(self.headers), self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(answers[len(seen) - 1])
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hook"
        job_id = jobs.submit(farm, JOB, caller, kind="job", callback_url=url)
        sender = WebhookSender(farm, ApiSettings(webhook_attempts=3, webhook_backoff=0.2, webhook_timeout=5))
        assert sender._due() == []  # not finished yet: nothing to announce
        farm.submission(job_id).cancel()
        assert sender._due() == [job_id]
        assert sender.deliver(job_id) is False and sender.deliver(job_id) is None  # backing off
        time.sleep(0.25)
        assert sender.deliver(job_id) is False
        time.sleep(0.45)
        assert sender.deliver(job_id) is True and sender._due() == []
        assert [h["X-Farm-Attempt"] for h, _ in seen] == ["1", "2", "3"]
        assert {h["X-Farm-Idempotency-Key"] for h, _ in seen} == {f"{job_id}:finished"}
        for headers, body in seen:
            assert verify(record.webhook_secret, headers["X-Farm-Timestamp"], body, headers["X-Farm-Signature"])
            assert json.loads(body)["job"]["status"] == "canceled"
        with farm.sessions() as session:
            assert session.get(ApiJobRecord, job_id).webhook_state == "delivered"
        # a receiver that never accepts: failed after the attempts
        answers[:] = [500] * 10
        seen.clear()
        other = jobs.submit(farm, JOB, caller, kind="job", callback_url=url)
        farm.submission(other).cancel()
        for _ in range(3):
            assert sender.deliver(other) is False
            with farm.sessions.begin() as session:
                session.get(ApiJobRecord, other).webhook_next_at = None  # skip the wait
        with farm.sessions() as session:
            job = session.get(ApiJobRecord, other)
        assert job.webhook_state == "failed" and job.webhook_attempts == 3 and "500" in job.webhook_error
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    "statuses, state",
    [
        (["succeeded", "succeeded"], "succeeded"),
        (["succeeded", "filtered"], "succeeded"),  # safety=drop withheld one: the job ran as asked
        (["filtered"], "succeeded"),
        (["succeeded", "running"], "running"),
        (["queued"], "queued"),
        (["succeeded", "failed"], "partial"),
        (["failed", "canceled"], "failed"),
        (["canceled"], "canceled"),
    ],
)
def test_job_state_counts_filtered_images_as_done(statuses: list[str], state: str) -> None:
    from types import SimpleNamespace

    from farm.api.jobs import _state

    assert _state([SimpleNamespace(status=status) for status in statuses]) == state


def test_farm_api_keeps_idle_connections_longer_than_client_pools(farm_cli, monkeypatch) -> None:
    """uvicorn's 5 s keep-alive made clients reuse connections the server was closing (bench/api_load.py
    lost requests with "Server disconnected without sending a response"); `farm api` serves with
    FARM_API_KEEP_ALIVE (75 s)."""
    import uvicorn

    calls: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: calls.append(kwargs))
    assert farm_cli("api", "--port", "7999").exit_code == 0
    assert calls[-1]["timeout_keep_alive"] == 75 and calls[-1]["host"] == "127.0.0.1"
    assert farm_cli("api", FARM_API_KEEP_ALIVE="20").exit_code == 0
    assert calls[-1]["timeout_keep_alive"] == 20
