"""Cluster and infrastructure files are checked the way their tools would check them.

Launcher YAMLs against the JSON schema Ray ships (and Ray's own `validate_config`); KubeRay
manifests against the RayCluster/RayJob CRD schemas vendored in tests/schemas/kuberay (with
kubectl's strict field validation: an unknown field is an error); every job command in the
manifests and in cluster/README.md through the real `t2v` argument parser and config loader;
Terraform through python-hcl2, with the bucket policy compared to the S3 calls in the code;
Dockerfiles through hadolint.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
TERRAFORM = ROOT / "infra" / "terraform"
DOCKER = ROOT / "infra" / "docker"
SCHEMAS = Path(__file__).parent / "schemas" / "kuberay"
IMAGE_DIR = "/home/ray/t2v"  # WORKDIR of infra/docker images: the RayJobs run the code there
BUCKET = "my-t2v-bucket"  # the placeholder bucket of every example

# boto3 client method (as called in t2v/storage.py) -> the IAM actions it needs.
S3_CALL_ACTIONS: dict[str, set[str]] = {
    "get_object": {"s3:GetObject"},
    "head_object": {"s3:GetObject"},
    "download_file": {"s3:GetObject"},  # HeadObject + ranged GetObject
    "put_object": {"s3:PutObject"},
    # Multipart above 8 MiB: Create/UploadPart/Complete are s3:PutObject; a failed upload aborts.
    "upload_file": {"s3:PutObject", "s3:AbortMultipartUpload"},
    "delete_object": {"s3:DeleteObject"},
    "list_objects_v2": {"s3:ListBucket"},
    "head_bucket": {"s3:ListBucket"},
}


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# --- Ray cluster launcher ------------------------------------------------------------------


def _ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml", "local.yaml"])
def test_launcher_config_validates_against_rays_schema(name: str) -> None:
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((CLUSTER / name).read_text())
    jsonschema.validate(config, _ray_schema())
    validate_config(copy.deepcopy(config))  # what `ray up` runs: schema + cross-field checks


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_configs_autoscale_gpu_and_cpu_workers(name: str) -> None:
    config = yaml.safe_load((CLUSTER / name).read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    gpu = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) > 0}
    cpu = {k: v for k, v in workers.items() if not v["resources"].get("GPU")}
    assert gpu and cpu, f"{name}: need GPU and CPU worker types, got {sorted(workers)}"
    for kind, node in workers.items():
        assert node["min_workers"] == 0 and node["max_workers"] > 0, kind
    assert 0 < config["idle_timeout_minutes"] <= 30
    assert config["docker"]["image"].endswith("-cuda") and "t2v" in config["docker"]["image"]
    assert config["docker"]["head_image"].endswith("-cpu")
    for kind, node in types.items():  # every node has an identity for the bucket
        nc = node["node_config"]
        assert nc.get("IamInstanceProfile", {}).get("Arn") or nc.get("serviceAccounts"), kind


def test_no_static_credentials_anywhere() -> None:
    pattern = re.compile(r"AWS_SECRET_ACCESS_KEY|aws_secret_access_key|AKIA[0-9A-Z]{16}|"
                         r"private_key|HMAC", re.IGNORECASE)
    files = [p for d in (CLUSTER, ROOT / "infra") for p in d.rglob("*") if p.is_file()
             and p.suffix in {".yaml", ".tf", ".md", ".sh", ".py", ""}]
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files
            for m in pattern.finditer(p.read_text(errors="replace"))
            if "dev/s3.sh" not in str(p)]  # moto's fixed dummy keys, 127.0.0.1 only
    assert not hits, hits


# --- KubeRay -------------------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """kubectl's default server-side field validation (strict) rejects unknown fields; JSON
    schema allows them unless an object closes itself. Close every object that lists its
    properties and does not preserve unknown fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """Built once per kind: the RayJob schema alone is ~220 kB."""
    schema = _strict(json.loads((SCHEMAS / f"{kind.lower()}-v1.json").read_text()))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{p.name}#{i}", d) for p in sorted(KUBERAY.glob("*.yaml"))
            for i, d in enumerate(_yaml_docs(p))]


@pytest.mark.parametrize("name,doc", _manifests(), ids=lambda v: v if isinstance(v, str) else "")
def test_kuberay_manifest_validates_against_crd(name: str, doc: dict[str, Any]) -> None:
    if doc["kind"] in ("RayCluster", "RayJob"):
        assert doc["apiVersion"] == "ray.io/v1", name
        _crd_validator(doc["kind"]).validate(doc)
    elif doc["kind"] == "RayService":
        _check_rayservice(doc)
    else:
        assert (doc["apiVersion"], doc["kind"]) == ("v1", "ServiceAccount"), name


RAYSERVICE_SPEC = {"serveConfigV2", "rayClusterConfig", "serveService", "upgradeStrategy",
                   "excludeHeadPodFromServeSvc"}
"""RayService ray.io/v1 spec fields (KubeRay rayservice_types.go); its CRD is not vendored:
the cluster part is a RayClusterSpec, checked against the RayCluster CRD."""


def _check_rayservice(doc: dict[str, Any]) -> None:
    """A RayService as KubeRay and Serve would take it: its rayClusterConfig against the
    RayCluster CRD's spec (strict), its serveConfigV2 through Ray Serve's own config schema."""
    from ray.serve.schema import ServeDeploySchema

    assert doc["apiVersion"] == "ray.io/v1" and set(doc) == {"apiVersion", "kind", "metadata",
                                                             "spec"}
    assert set(doc["spec"]) <= RAYSERVICE_SPEC, set(doc["spec"]) - RAYSERVICE_SPEC
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": doc["metadata"],
               "spec": doc["spec"]["rayClusterConfig"]}
    _crd_validator("RayCluster").validate(cluster)
    ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))


def test_rayservice_serves_the_api_with_autoscaling() -> None:
    """The RayService's Serve application is t2v's, its args a valid ServeConfig, and both Serve
    replicas and the GPU pods under them autoscale."""
    import importlib

    from ray.serve.schema import ServeDeploySchema

    from t2v.config import ServeConfig

    (doc,) = _yaml_docs(KUBERAY / "rayservice.yaml")
    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    (app,) = serve_cfg.applications
    module, name = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), name)), app.import_path
    cfg = ServeConfig.model_validate(app.args)
    for uri in (cfg.model, cfg.out):
        assert uri.startswith(f"s3://{BUCKET}/"), uri
    lo, hi = cfg.replicas
    assert lo < hi and cfg.gpus_per_replica == 1
    spec = doc["spec"]["rayClusterConfig"]
    assert spec["enableInTreeAutoscaling"] is True and spec["headGroupSpec"]["rayStartParams"][
        "num-cpus"] == "0"
    (gpu,) = spec["workerGroupSpecs"]
    pod = gpu["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["minReplicas"] <= lo and gpu["maxReplicas"] >= hi, gpu  # a GPU per replica
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    for container in (head, pod["containers"][0]):
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == serve_cfg.http_options.port == 8000
        token = next(e for e in container["env"] if e["name"] == "T2V_API_TOKEN")
        assert "value" not in token and token["valueFrom"]["secretKeyRef"]["name"] == "t2v-api"


def test_crd_validation_catches_a_misspelt_field() -> None:
    doc = _yaml_docs(KUBERAY / "raycluster.yaml")[0]
    doc["spec"]["workerGroupSpecs"][0]["minReplica"] = 0
    with pytest.raises(jsonschema.ValidationError, match="minReplica"):
        _crd_validator("RayCluster").validate(doc)


def test_raycluster_autoscales_gpu_and_cpu_groups() -> None:
    (cluster,) = _yaml_docs(KUBERAY / "raycluster.yaml")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"}
    for g in groups.values():
        assert g["minReplicas"] == 0 < g["maxReplicas"], g["groupName"]
        assert g["template"]["spec"]["serviceAccountName"] == "t2v"
    gpu_pod = groups["gpu"]["template"]["spec"]
    assert gpu_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu_pod["nodeSelector"] and gpu_pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for job in KUBERAY.glob("rayjob-*.yaml"):
        (doc,) = _yaml_docs(job)
        assert doc["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}


# --- job commands: the real CLI parser and config loader -----------------------------------


def _load_job(argv: list[str]) -> Any:
    """`python .../jobs/NAME.py ARGS` -> the resolved config, exactly as the job would build it
    (nothing runs). Paths inside the image map back to this checkout."""
    from t2v.cli import COMMANDS, _parser
    from t2v.configfile import load_config

    assert argv[0] == "python" and re.fullmatch(r"(.*/)?jobs/\w+\.py", argv[1]), argv[:2]
    name = Path(argv[1]).stem
    cmd = COMMANDS[name]
    args = _parser(name, cmd).parse_args([a.replace(IMAGE_DIR, str(ROOT)) for a in argv[2:]])
    flags = [f"{k[5:]}={v}" for k, v in vars(args).items() if k.startswith("flag:") and v]
    return name, load_config(cmd.config, args.config, flags + args.overrides)


def _readme_commands() -> list[list[str]]:
    """Every `python jobs/...` command of cluster/README.md, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", (CLUSTER / "README.md").read_text(), re.S)
    cmds = []
    for line in "".join(blocks).replace("\\\n", " ").splitlines():
        if "-- python jobs/" in line:
            words = shlex.split(line.split(" -- ", 1)[1].replace("$BUCKET", BUCKET))
            cmds.append(words)
    return cmds


def _rayjob_commands() -> list[list[str]]:
    return [shlex.split(_yaml_docs(p)[0]["spec"]["entrypoint"])
            for p in sorted(KUBERAY.glob("rayjob-*.yaml"))]


def test_every_job_command_parses_into_a_valid_config() -> None:
    rayjobs, readme = _rayjob_commands(), _readme_commands()
    seen = {"rayjobs": set(), "readme": set()}
    for where, cmds in (("rayjobs", rayjobs), ("readme", readme)):
        for argv in cmds:
            name, cfg = _load_job(argv)
            seen[where].add(name)
            outs = [getattr(cfg, "out", None)] if name != "train" else [cfg.out, cfg.data.shards]
            for uri in outs:  # absolute or s3:// under `ray job submit`
                assert uri.startswith((f"s3://{BUCKET}/", "/")), f"{where}: {argv}: {uri}"
            if name in ("train", "render", "encode") and where == "rayjobs":
                gpus = {"train": getattr(cfg, "use_gpu", False),
                        "render": getattr(cfg, "gpus_per_worker", 0),
                        "encode": getattr(cfg, "num_gpus", 0)}[name]
                assert gpus, f"{name} RayJob asks for no GPU: {argv}"
    assert seen["rayjobs"] == {"pack", "encode", "train", "render"}
    assert {"pack", "encode", "train", "render"} <= seen["readme"], seen["readme"]


# --- Terraform -----------------------------------------------------------------------------


def _unq(value: Any) -> Any:
    """python-hcl2 keeps HCL's quotes and ${} around values: strip both."""
    if isinstance(value, str):
        value = value.strip('"')
        return value[2:-1] if value.startswith("${") and value.endswith("}") else value
    if isinstance(value, list):
        return [_unq(v) for v in value]
    if isinstance(value, dict):
        return {_unq(k): _unq(v) for k, v in value.items() if not k.startswith("__")}
    return value


def _terraform() -> dict[str, Any]:
    import hcl2

    merged: dict[str, list[Any]] = {}
    for path in sorted(TERRAFORM.glob("*.tf")):
        with open(path) as f:
            for key, blocks in hcl2.load(f).items():
                merged.setdefault(key, []).extend(blocks if isinstance(blocks, list) else [])
    return _unq(merged)


def _blocks(tf: dict[str, Any], key: str, typ: str) -> dict[str, dict[str, Any]]:
    return {name: body for block in tf.get(key, []) if typ in block
            for name, body in block[typ].items()}


def _storage_s3_actions() -> set[str]:
    source = (ROOT / "t2v" / "storage.py").read_text()
    calls = set(re.findall(r"s3_client\(\)\.(\w+)\(", source))
    calls |= set(re.findall(r"get_paginator\(\"(\w+)\"\)", source))
    calls.discard("get_paginator")
    unknown = calls - set(S3_CALL_ACTIONS)
    assert not unknown, f"t2v/storage.py calls {unknown}: add their IAM actions to the map"
    assert calls, "found no boto3 calls in t2v/storage.py"
    return set().union(*(S3_CALL_ACTIONS[c] for c in calls))


def test_terraform_parses_and_bucket_policy_is_least_privilege() -> None:
    tf = _terraform()
    docs = _blocks(tf, "data", "aws_iam_policy_document")
    statements = docs["bucket_access"]["statement"]
    granted = {a for s in statements for a in s["actions"]}
    assert granted == _storage_s3_actions()
    assert not any("*" in a for a in granted), granted
    bucket, objects = "aws_s3_bucket.data.arn", "${aws_s3_bucket.data.arn}/*"
    for s in statements:
        assert s.get("effect", "Allow") == "Allow" and "not_actions" not in s
        want = [bucket] if s["actions"] == ["s3:ListBucket"] else [objects]
        assert s["resources"] == want, s
    # No other policy grants S3 (the head's autoscaler policy is EC2 + PassRole only).
    others = [a for name, d in docs.items() if name != "bucket_access"
              for s in d.get("statement", []) for a in s.get("actions", [])]
    assert not [a for a in others if a.lower().startswith("s3") or a == "*"], others


def test_terraform_bucket_versioning_lifecycle_and_outputs() -> None:
    tf = _terraform()
    resources = {(t, n): b for block in tf["resource"] for t, named in block.items()
                 for n, b in named.items()}
    versioning = resources[("aws_s3_bucket_versioning", "data")]
    assert versioning["versioning_configuration"][0]["status"] == "Enabled"
    rules = resources[("aws_s3_bucket_lifecycle_configuration", "data")]["rule"]
    old = next(r for r in rules if "noncurrent_version_expiration" in r)
    assert old["filter"][0]["prefix"] == "var.runs_prefix" and old["status"] == "Enabled"
    variables = {k: v for block in tf["variable"] for k, v in block.items()}
    assert variables["runs_prefix"]["default"] == "runs/"
    outputs = {k for block in tf["output"] for k in block}
    assert {"bucket_name", "region", "head_instance_profile_arn", "node_instance_profile_arn",
            "node_role_arn", "image_repository"} <= outputs
    # The names cluster/ refers to are the ones Terraform creates.
    prefix = variables["name"]["default"]
    for t, n in [("aws_iam_instance_profile", "head"), ("aws_iam_instance_profile", "node"),
                 ("aws_iam_role", "node")]:
        assert resources[(t, n)]["name"] == "${var.name}-" + n, resources[(t, n)]["name"]
    text = "".join((CLUSTER / f).read_text() for f in ("aws.yaml", "gcp.yaml"))
    text += (KUBERAY / "serviceaccount.yaml").read_text()
    for ref in (f"instance-profile/{prefix}-head", f"instance-profile/{prefix}-node",
                f"role/{prefix}-node"):
        assert ref in text, ref
    assert yaml.safe_load((CLUSTER / "aws.yaml").read_text())["provider"]["region"] == \
        variables["region"]["default"]


# --- Dockerfiles ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_passes_hadolint(name: str) -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    r = subprocess.run([str(hadolint), str(DOCKER / name)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_images_pin_the_same_versions() -> None:
    def args(name: str) -> dict[str, str]:
        return dict(re.findall(r"^ARG (\w+)=(\S+)$", (DOCKER / name).read_text(), re.M))

    cuda, cpu = args("Dockerfile"), args("Dockerfile.cpu")
    for key in ("PYTHON_VERSION", "TORCH_VERSION", "RAY_VERSION"):
        assert cuda[key] == cpu[key], key
    assert f"torch=={cuda['TORCH_VERSION']}" in (ROOT / "Makefile").read_text()
    (cluster,) = _yaml_docs(KUBERAY / "raycluster.yaml")
    assert cluster["spec"]["rayVersion"] == cuda["RAY_VERSION"]
    assert "FROM nvidia/cuda:" in (DOCKER / "Dockerfile").read_text()


def test_dev_s3_script_still_prints_its_environment() -> None:
    r = subprocess.run(["bash", str(ROOT / "infra/dev/s3.sh"), "env"], capture_output=True,
                       text=True, timeout=10)
    assert r.returncode == 0 and "AWS_ENDPOINT_URL=http://127.0.0.1:" in r.stdout
