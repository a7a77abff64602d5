"""cluster/: the Ray cluster launcher YAML, the KubeRay RayJob and the SLURM script.

Checked without a cluster: nothing here starts Ray, reaches a cloud or pulls an image. The
launcher YAML is validated against the JSON schema that ships inside the installed ray and
through the config checks ``ray up`` runs before it touches a provider; the RayJob's structure
(GPU limits, the token from a Kubernetes Secret, the data and job volumes); the SLURM script
with ``bash -n`` and by running it against stub ``srun``/``scontrol``/``ray`` commands; no file
holds a literal token; and the command and job keys every config uses exist in this unicon_dist.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import os
import re
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml

import unicon_dist as ud
from unicon_dist.apps import job_config, jobs
from unicon_dist.apps.model_options import model_param_names
from unicon_dist.apps.cli import build_parser
from unicon_dist.data.store import PairStore

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "aws-gpu.yaml"
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
SBATCH = CLUSTER / "slurm.sbatch"
JOB = CLUSTER / "job.toml"
DOCKERFILE = CLUSTER / "Dockerfile"
README = CLUSTER / "README.md"
BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="bash is not installed")

COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")


def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def rayjob() -> dict:
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    found = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(found) == 1, f"{RAYJOB.name} must hold exactly one RayJob, found {len(found)}"
    return found[0]


def cluster_job() -> dict:
    return tomllib.loads(JOB.read_text())


def ray_container(group: dict) -> dict:
    containers = group["template"]["spec"]["containers"]
    assert containers, "a pod template without containers"
    return containers[0]  # KubeRay's Ray container is the first one


def env_of(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def worker_groups() -> list[dict]:
    groups = rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert groups, "the RayJob has no worker group"
    return groups


def sbatch_option(name: str) -> str | None:
    m = re.search(rf"^#SBATCH\s+--{name}=(\S+)", SBATCH.read_text(), re.M)
    return m.group(1) if m else None


# ------------------------------------------------------------------------------- all files
def test_cluster_folder_has_the_three_configs_and_a_readme():
    for p in (LAUNCHER, RAYJOB, SBATCH, JOB, README):
        assert p.is_file(), f"missing {p.relative_to(ROOT)}"
    text = README.read_text()
    for p in (LAUNCHER, RAYJOB, SBATCH, JOB):
        assert p.name in text, f"cluster/README.md does not mention {p.name}"
    for how in ("ray up cluster/aws-gpu.yaml", "kubectl apply -f cluster/kuberay-rayjob.yaml",
                "sbatch cluster/slurm.sbatch", "ray job submit"):
        assert how in text, f"cluster/README.md does not show {how!r}"


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.y*ml")), ids=lambda p: p.name)
def test_every_yaml_file_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), f"{path.name}: expected YAML mappings"


# Anything that looks like a real token: long hex or base64 runs, or a literal value given to
# RAY_AUTH_TOKEN / an auth_token key (a $VARIABLE or a file:// reference is not a literal).
_HEX = re.compile(r"(?<![0-9A-Za-z])[0-9a-fA-F]{32,}(?![0-9A-Za-z])")
_B64 = re.compile(r"(?<![A-Za-z0-9+/_-])(?=[A-Za-z0-9+/_-]*\d)(?=[A-Za-z0-9+/_-]*[A-Za-z])[A-Za-z0-9+/_-]{40,}={0,2}")
_ASSIGNED = re.compile(r"\b(RAY_AUTH_TOKEN|auth_token)\s*[:=]\s*['\"]?(?!\$|file://)([^\s'\"$]{8,})")


def literal_tokens(text: str) -> list[str]:
    return ([m.group(0) for m in _HEX.finditer(text)] + [m.group(0) for m in _B64.finditer(text)]
            + [m.group(0) for m in _ASSIGNED.finditer(text)])


def test_the_token_detector_catches_tokens():
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` makes
    assert literal_tokens(f"export RAY_AUTH_TOKEN={token}")
    assert literal_tokens(f"  - name: RAY_AUTH_TOKEN\n    value: {token}\n")
    assert literal_tokens("stringData:\n  auth_token: super-secret-example\n")
    assert literal_tokens(f"RAY_AUTH_TOKEN: '{secrets.token_urlsafe(32)}'")
    assert not literal_tokens("--secret-id unicon-dist/ray-auth-token > ~/.ray/auth_token.new")
    assert not literal_tokens("--from-file=auth_token=$HOME/.ray/auth_token")


@pytest.mark.parametrize("path", sorted(p for p in CLUSTER.iterdir() if p.is_file()), ids=lambda p: p.name)
def test_no_file_in_cluster_holds_a_token(path):
    found = literal_tokens(path.read_text())
    assert not found, f"{path.name} holds what looks like a literal token: {found}"


def test_no_kubernetes_secret_is_defined_in_the_manifest():
    for doc in yaml.safe_load_all(RAYJOB.read_text()):
        if doc:
            assert doc.get("kind") != "Secret", "the token Secret is created from a file, never in the manifest"


def test_every_placeholder_is_documented():
    readme = README.read_text()
    for path in CLUSTER.iterdir():
        if path.is_file() and path != README:
            for name in set(re.findall(r"REPLACE_WITH_[A-Z_]+", path.read_text())):
                assert name in readme, f"{path.name}: placeholder {name} is not explained in cluster/README.md"


# ----------------------------------------------------------------- the command every config runs
def test_unicon_dist_is_an_entry_point_with_a_solve_subcommand():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "unicon-dist" in scripts, "pyproject.toml has no unicon-dist entry point"
    module, _, attr = scripts["unicon-dist"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    args = build_parser().parse_args(["solve", "job.toml"])
    assert args.command == "solve" and args.job == Path("job.toml")


def parse_solve(command: str):
    words = shlex.split(command, comments=True)
    assert words[0] == "unicon-dist", command
    try:
        return build_parser().parse_args(words[1:])
    except SystemExit:
        pytest.fail(f"unicon-dist rejects the command line {command!r}")


def test_the_rayjob_entrypoint_is_a_valid_solve_command():
    args = parse_solve(rayjob()["spec"]["entrypoint"])
    assert args.command == "solve" and args.job.suffix == ".toml" and args.job.is_absolute()


def test_every_solve_command_in_the_docs_and_configs_parses():
    found = 0
    for path in (README, LAUNCHER, RAYJOB, JOB):
        for m in re.finditer(r"unicon-dist (solve [^`'\"\n]+)", path.read_text()):
            args = parse_solve("unicon-dist " + m.group(1))
            assert args.command == "solve"
            found += 1
    assert found >= 4
    assert re.search(r'unicon-dist solve "\$JOB_FILE" "\$@"', SBATCH.read_text()), \
        "slurm.sbatch does not run unicon-dist solve on its job file"


# ------------------------------------------------------------------------- the cluster job file
def test_cluster_job_uses_only_keys_that_jobs_accepts():
    raw = cluster_job()
    assert set(raw) <= set(job_config.TABLES)
    assert set(raw["data"]) <= set(job_config.DATA_KEYS)
    assert set(raw["model"]) <= set(model_param_names())
    assert set(raw["executor"]) <= set(job_config.EXECUTOR_KEYS)
    assert set(raw["output"]) <= set(job_config.OUTPUT_KEYS)
    ex = raw["executor"]
    assert ex["kind"] in job_config.EXECUTOR_KINDS and ex["kind"] != "local", "a cluster job runs on Ray"
    assert set(job_config.RAY_KEYS) <= set(ex), "a cluster job sets address, num_workers and num_gpus_per_worker"
    assert ex["address"] == "auto"
    if ex["num_gpus_per_worker"] > 0:  # RayExecutor: the actors compute on `device`
        assert str(raw["model"].get("device", "cpu")).startswith("cuda")


def test_cluster_job_validates_next_to_a_store(tmp_path, monkeypatch):
    """load_job accepts cluster/job.toml when it lies next to a store, as on the shared filesystem."""
    raw = cluster_job()
    rank = raw["model"]["rank"]
    store = PairStore.create(tmp_path / raw["data"]["store"], rank + 2, rank + 2, chunk_rows=32)
    rng = np.random.default_rng(0)
    store.append(rng.normal(size=(64, rank + 2)), rng.normal(size=(64, rank + 2)))
    job_file = tmp_path / "job.toml"
    shutil.copy(JOB, job_file)
    if getattr(ud, "RayExecutor", None) is None:  # validation only asks whether the class exists
        monkeypatch.setattr(ud, "RayExecutor", type("RayExecutor", (), {}), raising=False)
    job = jobs.load_job(job_file)
    ex = raw["executor"]
    assert (job.executor.kind, job.executor.address) == (ex["kind"], ex["address"])
    assert (job.executor.num_workers, job.executor.num_gpus_per_worker) == (ex["num_workers"], ex["num_gpus_per_worker"])
    assert job.data.store.path == (tmp_path / raw["data"]["store"]).resolve()
    assert job.output.model.parent.parent == tmp_path.resolve(), "outputs resolve next to the job file"
    if "address" in inspect.signature(ud.RayExecutor).parameters:  # the real class: the kwargs fit it
        inspect.signature(ud.RayExecutor).bind(address=ex["address"], num_workers=ex["num_workers"],
                                                num_gpus_per_worker=ex["num_gpus_per_worker"])


def test_worker_counts_agree_across_configs():
    """[executor] num_workers = the GPUs each config brings up (one actor per GPU)."""
    ex = cluster_job()["executor"]
    gpus_wanted = ex["num_workers"] * ex["num_gpus_per_worker"]
    cfg = launcher()
    aws = sum(t.get("min_workers", 0) * t["resources"].get("GPU", 0) for t in cfg["available_node_types"].values())
    k8s = sum(g["replicas"] * int(ray_container(g)["resources"]["limits"]["nvidia.com/gpu"]) for g in worker_groups())
    slurm = int(sbatch_option("nodes")) * int(sbatch_option("gpus-per-node").split(":")[-1])
    assert aws == k8s == slurm == gpus_wanted, (aws, k8s, slurm, gpus_wanted)


def test_ray_and_torch_versions_agree_across_configs():
    text = LAUNCHER.read_text()
    launcher_ray = re.findall(r"ray\[default\]==([\w.]+)", text)
    launcher_torch = set(re.findall(r"torch==([\w.]+)", text))
    docker = DOCKERFILE.read_text()
    docker_ray = re.search(r"ARG RAY_VERSION=([\w.]+)", docker).group(1)
    docker_torch = re.search(r"ARG TORCH_VERSION=([\w.]+)", docker).group(1)
    k8s_ray = rayjob()["spec"]["rayClusterSpec"]["rayVersion"]
    assert launcher_ray and set(launcher_ray) == {docker_ray} == {k8s_ray}
    assert launcher_torch == {docker_torch}


# ------------------------------------------------------------------------ the launcher YAML
def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_launcher_yaml_validates_against_rays_schema():
    cfg, schema = launcher(), ray_schema()
    try:
        import jsonschema
    except ImportError:  # a ray dependency, but keep a fallback
        assert set(schema["required"]) <= set(cfg)
        assert set(cfg) <= set(schema["properties"]), set(cfg) - set(schema["properties"])
        return
    jsonschema.validate(cfg, schema)
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["ray.worker.gpu"]["resource"] = {"GPU": 1}  # a typo the schema rejects
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_launcher_yaml_passes_the_checks_of_ray_up():
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as exc:  # private API: moved in another ray version
        pytest.skip(f"ray's config checks are not importable here: {exc}")
    cfg = prepare_config(copy.deepcopy(launcher()))  # merges the AWS defaults, as `ray up` does
    validate_config(cfg)
    assert cfg["available_node_types"][cfg["head_node_type"]]["max_workers"] == 0


def test_launcher_has_a_cpu_head_and_a_gpu_worker_type():
    cfg = launcher()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0
    gpu = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu, "no worker node type with a GPU"
    for t in gpu:
        assert 1 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]
        assert t["node_config"]["InstanceType"]
    assert cfg["provider"]["type"] == "aws"


@needs_bash
def test_launcher_commands_are_valid_bash():
    cfg = launcher()
    commands = [c for key in COMMAND_KEYS for c in cfg.get(key, [])]
    assert commands
    for command in commands:
        out = subprocess.run([BASH, "-n", "-c", command], capture_output=True, text=True)
        assert out.returncode == 0, f"bash syntax error in {command!r}: {out.stderr}"


def test_launcher_starts_every_node_with_token_auth_and_a_local_dashboard():
    cfg = launcher()
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in cfg[key]
              if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        assert "RAY_AUTH_MODE=token" in command, command
    head = next(c for c in starts if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head


def test_launcher_fetches_the_token_from_a_secret_store_into_a_private_file():
    cfg = launcher()
    text = LAUNCHER.read_text()
    assert "RAY_AUTH_TOKEN=" not in text
    fetch = [c for c in cfg["setup_commands"] if "auth_token" in c]  # setup_commands run on every node
    assert len(fetch) == 1, fetch
    command = fetch[0]
    assert "aws secretsmanager get-secret-value" in command and "umask 077" in command
    assert "~/.ray/auth_token" in command and "chmod 600 ~/.ray/auth_token" in command


def test_launcher_installs_torch_and_the_unicon_dist_wheel():
    cfg = launcher()
    (remote, local), = cfg["file_mounts"].items()
    assert local == "./dist", "the wheel is built into ./dist (pip wheel --no-deps -w dist .)"
    for key, build in (("head_setup_commands", "/cpu"), ("worker_setup_commands", "/cu")):
        commands = " ; ".join(cfg[key])
        assert re.search(rf"pip install .*torch==[\w.]+ --index-url \S+{build}", commands), (key, build)
        assert f"{remote.replace('/home/ubuntu', '~')}/unicon_dist-*.whl" in commands, key
    assert "ray[default]==" in " ; ".join(cfg["setup_commands"])


# -------------------------------------------------------------------------- the KubeRay RayJob
def test_rayjob_structure():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    cluster = spec["rayClusterSpec"]
    assert ray_container(cluster["headGroupSpec"])["image"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        params = group["rayStartParams"]
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()), \
            "KubeRay's rayStartParams is a map of strings"
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_rayjob_worker_group_has_gpus_and_the_head_none():
    for group in worker_groups():
        resources = ray_container(group)["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
        assert int(resources["requests"].get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"])) \
            == int(resources["limits"]["nvidia.com/gpu"])
    head = ray_container(rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"])
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})


def test_rayjob_token_comes_from_a_kubernetes_secret_on_head_and_workers():
    cluster = rayjob()["spec"]["rayClusterSpec"]
    auth = cluster["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        env = env_of(ray_container(group))
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        token = env["RAY_AUTH_TOKEN"]
        assert "value" not in token, "the token must come from a Secret, not a literal"
        assert token["valueFrom"]["secretKeyRef"] == {"name": auth["secretName"], "key": "auth_token"}


def test_rayjob_mounts_the_job_file_and_the_same_pvc_everywhere():
    spec = rayjob()["spec"]
    job_path = Path(shlex.split(spec["entrypoint"])[2])
    head_spec = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head_spec["volumes"]}
    mounts = {m["mountPath"]: m for m in ray_container(spec["rayClusterSpec"]["headGroupSpec"])["volumeMounts"]}
    job_mount = mounts[str(job_path)]
    assert "configMap" in volumes[job_mount["name"]] and job_mount["subPath"] == job_path.name
    data_mount = mounts[str(job_path.parent)]  # relative paths in the job land on the data volume
    claim = volumes[data_mount["name"]]["persistentVolumeClaim"]["claimName"]
    for group in worker_groups():
        w_volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        w_mounts = {m["mountPath"]: m for m in ray_container(group)["volumeMounts"]}
        assert str(job_path.parent) in w_mounts, "workers must see the store at the head's path"
        assert w_volumes[w_mounts[str(job_path.parent)]["name"]]["persistentVolumeClaim"]["claimName"] == claim


# ---------------------------------------------------------------------------- the SLURM script
@needs_bash
def test_sbatch_script_is_valid_bash():
    text = SBATCH.read_text()
    assert text.startswith("#!/bin/bash\n")
    assert re.search(r"^set -euo pipefail$", text, re.M)
    assert sbatch_option("nodes") and sbatch_option("gpus-per-node")
    out = subprocess.run([BASH, "-n", str(SBATCH)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_sbatch_script_passes_shellcheck():
    out = subprocess.run(["shellcheck", str(SBATCH)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# Stands in for srun (runs its command after the options), scontrol (node names), ray (records
# the call; `list nodes` reports STUB_NODES alive nodes; `job submit` exits STUB_JOB_RC) and
# unicon-dist. Every call is logged with the token settings it saw.
_STUB = r'''#!{python}
import json, os, sys
name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
path = os.environ.get("RAY_AUTH_TOKEN_PATH")
rec = {{"cmd": name, "args": args, "auth_mode": os.environ.get("RAY_AUTH_MODE"), "token_path": path,
        "token_env": "RAY_AUTH_TOKEN" in os.environ, "ray_address": os.environ.get("RAY_ADDRESS")}}
if path and os.path.exists(path):
    rec["token_mode"] = os.stat(path).st_mode & 0o777
    token = open(path).read().strip()
    rec["token_on_command_line"] = any(token in a for a in args)
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(rec) + "\n")
if name == "srun":
    i = 0
    while args[i].startswith("-"):
        i += 2 if args[i] in ("-w", "-N", "-n", "-c") else 1
    os.execvp(args[i], args[i:])
if name == "scontrol":
    print("\n".join(args[2].split(",")))
elif name == "ray" and args[:2] == ["list", "nodes"]:
    print(json.dumps([{{"state": "ALIVE"}}] * int(os.environ["STUB_NODES"])))
elif name == "ray" and args[:2] == ["job", "submit"]:
    sys.exit(int(os.environ.get("STUB_JOB_RC", "0")))
'''


def srun_step(args: list[str]) -> tuple[str, list[str]]:
    """(node, command) of an srun call."""
    i = 0
    while args[i].startswith("-"):
        i += 2 if args[i] in ("-w", "-N", "-n", "-c") else 1
    return args[args.index("-w") + 1], args[i:]


def run_sbatch(tmp_path, *args, job_rc=0, **env_extra):
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        stub = bin_dir / "stub"
        stub.write_text(_STUB.format(python=sys.executable))
        stub.chmod(0o755)
        for name in ("srun", "scontrol", "ray", "unicon-dist"):
            (bin_dir / name).symlink_to(stub)
        (bin_dir / "python3").symlink_to(sys.executable)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    log = tmp_path / "calls.jsonl"
    log.unlink(missing_ok=True)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8", "STUB_LOG": str(log),
           "STUB_NODES": "3", "STUB_JOB_RC": str(job_rc), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "n1,n2,n3",
           "SLURM_CPUS_PER_TASK": "4", "SLURM_GPUS_PER_NODE": "1", "RAY_HEAD_IP": "10.0.0.1"}
    env.update(env_extra)
    env = {k: v for k, v in env.items() if v is not None}
    out = subprocess.run([BASH, str(SBATCH), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return out, calls, home


@needs_bash
def test_sbatch_starts_head_and_workers_submits_the_job_and_stops_ray(tmp_path):
    job = tmp_path / "my project" / "job.toml"  # a space in the path: the entrypoint is quoted
    job.parent.mkdir()
    job.write_text("")
    out, calls, home = run_sbatch(tmp_path, str(job), "--quiet", RAY_AUTH_TOKEN="ignored-in-favour-of-the-file",
                                  RAY_ADDRESS="10.9.9.9:6379")
    assert out.returncode == 0, out.stdout + out.stderr
    ray = [c for c in calls if c["cmd"] == "ray"]
    srun = [c for c in calls if c["cmd"] == "srun"]

    heads = [c for c in ray if c["args"][:2] == ["start", "--head"]]
    assert len(heads) == 1 and "--block" in heads[0]["args"] and "--dashboard-host=127.0.0.1" in heads[0]["args"]
    assert "--port=6379" in heads[0]["args"]
    joins = [c for c in ray if c["args"][:1] == ["start"] and "--address=10.0.0.1:6379" in c["args"]]
    assert len(joins) == 2 and all("--block" in c["args"] for c in joins)
    steps = [srun_step(c["args"]) for c in srun]
    started_on = sorted(node for node, command in steps if command[0] == "bash" or command[:2] == ["ray", "start"])
    assert started_on == ["n1", "n2", "n3"], steps

    submits = [i for i, c in enumerate(calls) if c["cmd"] == "ray" and c["args"][:2] == ["job", "submit"]]
    assert len(submits) == 1
    submit = calls[submits[0]]["args"]
    assert submit[submit.index("--address") + 1] == "http://127.0.0.1:8265"
    entrypoint = submit[submit.index("--") + 1:]
    assert len(entrypoint) == 1 and shlex.split(entrypoint[0]) == ["unicon-dist", "solve", str(job), "--quiet"]

    stops = [i for i, c in enumerate(calls) if c["cmd"] == "ray" and c["args"][:1] == ["stop"]]
    assert len(stops) == 3 and min(stops) > submits[0], "ray stop on every node after the job"

    for c in ray:  # every ray process saw token mode and a private token file, never the token itself
        assert c["auth_mode"] == "token" and not c["token_env"] and c["ray_address"] is None, c
        assert c["token_mode"] == 0o600 and not c["token_on_command_line"], c
    token_file = Path(ray[0]["token_path"])
    assert token_file.parent == home / ".ray" and "4242" in token_file.name
    assert not token_file.exists(), "the per-job token is deleted at the end"


@needs_bash
def test_sbatch_exit_status_is_the_jobs(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text("")
    out, calls, home = run_sbatch(tmp_path, str(job), job_rc=3)
    assert out.returncode == 3, out.stdout + out.stderr
    assert sum(c["cmd"] == "ray" and c["args"][:1] == ["stop"] for c in calls) == 3
    assert not list((home / ".ray").iterdir()), "the per-job token is deleted when the job fails too"


@needs_bash
def test_sbatch_uses_a_private_token_file_of_the_user_and_refuses_a_readable_one(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text("")
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o644)
    out, calls, _ = run_sbatch(tmp_path, str(job), RAY_AUTH_TOKEN_PATH=str(token))
    assert out.returncode == 2 and "others can read it" in out.stderr
    assert not [c for c in calls if c["cmd"] == "ray"], "nothing may start with a readable token"
    token.chmod(stat.S_IRUSR | stat.S_IWUSR)
    out, calls, _ = run_sbatch(tmp_path, str(job), RAY_AUTH_TOKEN_PATH=str(token))
    assert out.returncode == 0, out.stdout + out.stderr
    assert {c["token_path"] for c in calls if c["cmd"] == "ray"} == {str(token)}
    assert token.exists(), "a token file of the user's own is left in place"


@needs_bash
def test_sbatch_refuses_to_run_outside_slurm_or_without_a_job(tmp_path):
    out, calls, _ = run_sbatch(tmp_path, str(tmp_path / "job.toml"), SLURM_JOB_ID=None)
    assert out.returncode == 2 and "not inside a SLURM job" in out.stderr and not calls
    out, calls, _ = run_sbatch(tmp_path, str(tmp_path / "missing.toml"))
    assert out.returncode == 2 and "missing.toml not found" in out.stderr and not calls


@needs_bash
def test_sbatch_gives_up_when_a_node_does_not_join_and_still_cleans_up(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text("")
    out, calls, home = run_sbatch(tmp_path, str(job), STUB_NODES="2", RAY_START_TIMEOUT="0")
    assert out.returncode == 2 and "only 2 of 3 Ray nodes joined" in out.stderr
    assert not [c for c in calls if c["cmd"] == "ray" and c["args"][:2] == ["job", "submit"]]
    assert sum(c["cmd"] == "ray" and c["args"][:1] == ["stop"] for c in calls) == 3
    assert not list((home / ".ray").iterdir())
