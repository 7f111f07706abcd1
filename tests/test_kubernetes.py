"""The Kubernetes manifests (deploy/kubernetes) as the cluster would get them: every overlay is rendered with
`kubectl kustomize` (the kustomize that `kubectl apply -k` runs), every object it renders is validated offline
against the Kubernetes schemas (kubernetes-validate), and the rendered objects get right what a GPU pod on a
fresh volume needs: the image's uid owning the volume, a rollout that never waits on the GPU or volume the old
pod holds, a memory-backed /dev/shm, probes that wait for the model, a model that something actually fills, no
secret in git, a documented keys command that writes a key of every scope (Prometheus' metrics key among them),
and the InferencePool only where an overlay asks for it.

Not run here: applying to a real cluster (storage classes, GPUs, the download, the inference extension)."""

import base64
import os
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from server.auth import SCOPES, parse_keys

REPO = Path(__file__).resolve().parents[1]
KUBERNETES = REPO / "deploy" / "kubernetes"
OVERLAYS = ("single-node", "replicas")
# The API server release the schemas are taken from (kubectl 1.32 renders; the preStop sleep action is on
# by default from 1.30).
KUBERNETES_VERSION = "1.32"
IMAGE = "ghcr.io/swapyard/swapyard:cuda"
UID = 1000  # user swapyard in deploy/Dockerfile.*
LABEL = {"app.kubernetes.io/name": "swapyard"}
DUMMY_KEYS = "admin:test-admin-key\ninference:test-inference-key\nmetrics:test-metrics-key\n"  # as documented
DUMMY_DATABASE_URL = "postgresql://swapyard:test@postgres:5432/swapyard"
# A kustomization of one's own: the single-node overlay plus the optional component, as the overlays'
# comments say to do it.
WITH_POOL = "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n" \
            "resources: [../single-node]\ncomponents: [../../components/inference-pool]\n"


@pytest.fixture(scope="module")
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl not found on PATH: these tests render deploy/kubernetes with `kubectl kustomize` "
                    "(kubectl 1.27 or newer bundles kustomize v5); install kubectl")
    return path


def copy_tree(destination: Path, keys: bool = True, database: bool = True) -> Path:
    """deploy/kubernetes in a folder of its own, with dummy secret inputs (never a developer's real ones)."""
    tree = destination / "kubernetes"
    shutil.copytree(KUBERNETES, tree, ignore=shutil.ignore_patterns("keys.txt", "database.env"))
    if keys:
        (tree / "base" / "keys.txt").write_text(DUMMY_KEYS)
    if database:
        (tree / "overlays" / "replicas" / "database.env").write_text(f"SWAPYARD_DATABASE_URL={DUMMY_DATABASE_URL}\n")
    return tree


def kustomize(kubectl: str, folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)


def render(kubectl: str, folder: Path) -> list[dict]:
    built = kustomize(kubectl, folder)
    assert built.returncode == 0, f"kubectl kustomize {folder} failed:\n{built.stderr}"
    return [document for document in yaml.safe_load_all(built.stdout) if document]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    tree = copy_tree(tmp_path_factory.mktemp("complete"))
    (tree / "overlays" / "with-pool").mkdir()
    (tree / "overlays" / "with-pool" / "kustomization.yaml").write_text(WITH_POOL)
    return tree


@pytest.fixture(scope="module")
def rendered(kubectl, tree) -> dict[str, list[dict]]:
    return {name: render(kubectl, tree / "overlays" / name) for name in (*OVERLAYS, "with-pool")}


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} rendered"
    return found[0]


def pod_of(objects: list[dict]) -> dict:
    return one(objects, "Deployment", "swapyard")["spec"]["template"]["spec"]


def container(pod: dict, name: str = "swapyard", kind: str = "containers") -> dict:
    return next(c for c in pod[kind] if c["name"] == name)


def claims(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == "PersistentVolumeClaim"}


def test_the_layout_is_kustomize_standard():
    component = yaml.safe_load((KUBERNETES / "components" / "inference-pool" / "kustomization.yaml").read_text())
    assert (component["apiVersion"], component["kind"]) == ("kustomize.config.k8s.io/v1alpha1", "Component")
    base = yaml.safe_load((KUBERNETES / "base" / "kustomization.yaml").read_text())
    assert "inferencepool.yaml" not in base["resources"] and "components" not in base
    for overlay in OVERLAYS:
        text = (KUBERNETES / "overlays" / overlay / "kustomization.yaml").read_text()
        kustomization = yaml.safe_load(text)
        assert "../../base" in kustomization["resources"] and "components" not in kustomization, overlay
        assert "../../components/inference-pool" in text, overlay  # how to opt in, shown where it is done
    # The old flat layout (an overlay inside its base: "cycle detected") is gone.
    assert not (KUBERNETES / "kustomization.yaml").exists() and not (KUBERNETES / "replicas").exists()


@pytest.mark.parametrize("overlay", [*OVERLAYS, "with-pool"])
def test_every_rendered_object_is_valid_kubernetes(rendered, overlay):
    objects = rendered[overlay]
    for obj in objects:
        where = f"{overlay}: {obj['kind']} {obj['metadata']['name']}"
        assert obj["metadata"].get("labels", {}).items() >= LABEL.items(), where
        if obj["kind"] == "InferencePool":
            continue  # a CRD with no schema in kubernetes-validate: its fields are checked in test_inference_pool_*
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
    # What the pod refers to is rendered too (kustomize renames the hashed ConfigMap everywhere).
    pod = pod_of(objects)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for volume in pod["volumes"]:
        if "persistentVolumeClaim" in volume:
            assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names, volume
        if "secret" in volume:
            assert ("Secret", volume["secret"]["secretName"]) in names, volume
    for c in pod["containers"] + pod["initContainers"]:
        for source in c.get("envFrom", []):
            assert ("Secret", source["secretRef"]["name"]) in names, source
        for variable in c.get("env", []):
            reference = variable.get("valueFrom", {})
            if "configMapKeyRef" in reference:
                assert ("ConfigMap", reference["configMapKeyRef"]["name"]) in names, variable
            if "secretKeyRef" in reference:  # only the optional HF token, which the user creates if needed
                assert reference["secretKeyRef"].get("optional") is True, variable


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pod_runs_as_the_image_user_and_owns_a_fresh_volume(rendered, overlay):
    pod = pod_of(rendered[overlay])
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == UID
    # A new volume is root's: without fsGroup the server cannot create /data/adapters and crash-loops.
    assert security["fsGroup"] == UID
    for c in pod["containers"] + pod["initContainers"]:
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
        assert c["image"] == IMAGE, c["name"]


def test_the_image_is_set_in_one_place(kubectl, tree):
    """An overlay's `images:` entry changes the serving and the model-fetching container alike."""
    mine = tree / "overlays" / "my-registry"
    mine.mkdir()
    (mine / "kustomization.yaml").write_text(
        "resources: [../single-node]\nimages:\n"
        "  - {name: ghcr.io/swapyard/swapyard, newName: registry.example.com/swapyard, newTag: v1}\n")
    pod = pod_of(render(kubectl, mine))
    assert {c["image"] for c in pod["containers"] + pod["initContainers"]} == {"registry.example.com/swapyard:v1"}


def test_single_node_rolls_out_by_recreating_on_a_readwriteonce_volume(rendered):
    objects = rendered["single-node"]
    deployment = one(objects, "Deployment", "swapyard")
    claim = claims(objects)[pod_of(objects)["volumes"][0]["persistentVolumeClaim"]["claimName"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    # RollingUpdate would start the new pod first: it would wait forever for the old pod's GPU and volume.
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert deployment["spec"]["replicas"] == 1


def test_replicas_share_a_readwritemany_volume_of_their_own_and_postgresql(rendered):
    objects = rendered["replicas"]
    deployment = one(objects, "Deployment", "swapyard")
    assert deployment["spec"]["replicas"] >= 2
    # A claim's accessModes are immutable: the RWX volume is another claim, and the RWO one is not rendered.
    assert {name: c["spec"]["accessModes"] for name, c in claims(objects).items()} == {
        "swapyard-shared": ["ReadWriteMany"]}
    assert "swapyard-shared" not in claims(rendered["single-node"])
    data = next(v for v in pod_of(objects)["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"]["claimName"] == "swapyard-shared"
    # One pod at a time and never a surge pod, which would need a GPU beyond the replicas' own.
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxSurge"] == 0 and strategy["rollingUpdate"]["maxUnavailable"] >= 1
    assert one(objects, "PodDisruptionBudget", "swapyard")["spec"]["maxUnavailable"] == 1
    # The database URL from the gitignored database.env, into every pod's environment.
    assert container(pod_of(objects))["envFrom"] == [{"secretRef": {"name": "swapyard-database"}}]
    secret = one(objects, "Secret", "swapyard-database")
    assert set(secret["data"]) == {"SWAPYARD_DATABASE_URL"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_rollout_waits_for_a_gpu_or_volume_the_old_pod_holds(rendered, overlay):
    objects = rendered[overlay]
    deployment = one(objects, "Deployment", "swapyard")
    pod = pod_of(objects)
    assert int(container(pod)["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    used = [claims(objects)[v["persistentVolumeClaim"]["claimName"]] for v in pod["volumes"]
            if "persistentVolumeClaim" in v]
    strategy = deployment["spec"].get("strategy", {"type": "RollingUpdate"})  # the API's default
    if any("ReadWriteOnce" in claim["spec"]["accessModes"] for claim in used):
        assert strategy == {"type": "Recreate"}
    if strategy["type"] == "RollingUpdate":
        assert strategy.get("rollingUpdate", {}).get("maxSurge") == 0  # the default (25%) surges one pod


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shared_memory_for_tensor_parallelism(rendered, overlay):
    pod = pod_of(rendered[overlay])
    shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    assert len(shm) == 1 and shm[0]["emptyDir"]["sizeLimit"]  # bounded: it counts against the pod's memory
    assert {"name": shm[0]["name"], "mountPath": "/dev/shm"} in container(pod)["volumeMounts"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_wait_for_the_model(rendered, overlay):
    serving = container(pod_of(rendered[overlay]))
    # /health answers 200 while the model loads: startup and readiness need /ready.
    assert serving["startupProbe"]["httpGet"]["path"] == "/ready"
    assert serving["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert serving["livenessProbe"]["httpGet"]["path"] == "/health"  # 503 once loading has failed
    startup = serving["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60  # a large model loads for minutes
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert serving[probe]["httpGet"]["port"] == "http"
    assert serving["ports"] == [{"name": "http", "containerPort": 8000}]
    service = one(rendered[overlay], "Service", "swapyard")
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_state_and_the_model_are_on_the_data_volume(rendered, overlay):
    objects = rendered[overlay]
    pod = pod_of(objects)
    serving, fetch = container(pod), container(pod, "fetch-model", "initContainers")
    assert "--data-dir=/data" in serving["args"] and "--model=$(MODEL_DIR)" in serving["args"]
    assert not any(arg.startswith(("--adapter-store", "--fine-tuning-dir")) for arg in serving["args"])
    for c in (serving, fetch):
        assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"], c["name"]
        env = {variable["name"]: variable for variable in c["env"]}
        assert env["MODEL_DIR"]["value"] == "/data/models/$(MODEL_ID)", c["name"]
        reference = env["MODEL_ID"]["valueFrom"]["configMapKeyRef"]
        model = one(objects, "ConfigMap", reference["name"])
        assert model["data"][reference["key"]], c["name"]
    assert "HF_TOKEN" not in {variable["name"] for variable in serving["env"]}  # serving needs no token


FAKE_HF = """#!/bin/sh
echo "$@" >> "$HF_CALLS"
if [ -n "${HF_FAIL:-}" ]; then echo "hf: network unreachable" >&2; exit 1; fi
while [ $# -gt 0 ]; do [ "$1" = --local-dir ] && dir=$2; shift; done
mkdir -p "$dir/.cache/huggingface"
echo '{"ours": true}' > "$dir/config.json"
echo weights > "$dir/model.safetensors"
if [ -n "${HF_RACE:-}" ]; then mkdir -p "$MODEL_DIR" && echo '{"theirs": true}' > "$MODEL_DIR/config.json"; fi
"""


def test_the_init_container_fetches_the_model_once_and_atomically(rendered, tmp_path):
    """The rendered init container's script, run here with a stand-in `hf` on PATH."""
    command = container(pod_of(rendered["single-node"]), "fetch-model", "initContainers")["command"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "hf").write_text(FAKE_HF)
    (bin_dir / "hf").chmod(0o755)
    calls = tmp_path / "hf-calls"
    model = tmp_path / "data" / "models" / "Org" / "Model"

    def fetch(pod: str, **extra: str) -> subprocess.CompletedProcess:
        env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_CALLS": str(calls), "MODEL_ID": "Org/Model",
               "MODEL_DIR": str(model), "HOSTNAME": pod, **extra}
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)

    def partials() -> list[Path]:
        return sorted(model.parent.glob("Model.partial.*"))

    # Nothing there and no network: the pod does not start, and no half model is left where the server looks.
    failed = fetch("pod-a", HF_FAIL="1")
    assert failed.returncode != 0 and "download of Org/Model failed" in failed.stderr
    assert not model.exists()
    # The retry (same pod) downloads into its own folder and renames it into place; leftovers are removed.
    (model.parent / "Model.partial.dead-pod").mkdir()
    done = fetch("pod-a")
    assert done.returncode == 0, done.stderr
    call = calls.read_text().splitlines()[-1]
    assert call == f"download Org/Model --local-dir {model}.partial.pod-a --exclude original/*"
    assert (model / "config.json").read_text() == '{"ours": true}\n' and (model / "model.safetensors").exists()
    assert not (model / ".cache").exists() and partials() == []
    # Later starts find it and need no network.
    again = fetch("pod-b", HF_FAIL="1")
    assert again.returncode == 0, again.stderr
    assert len(calls.read_text().splitlines()) == 2
    # Two pods on a shared volume: the one that finishes second keeps the winner's folder and drops its own.
    shutil.rmtree(model)
    raced = fetch("pod-c", HF_RACE="1")
    assert raced.returncode == 0, raced.stderr
    assert (model / "config.json").read_text() == '{"theirs": true}\n' and partials() == []
    assert [p.name for p in model.iterdir()] == ["config.json"]  # not ours moved inside theirs


def test_no_secret_ships_with_the_manifests(kubectl, tmp_path):
    for manifest in (*KUBERNETES.rglob("*.yaml"), *KUBERNETES.rglob("*.yml")):
        for document in yaml.safe_load_all(manifest.read_text()):
            assert (document or {}).get("kind") != "Secret", manifest
    base = yaml.safe_load((KUBERNETES / "base" / "kustomization.yaml").read_text())
    assert base["secretGenerator"] == [{"name": "swapyard-api-keys", "files": ["keys.txt"],
                                        "options": {"disableNameSuffixHash": True}}]
    replicas = yaml.safe_load((KUBERNETES / "overlays" / "replicas" / "kustomization.yaml").read_text())
    assert replicas["secretGenerator"] == [{"name": "swapyard-database", "envs": ["database.env"],
                                            "options": {"disableNameSuffixHash": True}}]
    # Their inputs are gitignored, here and in any overlay of one's own.
    for path in ("base/keys.txt", "overlays/replicas/database.env", "overlays/mine/keys.txt"):
        ignored = subprocess.run(["git", "check-ignore", "--no-index", "-q", f"deploy/kubernetes/{path}"], cwd=REPO)
        assert ignored.returncode == 0, f"deploy/kubernetes/{path} is not gitignored"
    # Without the keys file nothing renders, so no deployment runs without keys or with a shipped one.
    no_keys = copy_tree(tmp_path / "no-keys", keys=False)
    for overlay in OVERLAYS:
        built = kustomize(kubectl, no_keys / "overlays" / overlay)
        assert built.returncode != 0 and "keys.txt" in built.stderr, overlay
    no_database = copy_tree(tmp_path / "no-database", database=False)
    built = kustomize(kubectl, no_database / "overlays" / "replicas")
    assert built.returncode != 0 and "database.env" in built.stderr


def test_rendered_keys_are_the_file_given(rendered):
    for overlay in OVERLAYS:
        secret = one(rendered[overlay], "Secret", "swapyard-api-keys")
        assert base64.b64decode(secret["data"]["keys.txt"]).decode() == DUMMY_KEYS
        volume = next(v for v in pod_of(rendered[overlay])["volumes"] if v.get("secret"))
        assert volume["secret"]["secretName"] == "swapyard-api-keys"
        assert "--api-keys-file=/secrets/keys.txt" in container(pod_of(rendered[overlay]))["args"]


def test_the_documented_keys_command_writes_a_key_of_every_scope(tmp_path):
    """The keys.txt command of base/kustomization.yaml and deploy/README.md, run as written: a file the server
    accepts, with one key of each scope (metrics: Prometheus' key, as /metrics needs one here), all different.
    The tests' dummy file has the same scopes."""
    sources = (KUBERNETES / "base" / "kustomization.yaml", REPO / "deploy" / "README.md")
    commands = {line.lstrip("# ").strip() for source in sources for line in source.read_text().splitlines()
                if line.rstrip().endswith("> deploy/kubernetes/base/keys.txt")}
    assert len(commands) == 1, commands  # the same command wherever it is written
    (tmp_path / "deploy" / "kubernetes" / "base").mkdir(parents=True)
    subprocess.run(["bash", "-c", commands.pop()], cwd=tmp_path, check=True, timeout=30)
    written = parse_keys((tmp_path / "deploy" / "kubernetes" / "base" / "keys.txt").read_text(), "keys.txt")
    assert sorted(entry.scope for entry in written.values()) == sorted(SCOPES)
    assert sorted(entry.scope for entry in parse_keys(DUMMY_KEYS, "DUMMY_KEYS").values()) == sorted(SCOPES)


def test_inference_pool_only_where_an_overlay_adds_the_component(rendered):
    for overlay in OVERLAYS:
        assert not [o for o in rendered[overlay] if o["kind"] == "InferencePool"], overlay
    objects = rendered["with-pool"]
    pool = one(objects, "InferencePool", "swapyard")
    # Not in kubernetes-validate's schemas (a CRD of the Gateway API inference extension): its v1 fields here.
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert set(pool["spec"]) == {"selector", "targetPorts", "endpointPickerRef"}
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"] == pod_labels
    assert pool["spec"]["targetPorts"] == [{"number": container(pod_of(objects))["ports"][0]["containerPort"]}]
    assert pool["spec"]["endpointPickerRef"] == {"name": "swapyard-epp", "port": {"number": 9002}}
    # The rest is the single-node overlay's, unchanged.
    assert [o for o in objects if o["kind"] != "InferencePool"] == rendered["single-node"]
