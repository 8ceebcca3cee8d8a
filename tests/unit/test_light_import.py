"""The submitter side never imports the GPU stack: a laptop with no torch can submit and follow work.

Three views, none of them a fresh interpreter:

* statically, farm/'s import graph (every import, at any depth: in functions, under TYPE_CHECKING)
  has no arrow to workers/, evaluation/ or the GPU stack; one is reported with the chain of
  imports that reaches it from ``import farm``;
* farm/ imports nothing but the standard library and its declared light dependencies, and those
  (per their installed metadata, transitively) require no GPU package;
* at run time, in this process, ``farm`` is imported anew with the GPU side and the GPU stack made
  unimportable (taken out of ``sys.modules`` and blocked, then put back as they were): ``import
  farm``, the Python client and ``farm submit`` work and try to import none of them.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.abc
import importlib.metadata
import re
import sys
import tomllib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
#: What the light side must never import: the GPU side, the evaluation kit, the GPU stack.
FORBIDDEN = ("workers", "evaluation", "torch", "diffusers", "transformers", "peft", "safetensors", "accelerate")
#: The GPU stack's distributions, which no light dependency may require.
HEAVY_DISTRIBUTIONS = {"torch", "diffusers", "transformers", "peft", "safetensors", "accelerate", "tokenizers"}
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


# -- the static import graph ----------------------------------------------------------------------


@dataclass(frozen=True)
class Arrow:
    """``source`` imports ``target`` at ``where`` (``farm/x.py:12``); an external target is its top-level name."""

    source: str
    target: str
    where: str


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path) -> dict[str, list[Arrow]]:
    """``{module: its imports}`` for every module of ``package`` (a folder), from the source alone.

    Relative imports are resolved; ``from a import b`` is an arrow to the module ``a.b`` when there is
    one; importing ``a.b.c`` is also an arrow to the packages ``a`` and ``a.b`` (Python runs their
    ``__init__`` first). Arrows to other packages stop at their top-level name.
    """
    root = package.parent
    files = {_module_name(path, root): path for path in sorted(package.rglob("*.py"))}

    def internal(name: str) -> list[str]:
        parts = name.split(".")
        return [prefix for i in range(1, len(parts) + 1) if (prefix := ".".join(parts[:i])) in files]

    graph: dict[str, list[Arrow]] = {}
    for name, path in files.items():
        own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        arrows: list[Arrow] = []
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = own_package.split(".")[: len(own_package.split(".")) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            where = f"{path.relative_to(root)}:{node.lineno}"
            for target in targets:
                found = internal(target)
                if found:
                    arrows += [Arrow(name, module, where) for module in found]
                elif target.split(".")[0] not in (package.name, ""):
                    arrows.append(Arrow(name, target.split(".")[0], where))
        graph[name] = list(dict.fromkeys(arrows))
    return graph


def _chain_to(graph: dict[str, list[Arrow]], start: str, goal: str) -> list[Arrow] | None:
    """The shortest run of arrows from module ``start`` to module ``goal``, or None."""
    came: dict[str, Arrow | None] = {start: None}
    todo = deque([start])
    while todo:
        module = todo.popleft()
        if module == goal:
            chain = []
            while came[module] is not None:
                chain.append(came[module])
                module = came[module].source
            return chain[::-1]
        for arrow in graph.get(module, []):
            if arrow.target in graph and arrow.target not in came:
                came[arrow.target] = arrow
                todo.append(arrow.target)
    return None


def forbidden_chains(package: Path, forbidden: tuple[str, ...]) -> list[str]:
    """Each arrow from ``package`` to a ``forbidden`` top-level name, as the chain of imports that
    reaches it from ``import <package>`` (or from its own module when nothing imports that)."""
    graph = import_graph(package)
    found = []
    for module, arrows in graph.items():
        for arrow in arrows:
            if arrow.target in forbidden:
                chain = (_chain_to(graph, package.name, module) or []) + [arrow]
                found.append("; ".join(f"{a.where} imports {a.target}" for a in chain))
    return sorted(found)


def test_no_arrow_from_the_light_side_to_the_gpu_side() -> None:
    """GPU-side commands come in through entry points (farm.cli.plugins) instead."""
    assert forbidden_chains(ROOT / "farm", FORBIDDEN) == []
    assert (ROOT / "farm" / "supervisor.py").is_file()  # the process supervisor behind `farm worker` is light


def test_the_walk_finds_an_arrow_however_deep_and_names_its_chain(tmp_path: Path) -> None:
    """The checker itself: relative imports, imports in functions and under TYPE_CHECKING all count."""
    package = tmp_path / "light"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .client import Client\n")
    (package / "client.py").write_text("class Client:\n    def go(self):\n        from light.sub import mid\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "mid.py").write_text("import os\n\n\ndef render():\n    import torch.nn as nn\n")
    (package / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from diffusers import X\n")
    (package / "fine.py").write_text("from . import client\nimport json\n")
    assert forbidden_chains(package, ("torch", "diffusers")) == [
        "light/__init__.py:1 imports light.client; light/client.py:3 imports light.sub.mid; "
        "light/sub/mid.py:5 imports torch",
        "light/typed.py:3 imports diffusers",
    ]


# -- declared dependencies ------------------------------------------------------------------------


def _declared() -> dict[str, Requirement]:
    """The light dependencies and the campaign extra (Parquet), by canonical distribution name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["campaign"]]
    return {canonicalize_name(r.name): r for r in requirements}


def _required_closure(requirements: list[Requirement]) -> dict[str, str]:
    """Every distribution the given requirements pull in (markers evaluated here, extras followed):
    ``{name: how it was reached}``."""
    reached: dict[str, str] = {}
    todo = [(r, r.name) for r in requirements]
    while todo:
        requirement, path = todo.pop()
        name = canonicalize_name(requirement.name)
        extras = sorted(requirement.extras)
        if name in reached and not extras:
            continue
        reached.setdefault(name, path)
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name} ({path}) is required but not installed")
        for line in requires:
            nested = Requirement(line)
            if nested.marker is None or any(nested.marker.evaluate({"extra": extra}) for extra in ["", *extras]):
                todo.append((nested, f"{path} → {nested.name}"))
    return reached


def test_the_light_side_imports_only_its_declared_light_dependencies() -> None:
    """What ``pip install farm`` brings (the declared light dependencies and what they require) is
    all farm/ imports besides the standard library, and none of it is the GPU stack."""
    graph = import_graph(ROOT / "farm")
    external = {arrow.target for arrows in graph.values() for arrow in arrows if arrow.target not in graph}
    third_party = sorted(external - set(sys.stdlib_module_names) - {"__future__"})
    installed = _required_closure(list(_declared().values()))
    distributions = importlib.metadata.packages_distributions()
    undeclared = [
        name for name in third_party
        if not any(canonicalize_name(d) in installed for d in distributions.get(name, []))
    ]
    assert undeclared == [], f"farm/ imports {undeclared}, which its light dependencies do not bring"
    heavy = {name: path for name, path in installed.items() if name in HEAVY_DISTRIBUTIONS}
    assert heavy == {}, f"a light dependency requires the GPU stack: {heavy}"


# -- at run time, in this process -----------------------------------------------------------------


class _Blocker(importlib.abc.MetaPathFinder):
    """Refuses to import ``FORBIDDEN`` packages and notes who tried (``module (file:line)``)."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in FORBIDDEN:
            self.attempts.append(f"{fullname} from {_importer()}")
            raise ImportError(f"{fullname} is blocked by the light-import test")
        return None


def _importer() -> str:
    """The first frame outside the import machinery (``importlib`` and this file)."""
    machinery = Path(importlib.__file__).parent
    frame = sys._getframe(2)
    while frame is not None and (
        frame.f_code.co_filename.startswith("<frozen")
        or frame.f_code.co_filename == __file__
        or Path(frame.f_code.co_filename).is_relative_to(machinery)
    ):
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"


@contextlib.contextmanager
def fresh_farm_without_the_gpu_side() -> Iterator[_Blocker]:
    """``farm`` importable anew while ``FORBIDDEN`` packages are not importable at all.

    Modules of ``farm`` and of ``FORBIDDEN`` packages leave ``sys.modules`` (so nothing this pytest
    process already imported can hide an import) and a blocker goes first on ``sys.meta_path``;
    afterwards the modules of the run are dropped and the originals put back, with kombu's transport
    cache, so the rest of the session sees the same objects as before.
    """
    from kombu import transport

    def ours(name: str) -> bool:
        return name.partition(".")[0] in (*FORBIDDEN, "farm")

    saved = {name: module for name, module in sys.modules.items() if ours(name)}
    saved_transports = dict(transport._transport_cache)
    for name in saved:
        del sys.modules[name]
    blocker = _Blocker()
    sys.meta_path.insert(0, blocker)
    try:
        yield blocker
    finally:
        sys.meta_path.remove(blocker)
        for name in [name for name in sys.modules if ours(name)]:
            del sys.modules[name]
        sys.modules.update(saved)
        transport._transport_cache.clear()
        transport._transport_cache.update(saved_transports)


def test_farm_submits_from_python_and_the_cli_with_the_gpu_side_unimportable(farm_settings) -> None:
    data = farm_settings.data_dir
    (data / "farm.db").unlink()  # the first use migrates the database too, as on a new laptop
    with fresh_farm_without_the_gpu_side() as blocker:
        with pytest.raises(ImportError, match="blocked by the light-import test"):
            import torch  # noqa: F401  (the blocker works)
        blocker.attempts.clear()

        import farm
        from click.testing import CliRunner

        from farm.cli.main import main as farm_command  # (farm.cli.main the attribute is the function)

        client = farm.Farm(farm.Settings(data_dir=data))
        try:
            job = client.submit("a red cube", width=64, height=64, num_images=2, seed=1)
            counts = job.status().counts
        finally:
            client.close()
        command = CliRunner().invoke(
            farm_command, ["submit", "--prompt", "x", "--width", "64", "--height", "64"],
            env={"FARM_DATA_DIR": str(data)},
        )
        attempts = list(blocker.attempts)
        loaded = sorted(name for name in sys.modules if name.partition(".")[0] in FORBIDDEN)
    assert attempts == [], f"the submitter tried to import {attempts}"
    assert loaded == []
    assert UUID.match(job.id) and counts["queued"] == 2
    assert command.exit_code == 0, command.output
    assert UUID.match(command.stdout.strip()), command.stdout
    # they really wrote: the SQLite file and one message each in the filesystem broker
    assert (data / "farm.db").is_file()
    assert len([p for p in (data / "broker" / "queue").iterdir() if p.name.endswith(".msg")]) == 2


def test_without_the_worker_side_its_commands_are_listed_and_say_what_to_install(farm_settings) -> None:
    with fresh_farm_without_the_gpu_side() as blocker:
        from click.testing import CliRunner

        from farm.cli.main import main as farm_command

        listed = CliRunner().invoke(farm_command, ["model", "--help"])
        listing_attempts = list(blocker.attempts)
        run = CliRunner().invoke(farm_command, ["model", "make-tiny", "--help"])
    assert listed.exit_code == 0, listed.output
    assert "make-tiny" in listed.stdout and "evaluate" in listed.stdout
    assert listing_attempts == []  # listed from the entry points, not imported
    assert run.exit_code == 2
    assert "needs the worker side" in run.stderr and "pip install 'farm[worker]'" in run.stderr
