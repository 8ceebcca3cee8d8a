"""The submitter side never imports the GPU stack: a laptop with no torch can submit and follow work.

Both checks run in a fresh interpreter, so nothing this pytest process imported can hide an import.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

HEAVY = ("torch", "diffusers", "transformers", "peft", "safetensors")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update(FARM_DATA_DIR=str(tmp_path / "data"), **extra)
    return env


def test_python_client_submits_without_heavy_imports(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import json, sys
        import farm, farm.cli.main, farm.client
        f = farm.Farm()
        job = f.submit("a red cube", width=64, height=64, num_images=2, seed=1)
        status = job.status()
        f.close()
        print(json.dumps({{
            "id": job.id,
            "counts": status.counts,
            "heavy": [m for m in {HEAVY!r} if m in sys.modules],
        }}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [], f"the submitter imported {result['heavy']}"
    assert UUID.match(result["id"])
    assert result["counts"]["queued"] == 2
    # it really wrote: the SQLite file and one message in the filesystem broker
    assert (tmp_path / "data" / "farm.db").is_file()
    assert [p for p in (tmp_path / "data" / "broker" / "queue").iterdir() if p.name.endswith(".msg")]


SITECUSTOMIZE = """
import importlib.abc
import os
import sys

BLOCKED = {"torch", "diffusers", "transformers", "peft"}
LOG = os.environ["FARM_TEST_IMPORT_LOG"]


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in BLOCKED:
            with open(LOG, "a") as log:
                log.write(fullname + "\\n")
            raise ImportError(f"{fullname} is blocked by the light-import test")
        return None


sys.meta_path.insert(0, _Block())
"""


def test_cli_submits_with_heavy_packages_blocked(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "attempts.log"
    env = _env(tmp_path, PYTHONPATH=str(blocker), FARM_TEST_IMPORT_LOG=str(log))

    # the blocker works: importing torch in the same setup fails
    probe = subprocess.run(
        [sys.executable, "-c", "import torch"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert probe.returncode != 0 and "blocked by the light-import test" in probe.stderr
    log.unlink()

    done = subprocess.run(
        [sys.executable, "-m", "farm", "submit", "--prompt", "x", "--width", "64", "--height", "64"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert UUID.match(done.stdout.strip()), done.stdout
    attempts = log.read_text().split() if log.exists() else []
    assert attempts == [], f"the submit command tried to import {attempts}"


FORBIDDEN = ("workers", "evaluation", "torch", "diffusers", "transformers", "peft", "safetensors", "accelerate")


def test_no_arrow_from_the_light_side_to_the_gpu_side() -> None:
    """Walk every import in farm/ — at any depth, inside functions too — and fail on one that reaches
    workers/, evaluation/ or the GPU stack. GPU-side commands come in through entry points instead."""
    import ast

    root = Path(__file__).resolve().parents[2] / "farm"
    arrows = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                if name.split(".")[0] in FORBIDDEN:
                    arrows.append(f"{path.relative_to(root.parent)}:{node.lineno} imports {name}")
    assert arrows == []
    assert (root / "supervisor.py").is_file()  # the process supervisor behind `farm worker` is light
