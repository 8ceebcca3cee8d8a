#!/usr/bin/env bash
# Fetch into .whl/ every wheel the GPU run (bench/gpu_run.sh) needs that the lent GPU machine lacks.
#
#     bash bench/gpu_wheels.sh              # cp312 manylinux x86_64 wheels into .whl/ (gitignored)
#     WHL_DIR=/tmp/w PY_VERSION=3.11 bash bench/gpu_wheels.sh   # the same set for cp311 (a local check)
#
# The machine (../shared/STACK-FACTS.md, "The lent GPU machine"; /work/.library/device/KINDS.md) has
# Python 3.12, torch 2.11 + CUDA, transformers 5.17, huggingface_hub 1.33, accelerate, peft,
# safetensors, tokenizers, pillow, numpy, scipy, prometheus-client, click, jinja2, markupsafe,
# werkzeug, pyyaml, requests, urllib3, python-dateutil, six, packaging, filelock, fsspec, regex, tqdm,
# psutil, zipp; nothing can be fetched there. Everything below is what farm's worker, `farm db
# upgrade`, bench/gpu.py (moto_server S3) and bench/cross_job.py --embedded import beyond that,
# pinned to constraints.txt where it pins (else the versions installed with it), --no-deps: each
# dependency is named here. Not carried on purpose:
#   * huggingface_hub: constraints.txt pins 2.4.0, but 2.x needs httpx2 + hf-xet and the machine's
#     transformers 5.17 is built against its own hub 1.33; diffusers 0.42.1 asks only >=1.32.
#   * transformers/tokenizers/torch and the rest of the machine's stack: used as they are there.
#   * psycopg, fastapi/uvicorn, flower, pyarrow: not imported by the embedded run.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${WHL_DIR:-.whl}
PY=${PY_VERSION:-3.12}
PIP=${PIP:-python3 -m pip}

WHEELS=(
  # rendering
  diffusers==0.42.1 importlib_metadata==10.2.0 ftfy==6.3.1 wcwidth==0.9.4
  # settings
  pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3 annotated-types==0.8.0
  typing-inspection==0.4.5 typing_extensions==4.16.0 python-dotenv==1.2.4
  # queue: Celery on kombu (filesystem broker embedded; redis-py for the Redis transport import)
  celery==5.7.0 kombu==5.7.0 billiard==4.3.2 vine==5.1.0 amqp==5.4.2 tzlocal==5.4.5 tzdata==2025.3
  click-didyoumean==0.3.1 click-repl==0.4.1 click-plugins==1.1.1.2 prompt_toolkit==3.0.53 redis==8.1.0
  # database
  SQLAlchemy==2.1.9 greenlet==3.5.6 alembic==1.20.1 Mako==1.4.3
  # storage: S3 through boto3; moto_server for bench/gpu.py's end-to-end uploads
  boto3==1.44.5 botocore==1.44.5 s3transfer==0.19.3 jmespath==1.1.0
  moto==5.2.5 xmltodict==1.0.4 responses==0.26.3 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
  flask==3.1.3 flask-cors==6.0.5 itsdangerous==2.2.0 blinker==1.9.0
  # there, but of unknown versions: the ones farm is tested with (celery needs click>=8.3.1 and
  # python-dateutil==2.9.0.post0, flask werkzeug>=3.1)
  click==8.5.1 werkzeug==3.1.9 python-dateutil==2.9.0.post0 six==1.17.0
)

mkdir -p "$DEST"
$PIP download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 \
  --index-url https://pypi.org/simple -d "$DEST" "${WHEELS[@]}" 2> >(grep -v "is ignored: it is neither" >&2)

# botocore's wheel is 16 MB of models for 400+ AWS services, and the whole working tree that travels to
# the machine must stay under 64 MiB: keep the S3 (and STS) models, the endpoint/partition/retry files.
python3 - "$DEST" <<'PY'
import sys, zipfile
from pathlib import Path

KEEP = {"s3", "sts"}
for wheel in Path(sys.argv[1]).glob("botocore-*.whl"):
    with zipfile.ZipFile(wheel) as z:
        items = [(i, z.read(i)) for i in z.infolist()]

    def kept(name: str) -> bool:
        parts = name.split("/")
        return not (parts[:2] == ["botocore", "data"] and len(parts) > 3 and parts[2] not in KEEP)

    if all(kept(i.filename) for i, _ in items):
        continue  # trimmed already
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        for info, data in items:
            if not kept(info.filename):
                continue
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(l for l in data.splitlines(True) if kept(l.decode().split(",")[0]))
            out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    tmp.replace(wheel)
    print(f"gpu_wheels: {wheel.name} trimmed to the models of {', '.join(sorted(KEEP))}")
PY

# one version of each (two stop the install there), and every pinned one present
names=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort)
dups=$(uniq -d <<<"$names")
[ -z "$dups" ] || { echo "gpu_wheels: more than one version of: $dups (empty $DEST and run again)" >&2; exit 1; }
for spec in "${WHEELS[@]}"; do
  want=$(tr 'A-Z-' 'a-z_' <<<"${spec%%==*}")
  grep -qx "$want" <<<"$names" || { echo "gpu_wheels: no wheel for $spec in $DEST" >&2; exit 1; }
done
echo "gpu_wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST (Python $PY)"
