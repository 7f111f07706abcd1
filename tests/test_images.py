"""The container images and the compose stack, checked without a Docker daemon: hadolint finds nothing in
the Dockerfiles; the images run as uid 1000, check /ready, install runtime dependencies only (setup.sh is run
here with the images' own settings against a fake pip), pin the vLLM the code patches, and keep a compiler
where Triton needs one; the build context leaves secrets out; the compose files match the compose-spec
schema, and every combination of them bind each host port once and leave no dead Prometheus target; Prometheus
sends the metrics key the server holds, or a placeholder an open server ignores."""

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from server.auth import parse_keys
from server.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose"
BASE_COMPOSE = COMPOSE / "docker-compose.yml"
GPU_COMPOSE = COMPOSE / "docker-compose.gpu.yml"
DOCKERFILES = {"cpu": DEPLOY / "Dockerfile.cpu", "cuda": DEPLOY / "Dockerfile.cuda"}
COMPILERS = {"build-essential", "gcc", "g++", "clang", "cpp"}


def tool(name: str) -> str:
    """A command-line tool of the dev extra, from this interpreter's environment first."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return found


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- Dockerfiles ------------------------------------------------------------------------------------------

def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped, as Docker reads them."""
    out, pending = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, args in instructions(dockerfile):
        if keyword == "FROM":
            result.append([])
        result[-1].append((keyword, args))
    return result


def args_of(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for kw, args in stage if kw == keyword]


def apt_packages(stage: list[tuple[str, str]]) -> set[str]:
    packages = set()
    for run in args_of(stage, "RUN"):
        for command in re.split(r"&&|;|\|\|", run):
            words = command.split()
            if words[:2] == ["apt-get", "install"]:
                packages |= {word.split("=")[0] for word in words[2:] if not word.startswith("-")}
    return packages


def setup_stage(dockerfile: Path) -> list[tuple[str, str]]:
    """The stage that runs deploy/setup.sh."""
    found = [stage for stage in stages(dockerfile) if any("deploy/setup.sh" in run for run in args_of(stage, "RUN"))]
    assert len(found) == 1, f"{dockerfile.name}: deploy/setup.sh should run in one stage"
    return found[0]


def setup_env(dockerfile: Path) -> dict[str, str]:
    """The variables the Dockerfile sets on its deploy/setup.sh command (`A=1 B='' ./deploy/setup.sh`)."""
    run = next(run for run in args_of(setup_stage(dockerfile), "RUN") if "deploy/setup.sh" in run)
    words = shlex.split(run)
    at = next(i for i, word in enumerate(words) if word.endswith("deploy/setup.sh"))
    env = {}
    for word in reversed(words[:at]):
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", word):
            break
        name, _, value = word.partition("=")
        env[name] = value
    return env


def test_hadolint_finds_nothing(tmp_path):
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")  # not a user's or a CI's own config: only the Dockerfiles' inline pragmas count
    env = {name: value for name, value in os.environ.items() if not name.startswith("HADOLINT_")}
    result = subprocess.run([tool("hadolint"), "--config", str(config), "--format", "json",
                             "--failure-threshold", "warning", *map(str, DOCKERFILES.values())],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    findings = json.loads(result.stdout or "[]")
    serious = [f"{Path(f['file']).name}:{f['line']} {f['code']} {f['message']}" for f in findings
               if f["level"] in ("error", "warning")]
    assert not serious and result.returncode == 0, "\n".join(serious) or result.stderr
    for dockerfile in DOCKERFILES.values():  # every rule ignored inline says why, on the comment line above
        lines = dockerfile.read_text().splitlines()
        for number, line in enumerate(lines):
            if line.startswith("# hadolint ignore="):
                above = lines[number - 1] if number else ""
                assert above.startswith("# ") and "hadolint" not in above, f"{dockerfile.name}:{number + 1}"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_base_images_are_pinned_by_tag(kind):
    names = set()
    for stage in stages(DOCKERFILES[kind]):
        image, *alias = args_of(stage, "FROM")[0].split()
        if image in names:
            continue  # a stage built earlier in this file
        assert re.fullmatch(r"python:3\.\d+-slim-(bookworm|trixie)(@sha256:[0-9a-f]{64})?", image), image
        names.update(alias[1:])


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_runs_as_uid_1000_and_checks_ready(kind):
    final = stages(DOCKERFILES[kind])[-1]
    assert args_of(final, "USER")[-1] in ("1000", "1000:1000"), "numeric, so runAsNonRoot can verify it"
    assert any(re.search(r"useradd .*--uid 1000 swapyard", run) for run in args_of(final, "RUN"))
    assert any(re.search(r"(install -d -o swapyard|chown swapyard)\b.* /data\b", run) for run in args_of(final, "RUN"))
    (port,) = args_of(final, "EXPOSE")
    (check,) = args_of(final, "HEALTHCHECK")
    assert re.search(rf"curl -fsS .*http://localhost:{port}/ready\b", check), check
    assert "/health" not in check  # /health is up while the model still loads or the database is gone


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_entrypoint_serves_everything_from_the_data_volume(kind):
    final = stages(DOCKERFILES[kind])[-1]
    entrypoint = json.loads(args_of(final, "ENTRYPOINT")[-1])  # exec form: SIGTERM reaches the server
    assert entrypoint[:2] == ["swapyard", "serve"]
    options = dict(zip(entrypoint[2::2], entrypoint[3::2], strict=True))
    assert options.get("--host") == "0.0.0.0" and options.get("--data-dir") == "/data", options
    assert options.get("--engine") == ("vllm" if kind == "cuda" else None)
    for option in options:  # options `swapyard serve` has
        assert option[2:].replace("-", "_") in ServeSettings.model_fields, option


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_every_file_setup_sh_reads_is_copied(kind):
    scripts, pending = set(), ["deploy/setup.sh"]
    while pending:  # setup.sh, what it names, what those name
        script = pending.pop()
        scripts.add(script)
        pending += set(re.findall(r"deploy/[\w.-]+\.sh", (ROOT / script).read_text())) - scripts
    copied = set()
    for args in args_of(setup_stage(DOCKERFILES[kind]), "COPY"):
        words = [word for word in args.split() if not word.startswith("--")]
        copied |= {source.rstrip("/") for source in words[:-1]}
    assert scripts <= copied, scripts - copied


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_a_compiler_only_where_triton_compiles_at_run_time(kind):
    final = apt_packages(stages(DOCKERFILES[kind])[-1])
    if kind == "cuda":  # Triton builds its launchers with the C compiler, against libc's and Python's headers
        assert final & {"build-essential", "gcc"} and final & {"build-essential", "libc6-dev"}, final
        assert "python3-dev" not in final  # the image's Python has its Python.h; Debian's would be a second Python
    else:
        assert not final & COMPILERS, final


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_setup_in_the_image_installs_runtime_dependencies_only(kind, tmp_path):
    """deploy/setup.sh, run with the variables the Dockerfile gives it, against a fake venv whose pip logs."""
    env = setup_env(DOCKERFILES[kind])
    assert env.get("SWAPYARD_TARGET") == kind and env.get("SWAPYARD_EXTRAS") == ""
    assert env.get("PIP_NO_CACHE_DIR") == "1"
    venv, log = tmp_path / "venv", tmp_path / "log"
    (venv / "bin").mkdir(parents=True)
    fakes = {
        "activate": f'export PATH="{venv}/bin:$PATH"\n',
        "pip": f'echo "pip $* | PIP_NO_CACHE_DIR=$PIP_NO_CACHE_DIR PIP_CONSTRAINT=$PIP_CONSTRAINT" >>"{log}"\n',
        "python": f'if [ "$1 $2" = "-m pip" ]; then shift 2; exec "{venv}/bin/pip" "$@"; fi\n'
                  f'echo "python $*" >>"{log}"\n',
        "swapyard": f'echo "swapyard $*" >>"{log}"\n',
    }
    for name, body in fakes.items():
        (venv / "bin" / name).write_text("#!/usr/bin/env bash\n" + body)
        (venv / "bin" / name).chmod(0o755)
    env["SWAPYARD_VENV"] = str(venv)
    if "PIP_CONSTRAINT" in env:
        env["PIP_CONSTRAINT"] = "constraint-file"
    result = subprocess.run([str(DEPLOY / "setup.sh")], capture_output=True, text=True, timeout=60,
                            env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), **env})
    assert result.returncode == 0, result.stdout + result.stderr
    calls = log.read_text().splitlines()
    installs = [call for call in calls if call.startswith("pip install")]
    assert installs and all("PIP_NO_CACHE_DIR=1" in call for call in installs)
    editable = [call for call in installs if " -e " in call]
    assert [re.search(r"\.\[([^\]]*)\]", call)[1] for call in editable] == [kind], editable
    dev = {Requirement(spec).name for spec in pyproject()["project"]["optional-dependencies"]["dev"]}
    for call in installs:
        words = set(re.split(r"[\s=<>\[\],]+", call.split(" | ")[0]))
        assert not words & dev, call
    if kind == "cuda":
        assert all("PIP_CONSTRAINT=constraint-file" in call for call in installs)
    assert "swapyard prepare-model" in calls  # the embedded model is converted at build time


def test_cuda_image_pins_the_vllm_the_code_patches():
    stated = set()
    for module in (ROOT / "server" / "engine" / "vllm").rglob("*.py"):
        stated |= set(re.findall(r"vLLM (\d+\.\d+)\b", module.read_text()))
    assert len(stated) == 1, f"server/engine/vllm/ names {stated or 'no'} vLLM releases"
    (series,) = stated
    (pin,) = set(re.findall(r"\bvllm==([\d.]+)", DOCKERFILES["cuda"].read_text()))
    assert pin.startswith(series + "."), (pin, series)
    (spec,) = pyproject()["project"]["optional-dependencies"]["cuda"]
    requirement = Requirement(spec)
    assert requirement.name == "vllm" and requirement.specifier.contains(pin), (spec, pin)
    exact = [s.version for s in requirement.specifier if s.operator == "=="]
    assert exact in ([], [pin]), (spec, pin)


# --- the build context ------------------------------------------------------------------------------------

def _pattern(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(path: str) -> bool:
    """Docker's .dockerignore rule: the last pattern that matches the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    verdict = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = _pattern(line.lstrip("!").strip("/"))
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            verdict = not negated
    return verdict


def test_build_context_holds_what_the_images_copy_and_no_secrets():
    for dockerfile in DOCKERFILES.values():
        for args in args_of(instructions(dockerfile), "COPY"):
            if "--from=" in args:
                continue
            for source in [word for word in args.split() if not word.startswith("--")][:-1]:
                files = [source] if (ROOT / source).is_file() else [
                    str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*.py") if "__pycache__" not in p.parts]
                assert files and not [f for f in files if ignored(f)], (dockerfile.name, source)
    for path in (".git/HEAD", ".venv/bin/python", "deploy/kubernetes/base/keys.txt", "deploy/kubernetes/keys.txt",
                 "deploy/kubernetes/overlays/replicas/database.env", "server/__pycache__/app.cpython-311.pyc",
                 "swapyard.egg-info/PKG-INFO", "benchmarks/results/x.json", "tests/conftest.py"):
        assert ignored(path), path


# --- compose ----------------------------------------------------------------------------------------------

REPLACED = {"command", "entrypoint", "test"}  # sequences an override replaces; others it extends


def merge(base, override, key=""):
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: merge(base[k], override[k], k) if k in base and k in override else override.get(k, base.get(k))
                for k in base | override}
    if isinstance(base, list) and isinstance(override, list) and key not in REPLACED:
        return base + [item for item in override if item not in base]
    return override


def load(files: tuple[Path, ...]) -> dict:
    config: dict = {}
    for file in files:
        config = merge(config, yaml.safe_load(file.read_text()))
    return config


def active_services(config: dict, profiles: set[str]) -> dict[str, dict]:
    return {name: service for name, service in config["services"].items()
            if not service.get("profiles") or profiles & set(service["profiles"])}


def host_ports(service: dict) -> list[tuple[int, str]]:
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            published, protocol = port.get("published"), port.get("protocol", "tcp")
        else:
            spec, _, protocol = str(port).partition("/")
            fields = spec.split(":")
            published = fields[-2] if len(fields) > 1 else None  # CONTAINER alone: an ephemeral host port
        if published is not None:
            out.append((int(published), protocol or "tcp"))
    return out


def container_ports(service: dict) -> set[int]:
    ports = service.get("ports", [])
    return {int(port["target"]) if isinstance(port, dict) else int(str(port).split("/")[0].split(":")[-1])
            for port in ports}


def names(name: str, service: dict) -> set[str]:
    """The DNS names of a service on the compose network: its own and its aliases."""
    aliases = set()
    networks = service.get("networks") or {}
    for network in networks.values() if isinstance(networks, dict) else []:
        aliases |= set((network or {}).get("aliases", []))
    return {name} | aliases


def compose_options(words: list[str]) -> tuple[list[str], set[str]]:
    """The -f files and --profile names of `docker compose OPTIONS SUBCOMMAND ...`."""
    files, profiles, words = [], set(), iter(words)
    for word in words:
        if word in ("-f", "--file"):
            files.append(next(words, ""))
        elif word == "--profile":
            profiles.add(next(words, ""))
        elif word.startswith(("--file=", "--profile=")):
            (files.append if word.startswith("--file=") else profiles.add)(word.partition("=")[2])
        elif word in ("-p", "--project-name", "--env-file", "--project-directory"):
            next(words, None)
        elif not word.startswith("-"):
            break  # the subcommand
    return files, profiles


def documented() -> set[tuple[tuple[Path, ...], frozenset[str]]]:
    """The (compose files, profiles) of every `docker compose` command in the READMEs and the compose files."""
    found = set()
    for source in (ROOT / "README.md", DEPLOY / "README.md", *sorted(COMPOSE.glob("*.yml"))):
        for line in source.read_text().splitlines() if source.is_file() else []:
            for match in re.finditer(r"COMPOSE_FILE=([\w./:-]+)", line):
                found.add((tuple(compose_file(name) for name in match[1].split(":")), frozenset()))
            for match in re.finditer(r"docker compose\b([^`\n]*)", line):
                files, profiles = compose_options(match[1].split(" #")[0].split())
                found.add((tuple(compose_file(name) for name in files) or (BASE_COMPOSE,), frozenset(profiles)))
    return found


def compose_file(name: str) -> Path:
    """A documented file name (`docker-compose.yml`, `deploy/compose/docker-compose.yml`) as a path."""
    return COMPOSE / Path(name).name


def test_compose_files_match_the_compose_spec():
    result = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                             str(BASE_COMPOSE), str(GPU_COMPOSE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def combinations():
    profiles = sorted({p for file in (BASE_COMPOSE, GPU_COMPOSE)
                       for service in yaml.safe_load(file.read_text())["services"].values()
                       for p in service.get("profiles", [])})
    chosen = {(files, frozenset(subset)) for files in ((BASE_COMPOSE,), (BASE_COMPOSE, GPU_COMPOSE))
              for n in range(len(profiles) + 1) for subset in itertools.combinations(profiles, n)}
    return sorted(chosen | documented(), key=lambda c: ([f.name for f in c[0]], sorted(c[1])))


COMBINATIONS = combinations()


@pytest.mark.parametrize("files, profiles", COMBINATIONS, ids=[
    "+".join(f.name.removeprefix("docker-compose").removesuffix(".yml").strip(".") or "base" for f in files)
    + "".join(f"--profile={p}" for p in sorted(profiles)) for files, profiles in COMBINATIONS])
def test_each_compose_combination_binds_ports_once_and_scrapes_live_targets(files, profiles):
    assert all(file.is_file() for file in files), f"a documented compose file does not exist: {files}"
    config = load(files)
    defined = {p for service in config["services"].values() for p in service.get("profiles", [])}
    assert profiles <= defined, f"documented profiles that no service has: {profiles - defined}"
    services = active_services(config, set(profiles))
    for name, service in services.items():  # compose refuses to start a required dependency left out
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services or condition.get("required") is False, (name, dependency)
    bound = [port for service in services.values() for port in host_ports(service)]
    assert len(bound) == len(set(bound)), f"a host port bound twice: {sorted(bound)}"
    reachable = {alias: name for name, service in services.items() for alias in names(name, service)}
    scrape = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] for static in job["static_configs"] for t in static["targets"]]
    for target in targets:
        host, port = target.rsplit(":", 1)
        assert host in reachable, f"Prometheus target {target} is not started with {sorted(services)}"
        assert int(port) in container_ports(services[reachable[host]]), target
    datasource = yaml.safe_load((COMPOSE / "grafana/provisioning/datasources/prometheus.yml").read_text())
    for source in datasource["datasources"]:
        assert re.match(r"https?://([^:/]+)", source["url"])[1] in reachable, source["url"]


def test_the_gpu_file_swaps_the_swapyard_image_in_place():
    for files, kind in (((BASE_COMPOSE,), "cpu"), ((BASE_COMPOSE, GPU_COMPOSE), "cuda")):
        swapyard = load(files)["services"]["swapyard"]
        context = (COMPOSE / swapyard["build"]["context"]).resolve()
        assert context == ROOT and context / swapyard["build"]["dockerfile"] == DOCKERFILES[kind]
        assert swapyard["image"] == f"swapyard:{kind}" and swapyard["pull_policy"] == "build"
        devices = swapyard.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        assert [d["driver"] for d in devices] == (["nvidia"] if kind == "cuda" else [])
        assert host_ports(swapyard) == [(8000, "tcp")] and container_ports(swapyard) == {8000}


def test_postgres_profile_wires_the_database_url_and_keeps_it_out_of_git():
    services = yaml.safe_load(BASE_COMPOSE.read_text())["services"]
    assert services["postgres"]["image"].startswith("postgres:") and services["postgres"]["profiles"] == ["postgres"]
    assert services["swapyard"]["environment"]["SWAPYARD_DATABASE_URL"].startswith("${SWAPYARD_DATABASE_URL")
    assert services["swapyard"]["depends_on"]["postgres"] == {"condition": "service_healthy", "required": False}


INTERPOLATION = re.compile(r"\$\{(\w+)(?::([-+])([^${}]*))?\}")  # innermost first: ${A}, ${A:-x}, ${A:+x}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation of the forms docker-compose.yml uses, nested ones included."""
    def one(match: re.Match) -> str:
        value = env.get(match[1], "")
        return {"-": value or match[3], "+": match[3] if value else ""}.get(match[2], value)

    while (replaced := INTERPOLATION.sub(one, text)) != text:
        text = replaced
    assert "$" not in text, text
    return text


@pytest.mark.parametrize("keys, metrics_key", [("", ""), ("admin:a1", ""), ("", "m1"), ("admin:a1,inference:i1", "m1")])
def test_prometheus_sends_the_metrics_key_the_server_holds(keys, metrics_key):
    """SWAPYARD_METRICS_KEY is one more of the server's keys (`metrics:KEY`) and the credential Prometheus sends;
    unset, the server's keys are what SWAPYARD_API_KEYS says (none: open) and never an empty `metrics:` entry,
    which the server refuses at start-up."""
    config = load((BASE_COMPOSE,))
    env = {name: value for name, value in (("SWAPYARD_API_KEYS", keys), ("SWAPYARD_METRICS_KEY", metrics_key)) if value}
    held = parse_keys(interpolate(config["services"]["swapyard"]["environment"]["SWAPYARD_API_KEYS"], env), "env")
    assert held == parse_keys(keys, "env") | (parse_keys(f"metrics:{metrics_key}", "env") if metrics_key else {})
    mounted = {config_file["target"]: config_file for config_file in config["services"]["prometheus"]["configs"]}
    for job in yaml.safe_load((COMPOSE / "prometheus.yml").read_text())["scrape_configs"]:
        authorization = job["authorization"]
        assert authorization.get("type", "Bearer") == "Bearer" and "credentials" not in authorization
        credential_file = mounted[authorization["credentials_file"]]
        assert credential_file["mode"] & 0o004, "Prometheus runs as nobody: the file must be readable by others"
        sent = interpolate(config["configs"][credential_file["source"]]["content"], env)
        # Compose writes no file for an empty config, and Prometheus would fail every scrape on the missing file.
        assert (sent == metrics_key) if metrics_key else sent.strip(), sent
