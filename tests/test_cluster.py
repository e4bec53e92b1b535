"""cluster/: the Ray cluster launcher config, the KubeRay manifests, runtime_env and the worker image.

Offline and fast. The launcher config is checked with the JSON schema and the validator that ship
inside the installed `ray`; the KubeRay manifests against the CRD schemas in the `shared/` folder
beside this checkout (never copied into the repository; the tests skip without it and fail when
CI=true); the Dockerfile with a small parser (no Docker engine here).
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "kuberay"
CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_raycronjobs.yaml")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
SECRETISH = re.compile(r"SECRET|TOKEN|KEY|PASSWORD|CREDENTIAL", re.I)


# ---- helpers ------------------------------------------------------------------------------------
def _load_all(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]


def _load(path: Path) -> dict:
    (doc,) = _load_all(path)
    return doc


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pyproject_pins() -> dict[str, Requirement]:
    return {_norm(r.name): r for r in map(Requirement, pyproject()["project"]["dependencies"])}


def exact_pin(req: Requirement) -> str | None:
    exact = [s.version for s in req.specifier if s.operator == "=="]
    return exact[0] if exact else None


def makefile_nodeps_pins() -> dict[str, str]:
    """`NODEPS := insightface==2.1` (installed with --no-deps by `make setup`)."""
    m = re.search(r"^NODEPS\s*:?=\s*(.+)$", (REPO / "Makefile").read_text(), re.M)
    assert m, "the Makefile has no NODEPS line"
    return {_norm(n): v for n, v in (t.split("==", 1) for t in m.group(1).split() if "==" in t)}


def aws_config() -> dict:
    return _load(CLUSTER / "aws-gpu.yaml")


def kuberay_docs() -> dict[str, list[dict]]:
    return {p.name: _load_all(p) for p in sorted(KUBERAY.glob("*.yaml"))}


def _doc(file: str, kind: str) -> dict:
    (d,) = [d for d in kuberay_docs()[file] if d["kind"] == kind]
    return d


def embedded_rayjob() -> dict:
    """The RayJob the fallback CronJob creates (held in a ConfigMap)."""
    cm = _doc("cronjob-fallback.yaml", "ConfigMap")
    (text,) = cm["data"].values()
    return yaml.load(text, Loader=_Loader)


def ray_objects() -> list[tuple[str, dict]]:
    """Every ray.io object the manifests define, the fallback's embedded RayJob included."""
    out = []
    for name, docs in kuberay_docs().items():
        for d in docs:
            if d.get("apiVersion", "").startswith("ray.io/"):
                out.append((f"{name}:{d['kind']}", d))
    out.append(("cronjob-fallback.yaml:ConfigMap/rayjob.yaml", embedded_rayjob()))
    return out


def job_specs() -> list[tuple[str, dict]]:
    """(where, RayJobSpec) for the RayJob, the RayCronJob's template and the fallback's RayJob."""
    return [
        ("rayjob.yaml", _doc("rayjob.yaml", "RayJob")["spec"]),
        ("raycronjob.yaml", _doc("raycronjob.yaml", "RayCronJob")["spec"]["jobTemplate"]),
        ("cronjob-fallback.yaml", embedded_rayjob()["spec"]),
    ]


def cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayClusterSpec) for every Ray cluster the manifests bring up."""
    return [("raycluster.yaml", _doc("raycluster.yaml", "RayCluster")["spec"])] + [
        (where, spec["rayClusterSpec"]) for where, spec in job_specs()
    ]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _walk(obj, path=()):
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, path + (i,))


def all_env_lists() -> list[tuple[str, list]]:
    """Every container `env` list in every manifest (embedded RayJob included)."""
    docs = [(n, d) for n, ds in kuberay_docs().items() for d in ds]
    docs.append(("cronjob-fallback.yaml:embedded", embedded_rayjob()))
    return [(f"{n}:{'.'.join(map(str, p))}", v) for n, d in docs for p, v in _walk(d)
            if p and p[-1] == "env" and isinstance(v, list)]


# ---- the Ray cluster launcher config ------------------------------------------------------------
def test_aws_config_validates_against_rays_own_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = aws_config()
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = yaml.load(schema_path.read_text(), Loader=_Loader)  # JSON is YAML
    validator_cls = jsonschema.validators.validator_for(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator_cls(schema).iter_errors(raw)]
    assert not errors, errors
    # What `ray up` does before it talks to AWS: merge the provider defaults, then validate.
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    assert prepared["available_node_types"].keys() == raw["available_node_types"].keys()


def test_aws_config_cpu_head_and_gpu_workers_from_zero():
    cfg = aws_config()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert not head["resources"].get("GPU"), "the head is a CPU node"
    assert head["resources"].get("CPU") == 0, "no Ray task runs on the head"
    assert any("--num-cpus=0" in c for c in cfg["head_start_ray_commands"])
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    families = {v["node_config"]["InstanceType"].split(".")[0] for v in workers.values()}
    assert families == {"g5", "p4d", "p5"}
    for name, t in workers.items():
        assert t["resources"]["GPU"] > 0, name
        assert t["min_workers"] == 0, name
        assert 0 < t["max_workers"] <= cfg["max_workers"], name
    assert cfg["provider"]["type"] == "aws"
    assert cfg["provider"]["cache_stopped_nodes"] is False, "instance store does not survive a stop"


def test_aws_config_credentials_only_from_instance_profiles():
    cfg = aws_config()
    text = (CLUSTER / "aws-gpu.yaml").read_text()
    for name, t in cfg["available_node_types"].items():
        profile = t["node_config"].get("IamInstanceProfile")
        assert profile and (profile.get("Arn") or profile.get("Name")), f"{name} needs an IAM instance profile"
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_access_key_id|aws_secret_access_key|AWS_ACCESS_KEY_ID|"
                         r"AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|PRIVATE KEY", text, re.I)
    assert not {"ssh_private_key", "ssh_public_key"} & set(cfg.get("auth", {}))
    assert not {"aws_credentials", "credentials"} & set(cfg["provider"])


def test_aws_config_model_cache_on_local_nvme_and_the_worker_image():
    cfg = aws_config()
    mounts = [o for o in cfg["docker"]["run_options"] if o.startswith("-v ")]
    assert mounts, "the model cache must be bind-mounted into the container"
    host, target = mounts[0][3:].split(":")[:2]
    assert host.startswith("/mnt/nvme/")
    init = "\n".join(cfg["initialization_commands"])
    assert "Instance Storage" in init and "/mnt/nvme" in init and "mount " in init, \
        "initialization_commands must mount the instance-store NVMe at /mnt/nvme"
    # The config the manifests ship puts models.cache_dir under that same container path.
    assert run_config()["models"]["cache_dir"].startswith(target.rstrip("/") + "/")
    assert cfg["docker"]["image"] == ray_image(), "one worker image for ray up and KubeRay"


def _start_commands(cfg: dict) -> list[str]:
    return [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]


def test_aws_config_turns_ray_token_auth_on():
    cfg = aws_config()
    text = (CLUSTER / "aws-gpu.yaml").read_text()
    starts = _start_commands(cfg)
    assert len(starts) == 2
    token_dirs = set()
    for c in starts:
        assert "RAY_AUTH_MODE=token" in c, c
        m = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", c)
        assert m, c
        token_dirs.add(os.path.dirname(m.group(1).replace("$HOME/", "~/")))
    # The token file comes from a file mount (synced from the launching machine), never a literal.
    assert token_dirs <= set(cfg["file_mounts"]), (token_dirs, cfg["file_mounts"])
    assert not re.search(r"RAY_AUTH_TOKEN\s*[=:]", text), "no token value in the config"
    assert "RAY_AUTH_MODE=disabled" not in text
    assert any("auth_token" in c and "test -s" in c for c in cfg["setup_commands"]), \
        "setup must refuse to go on without the token file"


def test_aws_config_gives_the_corpus_secret_to_the_head_only():
    cfg = aws_config()
    (head_start,) = [c for c in cfg["head_start_ray_commands"] if "CORPUS_ANON_SECRET" in c]
    assert re.search(r'CORPUS_ANON_SECRET="\$\(.*secretsmanager.*get_secret_value', head_start), \
        "read at start from AWS Secrets Manager, never written into the config"
    elsewhere = {k: v for k, v in cfg.items() if k != "head_start_ray_commands"}
    assert "CORPUS_ANON_SECRET" not in yaml.safe_dump(elsewhere), "workers and file mounts never get it"


def test_ray_reads_the_mode_and_token_file_the_launcher_config_uses(tmp_path):
    """Ray 2.60's own loader: RAY_AUTH_MODE=token turns auth on, RAY_AUTH_TOKEN_PATH supplies the token."""
    token = tmp_path / "auth_token"
    token.write_text("not-a-real-token-0123456789")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), HOME=str(tmp_path))
    code = ("from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, get_authentication_mode\n"
            "l = AuthenticationTokenLoader.instance()\n"
            "print(get_authentication_mode() == AuthenticationMode.TOKEN, l.has_token(), l.get_raw_token())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "not-a-real-token-0123456789"]


# ---- runtime_env ---------------------------------------------------------------------------------
def _runtime_env_problems(env: dict) -> None:
    from ray.runtime_env import RuntimeEnv

    assert set(env) <= set(RuntimeEnv.known_fields), set(env) - set(RuntimeEnv.known_fields)
    # Ray's own checks (env_vars: Dict[str, str], ...). A local working_dir must exist where the
    # job is submitted (the image's copy for KubeRay's submitter pod): check the rest with ours.
    RuntimeEnv(**dict(env, working_dir=str(REPO)))
    names = list(env.get("env_vars", {}))
    assert not [n for n in names if SECRETISH.search(n)], names
    assert not [n for n in names if n.startswith("RAY_AUTH")], "auth is a cluster setting, not a job's"


def test_runtime_env_file_holds_only_non_secret_settings():
    env = _load(CLUSTER / "runtime_env.yaml")
    _runtime_env_problems(env)
    assert env["working_dir"] == "."
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    assert ".venv" in env["excludes"], "the 2.7 GB venv must never be uploaded"
    assert "CORPUS_ANON_SECRET" not in yaml.safe_dump(env)


@pytest.mark.parametrize("where", ["rayjob.yaml", "raycronjob.yaml", "cronjob-fallback.yaml"])
def test_job_runtime_env_is_the_shared_one_and_carries_no_secret(where):
    spec = dict(job_specs())[where]
    text = spec["runtimeEnvYAML"]
    assert "CORPUS_ANON_SECRET" not in text and not SECRETISH.search(text)
    env = yaml.load(text, Loader=_Loader)
    _runtime_env_problems(env)
    assert env["env_vars"] == _load(CLUSTER / "runtime_env.yaml")["env_vars"]
    # working_dir is the project copy the image holds (the Dockerfile's WORKDIR).
    assert env["working_dir"] == dockerfile_final("WORKDIR")


# ---- KubeRay CRD schemas --------------------------------------------------------------------------
def _strict(schema):
    """Close every object schema that lists its properties, as kubectl's strict field validation
    (the default since Kubernetes 1.27) rejects unknown fields; x-kubernetes-* keys are ignored
    by jsonschema as unknown keywords."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def crds():
    """{(apiVersion, kind): (strict validator, raw openAPIV3Schema)} from shared/schemas/kuberay/."""
    missing = [f for f in CRD_FILES if not (CRD_DIR / f).is_file()]
    if missing:
        reason = f"KubeRay CRD schemas not found in {CRD_DIR} (missing {', '.join(missing)})"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; CI must provide the shared/ folder beside the checkout")
        pytest.skip(reason)
    import jsonschema

    out = {}
    for f in CRD_FILES:
        crd = yaml.load((CRD_DIR / f).read_text(), Loader=_Loader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            schema = v["schema"]["openAPIV3Schema"]
            out[(f"{group}/{v['name']}", kind)] = (jsonschema.Draft7Validator(_strict(schema)), schema)
    return out


def _crd_errors(crds, obj) -> list[str]:
    key = (obj.get("apiVersion"), obj.get("kind"))
    assert key in crds, f"no CRD schema for {key}"
    validator, _ = crds[key]
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]


def _cel_paths(schema, path=()):
    """Property paths that carry CEL rules (x-kubernetes-validations), which jsonschema cannot run."""
    if not isinstance(schema, dict):
        return
    if "x-kubernetes-validations" in schema:
        yield path
    for k, sub in schema.get("properties", {}).items():
        yield from _cel_paths(sub, path + (k,))
    if isinstance(schema.get("items"), dict):
        yield from _cel_paths(schema["items"], path + ("[]",))


def _has_path(obj, path) -> bool:
    if not path:
        return True
    head, rest = path[0], path[1:]
    if head == "[]":
        return isinstance(obj, list) and any(_has_path(x, rest) for x in obj)
    return isinstance(obj, dict) and head in obj and _has_path(obj[head], rest)


@pytest.mark.parametrize("where", [w for w, _ in ray_objects()])
def test_kuberay_manifest_validates_against_its_crd(crds, where):
    obj = dict(ray_objects())[where]
    errors = _crd_errors(crds, obj)
    assert not errors, "\n".join(errors)
    # The CRDs' few CEL rules (managedBy, deletionStrategy, GCS FT backend) cannot run here:
    # the manifests use none of the fields they guard, so nothing goes unchecked.
    _, schema = crds[(obj["apiVersion"], obj["kind"])]
    used = [p for p in _cel_paths(schema) if _has_path(obj, p)]
    assert not used, used


def test_crd_validation_is_strict_enough_to_catch_mistakes(crds):
    job = copy.deepcopy(_doc("rayjob.yaml", "RayJob"))
    job["spec"]["shutdownAfterJobFinish"] = True  # a typo kubectl --validate=strict rejects
    job["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokens"
    job["spec"]["backoffLimit"] = "2"
    errors = "\n".join(_crd_errors(crds, job))
    assert "shutdownAfterJobFinish" in errors
    assert "'tokens' is not one of" in errors
    assert "'2' is not of type 'integer'" in errors


def test_crd_has_the_auth_options_the_manifests_use(crds):
    """The evidence for `authOptions: {mode: token}`: KubeRay's RayCluster schema (also inside
    RayJob / RayCronJob) has it, with `token` among the modes."""
    for key in (("ray.io/v1", "RayCluster"),):
        auth = crds[key][1]["properties"]["spec"]["properties"]["authOptions"]["properties"]
        assert "token" in auth["mode"]["enum"] and "secretName" in auth
    job_cluster = crds[("ray.io/v1", "RayJob")][1]["properties"]["spec"]["properties"]["rayClusterSpec"]
    assert "authOptions" in job_cluster["properties"]


# ---- what the manifests must say ------------------------------------------------------------------
def test_every_cluster_spec_is_the_same():
    specs = cluster_specs()
    first_where, first = specs[0]
    for where, spec in specs[1:]:
        assert spec == first, f"{where}'s rayClusterSpec differs from {first_where}'s spec"
    assert embedded_rayjob()["spec"] == _doc("raycronjob.yaml", "RayCronJob")["spec"]["jobTemplate"], \
        "the fallback CronJob must create exactly the RayCronJob's RayJob"


@pytest.mark.parametrize("where", [w for w, _ in cluster_specs()])
def test_ray_token_auth_is_on(where):
    spec = dict(cluster_specs())[where]
    assert spec["authOptions"]["mode"] == "token"
    assert spec["authOptions"].get("secretName"), "the token comes from a Secret the operator reads"
    # KubeRay honours authOptions from Ray 2.52 on; and the cluster runs the project's Ray.
    assert Version(spec["rayVersion"]) >= Version("2.52.0")
    assert spec["rayVersion"] == exact_pin(pyproject_pins()["ray"])
    for _, env in all_env_lists():
        for e in env:
            if e["name"] == "RAY_AUTH_MODE":
                assert e.get("value") == "token", e
            assert e["name"] != "RAY_AUTH_TOKEN" or "valueFrom" in e, e


@pytest.mark.parametrize("where", [w for w, _ in cluster_specs()])
def test_head_and_gpu_workers(where):
    spec = dict(cluster_specs())[where]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "the driver runs on the head; clip work never"
    sa = _load(KUBERAY / "serviceaccount.yaml")
    assert sa["metadata"]["annotations"].get("eks.amazonaws.com/role-arn"), "AWS credentials through IRSA"
    assert head["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert spec["enableInTreeAutoscaling"] is True
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] == 0 and group["maxReplicas"] > 0
    pod = group["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] in ("Exists", "Equal")
               for t in pod.get("tolerations", [])), "GPU nodes carry nvidia.com/gpu taints"
    (worker,) = pod["containers"]
    for part in ("requests", "limits"):
        assert int(worker["resources"][part]["nvidia.com/gpu"]) >= 1
    for container in _containers(head["template"]) + pod["containers"]:
        assert container["image"] == ray_image()
    for p in (head["template"]["spec"], pod):
        assert p["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("where", [w for w, _ in cluster_specs()])
def test_corpus_secret_only_on_the_head_and_only_from_a_secret(where):
    spec = dict(cluster_specs())[where]
    (head,) = [c for c in _containers(spec["headGroupSpec"]["template"]) if c["name"] == "ray-head"]
    (secret,) = [e for e in head["env"] if e["name"] == "CORPUS_ANON_SECRET"]
    assert "value" not in secret and secret["valueFrom"]["secretKeyRef"]["name"]
    for group in spec["workerGroupSpecs"]:
        for c in _containers(group["template"]):
            assert "CORPUS_ANON_SECRET" not in [e["name"] for e in c.get("env", [])], \
                "workers never get the secret"


def test_no_manifest_holds_a_literal_secret():
    lists = all_env_lists()
    assert lists
    for where, env in lists:
        for e in env:
            if SECRETISH.search(e["name"]):
                assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), (where, e)
    for name, docs in kuberay_docs().items():
        assert not [d for d in docs if d["kind"] == "Secret"], f"{name}: Secrets are created out of band"
    for p in [*CLUSTER.rglob("*.yaml"), CLUSTER / "Dockerfile"]:
        text = p.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----", text), p


@pytest.mark.parametrize("where,script", [("rayjob.yaml", "jobs/anonymize_corpus.py"),
                                          ("raycronjob.yaml", "jobs/refresh.py"),
                                          ("cronjob-fallback.yaml", "jobs/refresh.py")])
def test_entrypoint_names_repo_files_and_the_mounted_config(where, script):
    spec = dict(job_specs())[where]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", script]
    assert (REPO / argv[1]).is_file()
    config_path = argv[2]
    # The config argument is a key of the ConfigMap mounted on the head, where the driver runs.
    head_pod = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (head,) = [c for c in head_pod["containers"] if c["name"] == "ray-head"]
    mount = next(m for m in head["volumeMounts"] if config_path.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in head_pod["volumes"] if v["name"] == mount["name"])
    cm = _load(KUBERAY / "configmap.yaml")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert os.path.relpath(config_path, mount["mountPath"]) in cm["data"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 0
    assert spec["activeDeadlineSeconds"] > 0


def run_config() -> dict:
    cm = _load(KUBERAY / "configmap.yaml")
    return yaml.load(cm["data"]["config.yaml"], Loader=_Loader)


def test_configmap_holds_a_valid_run_config_matching_the_pods():
    from corpus_anon.config import config_from_dict

    cfg = config_from_dict(run_config(), "configmap.yaml")
    assert cfg.device == "cuda" and cfg.anonymizer.kind == "diffslva"
    assert cfg.release.root, "the refresh releases to release.root"
    spec = cluster_specs()[0][1]
    (group,) = spec["workerGroupSpecs"]
    (worker,) = _containers(group["template"])
    mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
    cache_mount = next(p for p in mounts if cfg.models.cache_dir.startswith(p.rstrip("/") + "/"))
    volume = next(v for v in group["template"]["spec"]["volumes"] if v["name"] == mounts[cache_mount])
    assert "emptyDir" in volume, "node-local disk for the model cache"
    assert cfg.resources.gpus_per_actor <= int(worker["resources"]["limits"]["nvidia.com/gpu"])
    assert cfg.resources.cpus_per_actor <= float(worker["resources"]["limits"]["cpu"])


def test_raycronjob_schedule():
    cron = _doc("raycronjob.yaml", "RayCronJob")
    assert len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600, "ends before the next daily run"


def test_fallback_cronjob_creates_the_rayjob_with_least_privilege():
    docs = {d["kind"]: d for d in kuberay_docs()["cronjob-fallback.yaml"]}
    assert set(docs) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}
    cron = docs["CronJob"]
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    assert len(spec["schedule"].split()) == 5
    assert spec["schedule"] == _doc("raycronjob.yaml", "RayCronJob")["spec"]["schedule"]
    assert spec["concurrencyPolicy"] == "Forbid"
    job = spec["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] >= embedded_rayjob()["spec"]["activeDeadlineSeconds"]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    sa = docs["ServiceAccount"]["metadata"]["name"]
    assert pod["serviceAccountName"] == sa
    (c,) = pod["containers"]
    script = " ".join(c.get("command", []) + c.get("args", []))
    m = re.search(r"kubectl create -f (\S+)", script)
    assert m, script
    mount = next(v for v in c["volumeMounts"] if m.group(1).startswith(v["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert os.path.relpath(m.group(1), mount["mountPath"]) in docs["ConfigMap"]["data"]
    assert not [e for e in c.get("env", []) if SECRETISH.search(e["name"]) or "valueFrom" in e], \
        "the launcher holds no secret"
    # RBAC: create (and read back) RayJobs, nothing else.
    (rule,) = docs["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert "create" in rule["verbs"] and set(rule["verbs"]) <= {"create", "get", "list", "watch"}
    binding = docs["RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": docs["Role"]["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa}]
    assert embedded_rayjob()["kind"] == "RayJob" and embedded_rayjob()["metadata"].get("generateName")


# ---- the Dockerfile -------------------------------------------------------------------------------
def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: parser directives, comments, line continuations
    (comment and blank lines inside a continuation are dropped, as Docker does)."""
    escape = "\\"
    out: list[tuple[str, str]] = []
    buf = ""
    directives = True
    for raw in text.splitlines():
        line = raw.strip()
        if directives:
            m = re.fullmatch(r"#\s*([A-Za-z]+)\s*=\s*(\S+)", line)
            if m and m.group(1).lower() in ("syntax", "escape", "check"):
                if m.group(1).lower() == "escape":
                    escape = m.group(2)
                continue
            directives = False
        if not line or line.startswith("#"):
            continue
        if line.endswith(escape):
            buf += line[: -len(escape)].rstrip() + " "
            continue
        buf += line
        parts = buf.split(None, 1)
        out.append((parts[0].upper(), parts[1].strip() if len(parts) > 1 else ""))
        buf = ""
    if buf:
        raise ValueError("the Dockerfile ends inside a line continuation")
    return out


def _substitute(s: str, env: dict[str, str]) -> str:
    def one(m: re.Match) -> str:
        name, default = m.group(1) or m.group(3), m.group(2)
        return env.get(name, default if default is not None else "")
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)", one, s)


def dockerfile() -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Instructions with ARG/ENV values substituted, and the final ARG/ENV values."""
    instrs = parse_dockerfile((CLUSTER / "Dockerfile").read_text())
    env: dict[str, str] = {}
    out = []
    for ins, args in instrs:
        if ins in ("ARG", "ENV"):
            tokens = shlex.split(args)
            if ins == "ENV" and tokens and "=" not in tokens[0]:
                tokens = [f"{tokens[0]}={' '.join(tokens[1:])}"]  # legacy `ENV KEY value`
            for t in tokens:
                k, _, v = t.partition("=")
                env[k] = _substitute(v, env)
        out.append((ins, _substitute(args, env) if ins not in ("ARG", "ENV") else args))
    return out, env


def dockerfile_final(instruction: str) -> str:
    return [a for i, a in dockerfile()[0] if i == instruction][-1]


def ray_image() -> str:
    return _load(KUBERAY / "raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


def pip_installs() -> list[list[str]]:
    """The argument lists of every `pip install` in the Dockerfile's RUN instructions."""
    out = []
    for ins, args in dockerfile()[0]:
        if ins != "RUN":
            continue
        for segment in re.split(r"&&|;|\|\|", args):
            tokens = shlex.split(segment)
            for i in range(len(tokens) - 1):
                if tokens[i].endswith("pip") and tokens[i + 1] == "install":
                    out.append(tokens[i + 2:])
    return out


def test_dockerfile_parser_handles_continuations_and_comments():
    text = ("# syntax=docker/dockerfile:1\n# a comment\nFROM base:1 AS b\n"
            "RUN a \\\n    # dropped inside a continuation\n    && b \\\n\n    && c\n"
            "env A=1 \\\n  B=2\nCMD [\"bash\"]\n")
    assert parse_dockerfile(text) == [("FROM", "base:1 AS b"), ("RUN", "a && b && c"),
                                      ("ENV", "A=1 B=2"), ("CMD", '["bash"]')]
    with pytest.raises(ValueError):
        parse_dockerfile("RUN a \\\n")


def test_dockerfile_parses_into_known_instructions():
    instrs, _ = dockerfile()
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "USER", "WORKDIR", "CMD", "ENTRYPOINT",
             "LABEL", "EXPOSE", "VOLUME", "SHELL", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD"}
    assert {i for i, _ in instrs} <= known
    assert [i for i, _ in instrs if i != "ARG"][0] == "FROM"
    assert not [a for i, a in instrs if i == "RUN" and "<<" in a], "heredocs are not parsed here"


def test_dockerfile_pins_match_pyproject_and_makefile():
    instrs, env = dockerfile()
    pins = pyproject_pins()
    nodeps = makefile_nodeps_pins()
    assert env["TORCH_VERSION"] == exact_pin(pins["torch"])
    assert env["INSIGHTFACE_VERSION"] == nodeps["insightface"]
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains(env["PYTHON_VERSION"] + ".0")
    # CUDA base image and torch's CUDA index agree (cu128 <-> 12.8).
    base = next(a for i, a in instrs if i == "FROM").split()[0]
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-[a-z]+-ubuntu\d+\.\d+", base)
    assert m, base
    assert env["TORCH_CUDA"] == f"cu{m.group(1)}{m.group(2)}" and m.group(1) == "12"

    installs = pip_installs()
    seen: dict[str, str] = {}
    for argv in installs:
        for tok in argv:
            pin = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==(\S+)", tok)
            if pin:
                seen[_norm(pin.group(1))] = pin.group(3)
    for name, version in seen.items():
        wanted = exact_pin(pins[name]) if name in pins else nodeps.get(name)
        assert wanted == version, f"the Dockerfile pins {name}=={version}, the project {wanted}"
    assert {"torch", "insightface"} <= set(seen)
    torch_install = next(a for a in installs if f"torch=={env['TORCH_VERSION']}" in a)
    url = torch_install[torch_install.index("--index-url") + 1]
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d+", url) and url.endswith(env["TORCH_CUDA"])
    insight = next(a for a in installs if f"insightface=={env['INSIGHTFACE_VERSION']}" in a)
    assert "--no-deps" in insight, "insightface goes in with --no-deps, as `make setup` does"
    # The project itself, with the dependencies pyproject pins (ray, diffusers, transformers, ...).
    copies = [shlex.split(a) for i, a in instrs if i == "COPY"]
    project_dir = next(c[-1] for c in copies if "pyproject.toml" in c[:-1]).rstrip("/")
    assert any(project_dir in a for a in installs), "the project must be pip-installed from its copy"
    # ...and the build checks every pin against what was installed.
    check = next(a for i, a in instrs if i == "RUN" and "check_image.py" in a)
    assert f"--insightface {env['INSIGHTFACE_VERSION']}" in check.replace('"', "")
    assert f"--torch-cuda {env['TORCH_CUDA']}" in check.replace('"', "")


def test_dockerfile_runtime_hygiene():
    instrs, env = dockerfile()
    assert dockerfile_final("USER") not in ("root", "0", "0:0"), "the image runs as a non-root user"
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert not [k for k in env if SECRETISH.search(k)], "no secret, token or key in the image"
    assert not [i for i, _ in instrs if i == "ADD"], "COPY only (no remote ADD)"
    weights = re.compile(r"models?\b|weights|\.safetensors|\.pth|\.onnx|\.ckpt|\.bin\b|huggingface|hf_hub"
                         r"|hf download|models stage|make-tiny", re.I)
    ignore = [ln.strip() for ln in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
              if ln.strip() and not ln.lstrip().startswith("#")]
    assert ignore[:1] == ["*"]
    for i, a in instrs:
        if i == "COPY":
            sources = [s for s in shlex.split(a)[:-1] if not s.startswith("--")]
            for s in sources:
                assert not weights.search(s), f"no model weights in the image: COPY {s}"
                assert (REPO / s).exists(), f"COPY {s}: not in the repository"
                assert f"!{s}" in ignore, f"cluster/Dockerfile.dockerignore leaves {s} out of the context"
        if i == "RUN":
            assert not re.search(r"models stage|make-tiny|hf download|huggingface-cli|snapshot_download"
                                 r"|\.safetensors|\.pth\b|wget|curl", a), a


def test_check_image_reports_drift():
    sys.path.insert(0, str(CLUSTER))
    try:
        import check_image
    finally:
        sys.path.remove(str(CLUSTER))
    reqs = check_image.pinned_requirements(REPO / "pyproject.toml")
    insight = makefile_nodeps_pins()["insightface"]

    def fake(versions):
        return lambda name: versions.get(_norm(name))

    good = {}
    for r in reqs:
        v = exact_pin(r)
        if v is None:  # a range: the smallest version it allows, or a plausible one
            floor = [s.version for s in r.specifier if s.operator in (">=", "==")]
            v = floor[0] if floor else "1.0"
        good[_norm(r.name)] = v
    good["torch"] += "+cu128"  # a local label does not count, as for pip
    good["insightface"] = insight
    assert check_image.problems(reqs, insight, fake(good)) == []
    bad = dict(good, ray="2.59.0")
    del bad["diffusers"]
    found = check_image.problems(reqs, "0.0.1", fake(bad))
    assert len(found) == 3 and any("ray 2.59.0" in p for p in found)
    assert any("diffusers is not installed" in p for p in found)
    assert any(p.startswith(f"insightface {insight} does not satisfy ==0.0.1") for p in found)
