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
