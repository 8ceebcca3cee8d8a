"""A README that runs: every ```sh and ```python block of README.md, in order, against an embedded farm.

The farm: a temporary ``FARM_DATA_DIR`` (SQLite, the filesystem broker and file storage, the defaults
when no ``FARM_*`` URL is set) and one real ``farm worker --cpu`` process rendering with the shipped
shapes model. The blocks run in a temporary folder that holds the files they name (``prompts.csv``,
``photo.png``, ``photo.jpg``, ``mask.png``, ``ink.safetensors``, ``style.safetensors``) and links to the checkout's ``.venv``
and ``models``, as a user's checkout would; ``.venv/bin`` comes first on ``PATH`` (``farm`` works bare).

* ``sh`` blocks run with ``bash -eu``, each in its own process.
* ``python`` blocks run in ONE Python session (the venv's python, in a subprocess), in order, so a
  later block uses what an earlier one defined (``farm``, ``prompts``), as a reader would.
* An HTML comment right before a fence changes how its block is used:

  ``<!-- readme-test: worker (…) -->`` the block is the long-running worker command: the test runs it
  in the background for the whole README (exactly one such block).

  ``<!-- readme-test: skip (reason) -->`` the block needs what a test cannot have (a cluster): only
  ``bash -n`` and that every ``farm …`` (sub)command it names exists (``farm … --help``). At most
  :data:`MAX_SKIPPED` blocks may be skipped.

At the end the farm is drained and every image recorded must have succeeded or been canceled: what
the blocks only submit is rendered and checked too. Errors point at README.md's own line numbers.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from safetensors.numpy import save_file

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
VENV = REPO / ".venv" if (REPO / ".venv" / "bin" / "farm").exists() else Path(sys.executable).parents[1]
MAX_SKIPPED = 2
BLOCK_TIMEOUT = 300  # seconds for one block
WORKER_READY_TIMEOUT = 180
DRAIN_TIMEOUT = 300

FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*readme-test:\s*([\w-]+)\b(.*?)-->\s*$")
LANGUAGES = {"sh": "sh", "bash": "sh", "shell": "sh", "python": "python", "py": "python"}


@dataclass(frozen=True)
class Block:
    language: str  # sh | python
    line: int  # README line of the block's first code line
    code: str
    mark: str | None  # worker | skip | None
    reason: str = ""

    @property
    def where(self) -> str:
        return f"README.md:{self.line} ({self.language}{', ' + self.mark if self.mark else ''})"

    def padded(self) -> str:
        """The code preceded by blank lines, so errors name README.md's own line numbers."""
        return "\n" * (self.line - 1) + self.code


def readme_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    n = 0
    while n < len(lines):
        fence = FENCE.match(lines[n])
        if not fence:
            n += 1
            continue
        start = n + 1
        end = start
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        if end == len(lines):
            raise AssertionError(f"README.md:{n + 1}: a fence that never closes")
        previous = next((lines[k] for k in range(n - 1, -1, -1) if lines[k].strip()), "")
        marker = MARKER.match(previous.strip())
        language = LANGUAGES.get(fence.group(1).lower())
        if language is not None:
            mark = marker.group(1) if marker else None
            if mark not in (None, "worker", "skip"):
                raise AssertionError(f"README.md:{n}: unknown readme-test marker {mark!r}")
            blocks.append(
                Block(language, start + 1, "\n".join(lines[start:end]) + "\n", mark,
                      marker.group(2).strip() if marker else "")
            )
        n = end + 1
    return blocks


def test_the_readme_parses_into_blocks_with_few_skipped():
    """Light (no worker): the README's blocks are found, and the markers are used sparingly."""
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    assert len([b for b in blocks if b.mark is None]) >= 5, blocks
    assert len([b for b in blocks if b.mark == "worker"]) == 1
    skipped = [b.where for b in blocks if b.mark == "skip"]
    assert len(skipped) <= MAX_SKIPPED, f"too many README blocks skipped: {skipped}"
    for block in blocks:
        assert not re.search(r"<[A-Z_]+>", block.code), f"{block.where}: a placeholder like <ID> cannot run"


# -- the embedded farm --------------------------------------------------------------------------------


def _environment(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "AWS_ENDPOINT_URL"))}
    env.update(
        FARM_DATA_DIR=str(data_dir),
        FARM_TORCH_THREADS="2",
        FARM_QUEUE_PREFIX=f"readme{uuid.uuid4().hex[:8]}",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.pop("VIRTUAL_ENV", None)
    return env


def _inputs(folder: Path) -> None:
    """The files the README's blocks name, as a user would have them beside their shell."""
    from PIL import Image, ImageDraw

    (folder / ".venv").symlink_to(VENV, target_is_directory=True)
    (folder / "models").symlink_to(REPO / "models", target_is_directory=True)
    (folder / "prompts.csv").write_text(
        "id,prompt\nred,a red circle on a blue background\ngreen,a green square on a yellow background\n"
    )
    photo = Image.new("RGB", (64, 64), (40, 60, 200))
    ImageDraw.Draw(photo).ellipse((16, 16, 47, 47), fill=(220, 30, 30))
    photo.save(folder / "photo.png")
    photo.save(folder / "photo.jpg", quality=95)
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((12, 12, 51, 51), fill=255)
    mask.save(folder / "mask.png")
    # a textual-inversion embedding for the shapes model (its text encoder is 64 wide), A1111 layout
    save_file({"emb_params": np.random.default_rng(3).normal(0, 0.02, (2, 64)).astype(np.float32)},
              str(folder / "style.safetensors"))
    # a small LoRA of the user's own for the shapes model (the model ships its own: loras/green)
    subprocess.run(
        [str(VENV / "bin" / "python"), "-c",
         "import sys; from pathlib import Path; from evaluation.tiny_lora import make_tiny_lora; "
         "make_tiny_lora(Path(sys.argv[1]), Path(sys.argv[2]), seed=7, scale=0.05)",
         str(REPO / "models" / "shapes"), str(folder / "ink.safetensors")],
        cwd=REPO, check=True, capture_output=True, timeout=300,
    )


class Worker:
    """The README's worker block, run by bash in the background in its own process group."""

    def __init__(self, block: Block, cwd: Path, env: dict[str, str], log_path: Path):
        script = cwd.parent / "worker-block.sh"
        script.write_text(block.padded())
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen(
            ["bash", "-eu", str(script)], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + WORKER_READY_TIMEOUT
        while " ready." not in self.text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the README's worker block did not start:\n{self.text()[-4000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.log.close()


class PythonSession:
    """One Python process that runs the README's python blocks one after another in one namespace."""

    DRIVER = r"""
import json, sys, traceback
namespace = {"__name__": "__main__"}
token = sys.argv[1]
for request in sys.stdin:
    request = json.loads(request)
    try:
        exec(compile(request["code"], request["file"], "exec"), namespace)
        status = "ok"
    except BaseException:
        traceback.print_exc()
        status = "failed"
    sys.stderr.flush()
    sys.stdout.flush()
    print(f"\n{token} {status}", flush=True)
"""

    def __init__(self, cwd: Path, env: dict[str, str]):
        self.token = f"README-BLOCK-DONE-{uuid.uuid4().hex}"
        self.process = subprocess.Popen(
            [str(VENV / "bin" / "python"), "-c", self.DRIVER, self.token], cwd=cwd, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def run(self, block: Block) -> tuple[bool, str]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"code": block.padded(), "file": str(README)}) + "\n")
        self.process.stdin.flush()
        output: list[str] = []
        deadline = time.monotonic() + BLOCK_TIMEOUT
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                return False, "".join(output) + f"\n(no end after {BLOCK_TIMEOUT} s)"
            if line is None:
                return False, "".join(output) + f"\n(the Python session exited: {self.process.poll()})"
            if line.startswith(self.token):
                return line.split()[-1] == "ok", "".join(output)
            output.append(line)

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str], Worker, list[Block]]]:
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    [worker_block] = [b for b in blocks if b.mark == "worker"]
    root = tmp_path_factory.mktemp("readme")
    cwd = root / "cwd"
    cwd.mkdir()
    env = _environment(root / "data")
    _inputs(cwd)
    worker = Worker(worker_block, cwd, env, root / "worker.log")
    try:
        worker.wait_ready()
        yield cwd, env, worker, blocks
    finally:
        worker.stop()


def _farm_commands(code: str) -> Iterator[list[str]]:
    """The words after each ``farm`` of a shell block, up to the first option: ``['db', 'upgrade']``."""
    for line in code.replace("\\\n", " ").splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        for n, word in enumerate(words):
            # farm, .venv/bin/farm, ID=$(farm (not a URL that ends in /farm)
            if re.fullmatch(r"(?:\w+=)?(?:\$\()?(?:[\w.~-]*/)*farm", word):
                command = []
                for arg in words[n + 1:]:
                    if arg.startswith("-") or arg in (";", "&&", "||", "|", "&") or "=" in arg:
                        break
                    command.append(arg)
                yield command


def _check_skipped(block: Block, env: dict[str, str], cwd: Path) -> list[str]:
    problems = []
    syntax = subprocess.run(["bash", "-n"], input=block.padded(), text=True, capture_output=True)
    if syntax.returncode:
        problems.append(f"{block.where}: bash -n: {syntax.stderr.strip()}")
    commands = list(_farm_commands(block.code))
    if not commands:
        problems.append(f"{block.where}: skipped, and names no farm command to check")
    for command in commands:
        done = subprocess.run(
            [str(VENV / "bin" / "farm"), *command, "--help"], cwd=cwd, env=env, capture_output=True, text=True,
            timeout=60,
        )
        if done.returncode or "Usage:" not in done.stdout:
            problems.append(f"{block.where}: `farm {' '.join(command)}` is not a farm command: {done.stderr.strip()}")
    return problems


def _images(data_dir: Path) -> dict[str, int]:
    with sqlite3.connect(data_dir / "farm.db") as db:
        return dict(db.execute("SELECT status, count(*) FROM images GROUP BY status").fetchall())


def _drain(data_dir: Path, worker: Worker) -> dict[str, int]:
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while True:
        counts = _images(data_dir)
        if not counts.get("queued") and not counts.get("running") and not counts.get("paused"):
            return counts
        if worker.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the farm did not drain: {counts}\n{worker.text()[-4000:]}")
        time.sleep(0.5)


@pytest.mark.integration  # starts a worker process
def test_every_readme_block_runs_against_an_embedded_farm(embedded):
    cwd, env, worker, blocks = embedded
    data_dir = Path(env["FARM_DATA_DIR"])
    session = PythonSession(cwd, env)
    failures: list[str] = []
    ran: list[str] = []
    try:
        for n, block in enumerate(blocks):
            if block.mark == "worker":
                continue
            if block.mark == "skip":
                failures += _check_skipped(block, env, cwd)
                continue
            started = time.monotonic()
            if block.language == "sh":
                script = cwd.parent / f"block-{n:02d}-L{block.line}.sh"
                script.write_text(block.padded())
                try:
                    done = subprocess.run(
                        ["bash", "-eu", str(script)], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=BLOCK_TIMEOUT,
                    )
                    ok, output = done.returncode == 0, done.stdout + done.stderr
                except subprocess.TimeoutExpired as exc:
                    ok, output = False, f"(no end after {BLOCK_TIMEOUT} s) {exc.stdout or ''}{exc.stderr or ''}"
            else:
                ok, output = session.run(block)
            ran.append(f"{block.where} {time.monotonic() - started:.0f} s")
            if not ok:
                # progress bars are noise here: keep their last state only
                tail = "\n".join(line.rsplit("\r", 1)[-1] for line in output.splitlines()[-40:])
                failures.append(f"{block.where} failed:\n{block.code}\n--- its output ---\n{tail}")
        counts = _drain(data_dir, worker)
    finally:
        session.close()
    print("\n".join(ran))
    assert not failures, "\n\n".join(failures) + f"\n\n--- worker log ---\n{worker.text()[-3000:]}"
    assert counts.get("succeeded", 0) >= 20, counts
    if counts.get("failed"):
        with sqlite3.connect(data_dir / "farm.db") as db:
            errors = db.execute("SELECT prompt, error FROM images WHERE status = 'failed'").fetchall()
        raise AssertionError(f"images the README submitted failed: {counts}: {errors}")
    # what the blocks say they leave behind
    assert len(list((cwd / "out").glob("*.png"))) >= 8  # the shell's 4 and Python's 4 (other seeds)
    assert (cwd / "dataset" / "metadata.jsonl").is_file() or (cwd / "dataset" / "train" / "metadata.jsonl").is_file()
    assert list((cwd / "shards").glob("shard-*.tar")) and (cwd / "sheet.png").is_file()
