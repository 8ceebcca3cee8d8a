"""farm api's /v1/campaigns on an embedded farm (FastAPI's TestClient, no worker): a prompt file
upload × sweeps through the campaign code, status counts, isolation between keys, pause/resume/
cancel, the export (a tar of what `farm campaign export` writes) and the manifest, bad files as 422
with the campaign code's one line, and the owner rows written in the submit's own transaction."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image
from sqlalchemy import event, func, select

from farm import lifecycle
from farm.api import campaigns as api_campaigns
from farm.api import jobs as api_jobs
from farm.api import keys
from farm.api.config import ApiSettings
from farm.api.keys import Caller
from farm.db.tables import ApiCampaignRecord, ApiJobRecord, CampaignRecord, ImageRecord, SubmissionRecord

CSV = b"id,prompt,steps,width,height\nr1,a red circle,2,64,64\nr2,a blue square,2,64,64\n"


@pytest.fixture
def api(embedded_farm):
    from fastapi.testclient import TestClient

    from farm.api import create_app

    app = create_app(api_settings=ApiSettings(sync_timeout=0.5, poll_interval=0.05, max_body_bytes=200_000,
                                              max_upload_bytes=100_000, webhook_interval=3600), farm=embedded_farm)
    with TestClient(app) as client:
        yield client, embedded_farm


def _key(farm, name):
    _, key = keys.create(farm.sessions, name)
    return {"Authorization": f"Bearer {key}"}


def _upload(client, headers, name, content, filename="prompts.csv", **form):
    data = {"name": name, **form}
    return client.post("/v1/campaigns", headers=headers, data=data, files={"file": (filename, content, "text/csv")})


def _count(farm, model) -> int:
    with farm.sessions() as session:
        return session.scalar(select(func.count()).select_from(model))


def _render(farm, campaign_id: str) -> list[str]:
    """What a worker does, without one: claim the campaign's images, store a PNG each, record success."""
    with farm.sessions() as session:
        ids = list(session.scalars(select(ImageRecord.id).where(ImageRecord.campaign_id == campaign_id).order_by(ImageRecord.id)))
    claim = lifecycle.claim(farm.sessions, ids, worker="w", lease_seconds=60, max_attempts=5)
    for image_id in ids:
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, format="PNG")
        farm.storage.put(f"test/{image_id}.png", buffer.getvalue(), content_type="image/png")
        lifecycle.record_success(farm.sessions, claim.token, image_id, storage_key=f"test/{image_id}.png")
    return ids


def test_a_csv_upload_with_a_sweep_is_a_campaign_only_its_key_sees(api) -> None:
    client, farm = api
    alice, bob = _key(farm, "alice"), _key(farm, "bob")
    created = _upload(client, alice, "shapes-1", CSV, sweep=["seed=1,2,3"])
    assert created.status_code == 201, created.text
    answer = created.json()
    assert (answer["total"], answer["new"], answer["existing"]) == (6, 6, 0)
    campaign_id = answer["id"]
    assert answer["url"] == f"/v1/campaigns/{campaign_id}"

    for ref in (campaign_id, "shapes-1"):
        status = client.get(f"/v1/campaigns/{ref}", headers=alice).json()
        assert status["name"] == "shapes-1" and status["state"] == "active"
        assert status["counts"]["queued"] == 6 and status["total"] == 6 and status["finished"] == 0
        assert status["progress"] == 0.0
    listed = client.get("/v1/campaigns", headers=alice).json()["campaigns"]
    assert [(c["id"], c["total"], c["counts"]["queued"]) for c in listed] == [(campaign_id, 6, 6)]

    # another key: 404 everywhere, exactly like a missing campaign; its list is empty; the name is taken
    for ref in (campaign_id, "shapes-1"):
        assert client.get(f"/v1/campaigns/{ref}", headers=bob).status_code == 404
        assert client.get(f"/v1/campaigns/{ref}/export", headers=bob).status_code == 404
        assert client.get(f"/v1/campaigns/{ref}/manifest", headers=bob).status_code == 404
        assert client.post(f"/v1/campaigns/{ref}/cancel", headers=bob).status_code == 404
    assert client.get("/v1/campaigns/no-such-campaign", headers=alice).status_code == 404
    assert client.get("/v1/campaigns", headers=bob).json() == {"campaigns": []}
    taken = _upload(client, bob, "shapes-1", CSV)
    assert taken.status_code == 409 and "taken" in taken.json()["detail"]
    # a campaign made with the CLI (no owner) is nobody's through the API
    farm.campaign("cli-made").submit([{"prompt": "x", "model": "tiny", "steps": 2, "width": 64, "height": 64}])
    assert client.get("/v1/campaigns/cli-made", headers=alice).status_code == 404
    assert _upload(client, alice, "cli-made", CSV).status_code == 409

    # submitting the same file again adds nothing (resumable, as the CLI); a dry run submits nothing
    again = _upload(client, alice, "shapes-1", CSV, sweep=["seed=1,2,3"]).json()
    assert (again["new"], again["existing"]) == (0, 6)
    dry = _upload(client, alice, "shapes-2", CSV, sweep=["seed=1,2"], dry_run="true")
    assert dry.status_code == 200 and dry.json()["total"] == 4 and dry.json()["dry_run"] is True
    assert client.get("/v1/campaigns/shapes-2", headers=alice).status_code == 404

    # pause, resume, cancel
    assert client.post(f"/v1/campaigns/{campaign_id}/pause", headers=alice).json()["images"] == 6
    assert client.get(f"/v1/campaigns/{campaign_id}", headers=alice).json()["counts"]["paused"] == 6
    assert client.post(f"/v1/campaigns/{campaign_id}/resume", headers=alice).json()["images"] == 6
    assert client.post(f"/v1/campaigns/{campaign_id}/explode", headers=alice).status_code == 404


def test_a_jsonl_upload_exports_as_a_tar_and_a_manifest(api) -> None:
    client, farm = api
    alice, bob = _key(farm, "alice"), _key(farm, "bob")
    rows = b"".join(json.dumps(row).encode() + b"\n" for row in [
        {"prompt": "a red circle", "steps": 2, "model": "tiny"}, {"prompt": "a green square", "steps": 2, "model": "tiny"},
    ])
    created = _upload(client, alice, "sizes", rows, filename="prompts.jsonl", sweep=["size=64x64,64x128"])
    assert created.status_code == 201, created.text
    campaign_id = created.json()["id"]
    assert created.json()["total"] == 4
    ids = _render(farm, campaign_id)
    status = client.get(f"/v1/campaigns/{campaign_id}", headers=alice).json()
    assert status["counts"]["succeeded"] == 4 and status["finished"] == 4 and status["progress"] == 1.0
    assert status["state"] == "finished"

    exported = client.get(status["export_url"], headers=alice)
    assert exported.status_code == 200 and exported.headers["content-type"] == "application/x-tar"
    assert exported.headers["x-farm-exported"] == "4"
    with tarfile.open(fileobj=io.BytesIO(exported.content)) as tar:
        names = sorted(tar.getnames())
        meta = [json.loads(line) for line in tar.extractfile("train/metadata.jsonl").read().splitlines()]
    assert names == sorted([f"train/{i}.png" for i in ids] + ["train/metadata.jsonl"])
    assert {m["text"] for m in meta} == {"a red circle", "a green square"} and {m["height"] for m in meta} == {64, 128}
    shards = client.get(f"/v1/campaigns/{campaign_id}/export?format=webdataset&shard_size=3", headers=alice)
    with tarfile.open(fileobj=io.BytesIO(shards.content)) as tar:
        assert sorted(tar.getnames()) == ["manifest.jsonl", "shard-000000.tar", "shard-000001.tar"]
    bad = client.get(f"/v1/campaigns/{campaign_id}/export?format=zip", headers=alice)
    assert bad.status_code == 422 and bad.json()["field"] == "format"

    manifest = client.get(status["manifest_url"], headers=alice)
    lines = [json.loads(line) for line in manifest.text.splitlines()]
    assert sorted(line["image_id"] for line in lines) == ids
    png = client.get(lines[0]["url"], headers=alice)  # file storage: the API proxies the image
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert client.get(lines[0]["url"], headers=bob).status_code == 404
    assert client.get(f"/v1/campaigns/{campaign_id}/images/{'0' * 36}", headers=alice).status_code == 404

    # S3 storage: the manifest's URLs are presigned GETs of the stored objects
    class Client:
        def generate_presigned_url(self, op, Params, ExpiresIn):
            return f"https://s3.example/{Params['Bucket']}/{Params['Key']}?expires={ExpiresIn}"

    class S3Like:
        client, bucket = Client(), "bucket"

        def object_key(self, key):
            return f"prefix/{key}"

    sign = api_campaigns.presigner(S3Like(), 60)
    assert sign("test/x.png") == "https://s3.example/bucket/prefix/test/x.png?expires=60"
    assert api_campaigns.presigner(farm.storage, 60) is None


@pytest.mark.parametrize(("filename", "content", "form", "field", "words"), [
    ("prompts.csv", b"id,prompt,width\nr1,ok,64\nr2,bad,65\n", {}, "width", "prompts.csv line 3: width=65 is invalid"),
    ("prompts.csv", b"id,prompt\nr1,a\nr1,b\n", {}, "id", "prompts.csv line 3: id='r1' is invalid: repeats line 2"),
    ("prompts.jsonl", b'{"prompt": "a"}\n{"prompt": \n', {}, "line", "prompts.jsonl line 2"),
    ("prompts.txt", b"prompt\na\n", {}, "file", "must be a file name ending in .jsonl, .csv or .parquet"),
    ("prompts.csv", b"prompt\na\n", {"sweep": ["eta=1,2"]}, "sweep", "cannot be swept"),
    ("prompts.csv", b"prompt\na\n", {"sweep": ["seed=" + ",".join(map(str, range(200)))]}, "sweeps", "MAX_CAMPAIGN_IMAGES"),
    ("prompts.csv", b"prompt\na\n", {"priority": "11"}, "priority", "between 0 (first) and 9"),
    ("prompts.csv", b"prompt,init_image\na,/etc/passwd\n", {}, "init_image", "is a local path"),
    ("prompts.csv", b"prompt\na\n", {"colour": "red"}, "form field", "is unknown"),
])
def test_bad_uploads_are_422_with_one_line_naming_the_field_and_leave_nothing(
    api, monkeypatch, filename, content, form, field, words
) -> None:
    client, farm = api
    monkeypatch.setattr(farm.settings.limits, "max_campaign_images", 100)
    key = _key(farm, "k")
    answer = _upload(client, key, "bad", content, filename=filename, **form)
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["field"] == field and words in body["detail"] and "\n" not in body["detail"], body
    assert _count(farm, CampaignRecord) == 0 and _count(farm, ImageRecord) == 0 and _count(farm, ApiCampaignRecord) == 0


def test_uploads_need_a_file_a_name_and_fit_the_upload_limit(api) -> None:
    client, farm = api
    key = _key(farm, "k")
    answer = client.post("/v1/campaigns", headers=key, data={"name": "x"}, files={"other": ("a.csv", b"prompt\na\n")})
    assert answer.status_code == 422 and answer.json()["field"] == "form field"
    answer = client.post("/v1/campaigns", headers=key, files={"file": ("a.csv", b"prompt\na\n")})
    assert answer.status_code == 422 and answer.json()["field"] == "name"
    answer = client.post("/v1/campaigns", headers=key, json={"name": "x"})
    assert answer.status_code == 422 and answer.json()["field"] == "Content-Type"
    big = b"prompt\n" + b"a red circle\n" * 10_000  # 130 kB: over the 100 kB upload limit, under the body limit
    answer = _upload(client, key, "big", big)
    assert answer.status_code == 413 and "FARM_API_MAX_UPLOAD_BYTES" in answer.json()["detail"]
    assert _count(farm, CampaignRecord) == 0


# -- the owner row is written in the submit's own transaction -----------------------------------------
@pytest.fixture
def published(monkeypatch):
    """Every publish to the broker, recorded instead of sent."""
    calls: list = []
    import farm.campaigns.submit as campaign_submit
    import farm.client as client_module

    for module in (client_module, campaign_submit):
        monkeypatch.setattr(module, "publish", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(campaign_submit, "publish_queued", lambda *a, **k: calls.append(a) or 0)
    return calls


JOB = {"prompt": "a red cube", "model": "tiny", "steps": 2, "width": 64, "height": 64}


def test_a_job_whose_owner_row_fails_is_not_recorded_nor_published(embedded_farm, published) -> None:
    farm = embedded_farm
    ghost = Caller(id="no-such-key", name="ghost")  # the owner row's key does not exist: its insert fails
    with pytest.raises(Exception):
        api_jobs.submit(farm, JOB, ghost, kind="job")
    assert _count(farm, SubmissionRecord) == 0 and _count(farm, ImageRecord) == 0 and _count(farm, ApiJobRecord) == 0
    assert published == []
    # a real key: the submission and its owner, both
    record, _ = keys.create(farm.sessions, "alice")
    job_id = api_jobs.submit(farm, JOB, Caller(id=record.id, name="alice"), kind="job")
    with farm.sessions() as session:
        assert session.get(ApiJobRecord, job_id).key_id == record.id
    assert len(published) == 1


def test_a_job_whose_submission_fails_to_commit_leaves_no_owner_row(embedded_farm, published) -> None:
    farm = embedded_farm
    record, _ = keys.create(farm.sessions, "alice")

    def refuse(session):
        if any(isinstance(obj, ApiJobRecord) for obj in session.new) or session.info.get("owner"):
            raise RuntimeError("the database went away at commit")

    def mark(session, flush_context, instances):
        if any(isinstance(obj, ApiJobRecord) for obj in session.new):
            session.info["owner"] = True

    event.listen(farm.sessions, "before_flush", mark)
    event.listen(farm.sessions, "before_commit", refuse)
    try:
        with pytest.raises(RuntimeError):
            api_jobs.submit(farm, JOB, Caller(id=record.id, name="alice"), kind="job")
    finally:
        event.remove(farm.sessions, "before_commit", refuse)
        event.remove(farm.sessions, "before_flush", mark)
    assert _count(farm, SubmissionRecord) == 0 and _count(farm, ImageRecord) == 0 and _count(farm, ApiJobRecord) == 0
    assert published == []


def test_a_campaign_whose_owner_row_fails_is_not_recorded_nor_published(embedded_farm, published) -> None:
    farm = embedded_farm
    upload = api_campaigns.Upload(filename="prompts.csv", data=CSV, fields={"name": ["c1"]})
    with pytest.raises(Exception):
        api_campaigns.submit(farm, Caller(id="no-such-key", name="ghost"), upload)
    assert _count(farm, CampaignRecord) == 0 and _count(farm, ImageRecord) == 0 and _count(farm, ApiCampaignRecord) == 0
    assert published == []
    # vice versa: the owner row is written first, then a bad row later in the file rolls both back
    record, _ = keys.create(farm.sessions, "alice")
    alice = Caller(id=record.id, name="alice")
    bad = api_campaigns.Upload(filename="prompts.csv", data=CSV + b"r3,a bad one,2,65,64\n", fields={"name": ["c1"]})
    with pytest.raises(Exception, match="line 4: width=65"):
        api_campaigns.submit(farm, alice, bad)
    assert _count(farm, CampaignRecord) == 0 and _count(farm, ImageRecord) == 0 and _count(farm, ApiCampaignRecord) == 0
    assert published == []
    answer = api_campaigns.submit(farm, alice, upload)
    with farm.sessions() as session:
        assert session.get(ApiCampaignRecord, answer["id"]).key_id == record.id
    assert answer["new"] == 2 and published


def test_the_transaction_itself_refuses_a_name_another_key_took_meanwhile(embedded_farm, published, monkeypatch) -> None:
    """Two keys submitting the same new name at once: both pass the early check, the second one's
    transaction finds the first's owner row and refuses (409), adding nothing to its campaign."""
    farm = embedded_farm
    first, _ = keys.create(farm.sessions, "alice")
    second, _ = keys.create(farm.sessions, "bob")
    upload = api_campaigns.Upload(filename="prompts.csv", data=CSV, fields={"name": ["race"]})
    api_campaigns.submit(farm, Caller(id=first.id, name="alice"), upload)
    monkeypatch.setattr(api_campaigns, "_check_free", lambda *a: None)  # as if bob checked before alice committed
    more = api_campaigns.Upload(filename="prompts.csv", data=CSV + b"r3,a third,2,64,64\n", fields={"name": ["race"]})
    with pytest.raises(api_campaigns.Conflict, match="taken"):
        api_campaigns.submit(farm, Caller(id=second.id, name="bob"), more)
    assert _count(farm, ImageRecord) == 2 and _count(farm, ApiCampaignRecord) == 1


def test_a_parquet_upload_is_read_as_the_cli_reads_it(api) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    client, farm = api
    key = _key(farm, "k")
    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["a red circle", "a blue square"], "steps": [2, 2],
                             "width": [64, 64], "height": [64, 64]}), buffer)
    created = client.post("/v1/campaigns", headers=key, data={"name": "pq", "sweep": "seed=1,2", "priority": "3"},
                          files={"file": ("rows.parquet", buffer.getvalue(), "application/octet-stream")})
    assert created.status_code == 201, created.text
    assert created.json()["total"] == 4
    assert client.get("/v1/campaigns/pq", headers=key).json()["priority"] == 3
    broken = client.post("/v1/campaigns", headers=key, data={"name": "pq2"},
                         files={"file": ("rows.parquet", b"PAR1 not really", "application/octet-stream")})
    assert broken.status_code == 422 and "rows.parquet" in broken.json()["detail"], broken.text
