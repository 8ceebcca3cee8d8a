"""Campaign input: files, sweeps, and malformed input refused with line and field before anything is queued."""

from __future__ import annotations

import json

import pytest

from farm import Farm, Settings, ValidationError
from farm.campaigns.prompt_files import combinations, parse_sweeps, read_rows, row_id
from farm.settings import Limits


@pytest.fixture
def farm(tmp_path):
    with Farm(Settings(data_dir=tmp_path / "data", limits=Limits(max_campaign_images=100))) as f:
        yield f


def test_csv_jsonl_and_parquet_give_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "a red circle", "seed": 1, "guidance_scale": 5.5}, {"prompt": "a blue square", "seed": 2, "guidance_scale": 7.0}]
    (tmp_path / "p.csv").write_text("prompt,seed,guidance_scale\na red circle,1,5.5\na blue square,2,7\n")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    parsed = {suffix: [fields for _, _, fields in read_rows(tmp_path / f"p.{suffix}")] for suffix in ("csv", "jsonl", "parquet")}
    assert parsed["csv"] == parsed["jsonl"] == parsed["parquet"] == rows


def test_row_ids_are_stable_and_an_id_column_wins(tmp_path):
    (tmp_path / "a.csv").write_text("prompt,seed\nx,1\ny,2\n")
    (tmp_path / "b.csv").write_text("id,prompt,seed\nrow-7,x,1\n")
    first = [row_id(rid, fields) for _, rid, fields in read_rows(tmp_path / "a.csv")]
    again = [row_id(rid, fields) for _, rid, fields in read_rows(tmp_path / "a.csv")]
    assert first == again and len(set(first)) == 2
    assert [row_id(rid, fields) for _, rid, fields in read_rows(tmp_path / "b.csv")] == ["row-7"]


def test_sweeps_expand_as_a_product():
    sweeps = parse_sweeps(["seed=1,2,3", "guidance_scale=5,7.5", "size=64x64,128x64"])
    combos = combinations(sweeps)
    assert len(combos) == 12
    assert {"seed": 1, "guidance_scale": 7.5, "width": 128, "height": 64} in combos


@pytest.mark.parametrize(
    ("name", "content", "sweeps", "field", "where"),
    [
        ("no-prompt.csv", "text,seed\nhello,1\n", [], "prompt", "no-prompt.csv line 1"),
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": "broken"\n', [], "line", "bad.jsonl line 2"),
        ("seed.csv", "prompt,seed\na,1\nb,one\n", [], "seed", "seed.csv line 3"),
        ("width.csv", "prompt,width\na,64\nb,100\n", [], "width", "width.csv line 3"),
        ("cap.csv", "prompt\n" + "".join(f"x{i}\n" for i in range(20)), ["seed=1,2,3,4,5,6"], "images", "cap.csv line 18"),
        ("sweep.csv", "prompt\nx\n", ["seed=1,b"], "seed", "sweep seed"),
        ("field.csv", "prompt\nx\n", ["prompt=a,b"], "sweep", None),
    ],
)
def test_malformed_input_is_refused_before_anything_is_queued(farm, tmp_path, name, content, sweeps, field, where):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValidationError) as caught:
        farm.campaign("c").submit(path, sweeps=sweeps)
    assert caught.value.field == field
    if where:
        assert where in str(caught.value)
    assert farm.latest() == []  # nothing written, nothing queued


def test_dry_run_counts_and_estimates_without_writing(farm, tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,steps,width,height\na,25,512,512\nb,50,512,512\n")
    report = farm.campaign("c").submit(path, sweeps=["seed=1,2"], dry_run=True)
    assert report.total == 4 and report.estimated_gpu_seconds == pytest.approx((25 + 50) * 2 * 0.02)
    assert farm.latest() == []
    assert "4 image(s)" in str(report)


def test_resubmitting_adds_only_new_rows(farm, tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,width,height\na,64,64\nb,64,64\n")
    assert farm.campaign("c").submit(path).new == 2
    path.write_text("prompt,width,height\na,64,64\nb,64,64\nc,64,64\n")
    report = farm.campaign("c").submit(path)
    assert (report.new, report.existing) == (1, 2)


def test_a_row_content_id_is_the_encoders_text(tmp_path):
    """Rows without an id are known by a hash of their canonical JSON; the fast builder must write
    exactly what ``json.dumps(fields, sort_keys=True, ensure_ascii=False, default=str)`` writes, or
    re-submitting an old file would add every row again."""
    import random

    from farm.campaigns.prompt_files import canonical

    values = ["a", 'é"\\\n\t\u2028', "\ud800", 0, -5, 10**30, 1.5, 1e-300, 1e300, 0.1, -0.0, True, False, None, 5.0, "",
              "\x00\x7f", "😀", float("nan"), float("inf"), [1, "a"], {"b": 1.5}, (2, 3)]
    keys = ["prompt", "seed", "a", "Z", "é", "", "negative_prompt", "b c", "\u2028"]
    rng = random.Random(7)
    for _ in range(5000):
        fields = {rng.choice(keys): rng.choice(values) for _ in range(rng.randint(0, 6))}
        assert canonical(fields) == json.dumps(fields, sort_keys=True, ensure_ascii=False, default=str), fields


def test_row_ids_of_plain_rows_are_unchanged():
    import hashlib

    fields = {"prompt": "a red circle", "seed": 1, "guidance_scale": 7.5, "paste_back": False}
    legacy = hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:24]
    assert row_id(None, fields) == legacy


def test_chunks_past_the_hold_are_published_from_the_database(tmp_path, monkeypatch):
    """A campaign bigger than HOLD_IMAGES does not keep every batch in memory until the commit: the
    chunks past it are published from their records; every image is queued once, every chunk marked."""
    import farm.campaigns.submit as submit_module
    from farm.db.tables import ImageRecord, SubmissionRecord

    monkeypatch.setattr(submit_module, "HOLD_IMAGES", 7)
    with Farm(Settings(data_dir=tmp_path / "data", campaign_chunk_size=5)) as farm:
        report = farm.campaign("big").submit([{"prompt": f"p{i}", "width": 64, "height": 64} for i in range(23)])
        assert (report.total, report.new, report.published_again) == (23, 23, 0)
        with farm.sessions() as session:
            submissions = session.query(SubmissionRecord).all()
            assert len(submissions) == 5 and all(s.published_at is not None for s in submissions)
            assert session.query(ImageRecord).filter(ImageRecord.status == "queued").count() == 23
        image_ids = [image_id for message in _queued_messages(farm) for image_id in message["image_ids"]]
        assert len(image_ids) == len(set(image_ids)) == 23
        again = farm.campaign("big").submit([{"prompt": f"p{i}", "width": 64, "height": 64} for i in range(23)])
        assert (again.new, again.existing, again.published_again) == (0, 23, 0)


def test_a_database_error_in_the_writer_rolls_everything_back(tmp_path, monkeypatch):
    """The writer thread's failure reaches the submitter, and nothing of the campaign stays."""
    from farm import lifecycle
    from farm.db.tables import CampaignRecord

    calls = []
    original = lifecycle.record

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return original(*args, **kwargs)

    monkeypatch.setattr(lifecycle, "record", failing)
    with Farm(Settings(data_dir=tmp_path / "data", campaign_chunk_size=4)) as farm:
        with pytest.raises(RuntimeError, match="disk full"):
            farm.campaign("c").submit([{"prompt": f"p{i}"} for i in range(20)])
        with farm.sessions() as session:
            assert session.query(CampaignRecord).count() == 0
        assert farm.latest() == []


def _queued_messages(farm) -> list[dict]:
    """The kwargs of every render task waiting in the embedded (filesystem) broker."""
    import base64

    found = []
    for path in (farm.settings.data_dir / "broker").rglob("*.msg"):
        envelope = json.loads(path.read_text())
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _args, kwargs, _embed = json.loads(body)
        found.append(kwargs)
    return found
