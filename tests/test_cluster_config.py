"""Offline checks of the cluster launcher files: cluster.yaml (AWS) and clusters/onprem.yaml (local).

Each file goes through Ray's own launcher validator, the code path `ray up` takes before it touches
any machine: `prepare_config` (merge the provider's defaults.yaml, build the local provider's node
type, fill per-type min/max workers) then `validate_config` (the JSON schema plus cross-field rules).
Neither contacts a cloud: for AWS, prepare_config only reads ray/autoscaler/aws/defaults.yaml; the
parts that need AWS (AMI, subnets, security groups, IAM, key pairs) happen later, in
`bootstrap_config`, which these tests do not call. `_offline()` enforces that by failing every socket
connection while the validator runs.

On top of Ray's rules come this project's invariants (`invariant_problems`), and every invariant is
shown to reject a broken copy of the files.
"""

from __future__ import annotations

import copy
import re
import socket
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import click
import pytest
import yaml

from trainable.storage import STORAGE_ENV

ROOT = Path(__file__).resolve().parents[1]
AWS = ROOT / "cluster.yaml"
ONPREM = ROOT / "clusters" / "onprem.yaml"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# Helpers ------------------------------------------------------------------------------------------------
def ray_pin() -> str:
    """The Ray version pinned in pyproject.toml (`ray[...]==X`)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?\s*==\s*(\S+)", d.strip()))]
    assert len(pins) == 1, f"expected one exact ray pin in pyproject.toml, found {deps}"
    return pins[0]


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@contextmanager
def _offline() -> Iterator[None]:
    """Any attempt to reach the network inside this block fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"the launcher validator tried to use the network: {args}")

    with (
        mock.patch.object(socket.socket, "connect", refuse),
        mock.patch.object(socket.socket, "connect_ex", refuse),
        mock.patch.object(socket, "getaddrinfo", refuse),
        mock.patch.object(socket, "create_connection", refuse),
    ):
        yield


def prepare(raw: dict[str, Any]) -> dict[str, Any]:
    """Ray's `prepare_config` on a copy, offline."""
    from ray.autoscaler._private.util import prepare_config

    with _offline():
        return prepare_config(copy.deepcopy(raw))


def ray_validate(raw: dict[str, Any]) -> dict[str, Any]:
    """Ray's launcher validation as `ray up` runs it (prepare, then validate), offline."""
    from ray.autoscaler._private.util import validate_config

    prepared = prepare(raw)
    with _offline():
        validate_config(prepared)
    return prepared


def string_leaves(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(key path, string) for every string in a parsed YAML document."""
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from string_leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from string_leaves(v, f"{path}[{i}]")


def docker_volumes(docker: dict[str, Any]) -> list[str]:
    """Container-side paths of the `-v/--volume SRC:DST` bind mounts in docker run options."""
    keys = ("run_options", "head_run_options", "worker_run_options")
    opts = " ".join(str(o) for key in keys for o in docker.get(key, []))
    return [spec.split(":")[1] for spec in re.findall(r"(?:^|\s)(?:-v|--volume)[=\s]+(\S+)", opts) if ":" in spec]


def invariant_problems(raw: dict[str, Any], prepared: dict[str, Any], pin: str) -> list[str]:
    """This project's rules for a launcher file, one line per violation (empty: all hold).

    `raw` is the file as written, `prepared` the same after Ray's prepare_config (what `ray up` acts
    on: provider defaults merged in, node types filled)."""
    problems: list[str] = []
    local = raw["provider"]["type"] == "local"
    types: dict[str, Any] = prepared.get("available_node_types", {})
    head = prepared.get("head_node_type")

    # The head node type exists.
    if head not in types:
        problems.append(f"head_node_type {head!r} is not one of available_node_types {sorted(types)}")

    # The GPU node type declares its 8 GPUs (the local provider detects each machine's resources).
    if not local:
        gpu_types = [n for n, t in types.items() if n != head and t.get("resources", {}).get("GPU") == 8]
        if not gpu_types:
            problems.append("no worker node type declares resources GPU: 8")
        # Every node reaches the bucket through an instance profile (no keys on disk).
        for name, t in types.items():
            if "IamInstanceProfile" not in t.get("node_config", {}):
                problems.append(f"node type {name!r} has no IamInstanceProfile (S3 access)")

    # Every node type has max_workers >= min_workers.
    for name, t in types.items():
        if t.get("max_workers", 0) < t.get("min_workers", 0):
            problems.append(
                f"node type {name!r}: max_workers {t.get('max_workers')} < min_workers {t.get('min_workers')}"
            )

    # An idle timeout is set in the file itself, not left to Ray's defaults.
    timeout = raw.get("idle_timeout_minutes")
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        problems.append(f"idle_timeout_minutes must be set to a positive number, got {timeout!r}")

    # The checkout is mounted, and setup installs it (editable) on the head and on every worker type.
    file_mounts = prepared.get("file_mounts", {})
    mounts = [remote for remote, local_path in file_mounts.items() if str(local_path).rstrip("/") in (".", "./")]
    if not mounts:
        problems.append("file_mounts does not mount the checkout ('.')")
    command_lists = {
        "head": prepared.get("head_setup_commands", []),
        "worker": prepared.get("worker_setup_commands", []),
    }
    for name, t in types.items():  # a node type's own worker_setup_commands replaces the global ones
        if "worker_setup_commands" in t:
            command_lists[f"node type {name!r}"] = t["worker_setup_commands"]
    for who, cmds in command_lists.items():
        installs = [m for m in mounts for c in cmds if re.search(rf"\bpip install\b.*\s-e\s+{re.escape(m)}/?(\s|$)", c)]
        if not installs:
            problems.append(f"{who} setup commands do not `pip install -e` the mounted checkout {mounts}")

    # The storage is set exactly once, to shared storage, where every process and shell sees it.
    leaves = list(string_leaves(raw))
    sets = [(where, m.group(1)) for where, s in leaves for m in re.finditer(rf"{STORAGE_ENV}=([^\s'\";]+)", s)]
    if len(sets) != 1:
        problems.append(f"{STORAGE_ENV} must be set exactly once, found {len(sets)}: {sets}")
    for uri, where in {uri: where for where, uri in sets}.items():
        uses = sum(s.count(uri) for _, s in leaves)
        if uses != 1:
            problems.append(f"the storage {uri!r} must appear exactly once, found {uses} times")
        docker = raw.get("docker") or {}
        if docker and not where.startswith("docker.run_options"):
            problems.append(f"{STORAGE_ENV} is set in {where}, not in docker.run_options (where every shell sees it)")
        scheme = re.match(r"([a-z0-9]+)://([^/]+)", uri)
        if scheme:
            if scheme.group(1) not in ("s3", "gs"):
                problems.append(f"storage {uri!r}: only s3:// or gs:// URIs are shared storage")
        elif not local:
            problems.append(f"storage {uri!r} is not a shared URI (s3:// or gs://)")
        elif not uri.startswith("/"):
            problems.append(f"storage {uri!r} must be an absolute path on a shared mount")
        elif docker and not any(uri == v or uri.startswith(v.rstrip("/") + "/") for v in docker_volumes(docker)):
            problems.append(f"storage {uri!r} is not under a shared mount of the container {docker_volumes(docker)}")

    # The Docker image carries the pinned Ray version.
    docker = prepared.get("docker") or {}
    images = [docker[k] for k in ("image", "head_image", "worker_image") if docker.get(k)]
    images += [t["docker"]["worker_image"] for t in types.values() if t.get("docker", {}).get("worker_image")]
    if docker and not images:
        problems.append("docker has no image")
    for image in images:
        m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)(?:-\S*)?", image)
        if not m or m.group(1) != pin:
            problems.append(f"docker image {image!r} does not carry Ray {pin} (the pin in pyproject.toml)")

    # The dashboard is not exposed: bound to loopback, or left to Ray's default (localhost).
    start = " ".join(prepared.get("head_start_ray_commands", []))
    if "ray start" not in start or "--head" not in start:
        problems.append("head_start_ray_commands do not start a Ray head")
    for host in re.findall(r"--dashboard-host[=\s]+['\"]?([^\s'\"]+)", start):
        if host not in LOOPBACK:
            problems.append(f"the dashboard is bound to {host}: use --dashboard-host=127.0.0.1 and `ray dashboard`")
    return problems


def uncommented_a100(text: str) -> dict[str, Any]:
    """The commented-out A100 node type of cluster.yaml, as YAML."""
    lines = text.splitlines()
    start = lines.index("  # gpu_8x_a100:")
    block = []
    for line in lines[start:]:
        if not line.startswith("  #"):
            break
        block.append(line.replace("  # ", "  ", 1))
    return yaml.safe_load("\n".join(block))


# The files as written -------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [AWS, ONPREM], ids=["aws", "onprem"])
def test_ray_validator_accepts(path: Path) -> None:
    prepared = ray_validate(load(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("path", [AWS, ONPREM], ids=["aws", "onprem"])
def test_project_invariants_hold(path: Path) -> None:
    raw = load(path)
    assert invariant_problems(raw, ray_validate(raw), ray_pin()) == []


def test_aws_shape() -> None:
    """The decisions cluster.yaml documents: a CPU head that takes no DDP worker, 8xV100 workers,
    at least one kept up, dashboard explicitly on loopback."""
    prepared = ray_validate(load(AWS))
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert head["max_workers"] == 0
    v100 = types["gpu_8x_v100"]
    assert v100["node_config"]["InstanceType"] == "p3.16xlarge"
    assert v100["resources"] == {"CPU": 64, "GPU": 8}
    assert 1 <= v100["min_workers"] <= v100["max_workers"] <= prepared["max_workers"]
    assert prepared["provider"]["cache_stopped_nodes"] is False
    assert "--dashboard-host=127.0.0.1" in " ".join(prepared["head_start_ray_commands"])
    assert any(re.search(r"ray start --address=\$RAY_HEAD_IP:6379", c) for c in prepared["worker_start_ray_commands"])


def test_onprem_node_type_comes_from_the_ip_list() -> None:
    """The local provider builds its single node type from head_ip/worker_ips; every listed machine
    joins (min = max = number of worker ips)."""
    raw = load(ONPREM)
    prepared = ray_validate(raw)
    [(name, t)] = prepared["available_node_types"].items()
    assert name == prepared["head_node_type"]
    assert t["min_workers"] == t["max_workers"] == len(raw["provider"]["worker_ips"])


def test_commented_a100_alternative_is_valid() -> None:
    """Uncommented, the A100 alternative passes Ray's validator and the invariants too."""
    text = AWS.read_text()
    raw = load(AWS)
    a100 = uncommented_a100(text)
    assert set(a100) == {"gpu_8x_a100"}
    assert a100["gpu_8x_a100"]["node_config"]["InstanceType"] == "p4d.24xlarge"
    raw["available_node_types"].update(a100)
    prepared = ray_validate(raw)
    assert invariant_problems(raw, prepared, ray_pin()) == []
    assert prepared["available_node_types"]["gpu_8x_a100"]["resources"]["GPU"] == 8


def test_pin_is_read_from_pyproject() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", ray_pin())
    import ray

    assert ray.__version__ == ray_pin(), "the venv's Ray (whose validator these tests use) differs from the pin"


# Broken copies are rejected ----------------------------------------------------------------------------
def _gpu(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg["available_node_types"]["gpu_8x_v100"]


def _drop_install(cfg: dict[str, Any]) -> None:
    cfg["setup_commands"] = [c for c in cfg["setup_commands"] if "pip install -e" not in c]


def _set_storage(value: str) -> Callable[[dict[str, Any]], None]:
    def edit(cfg: dict[str, Any]) -> None:
        opts = cfg["docker"]["run_options"]
        opts[:] = [f"--env={STORAGE_ENV}={value}" if STORAGE_ENV in o else o for o in opts]

    return edit


def _storage_also_in_bashrc(cfg: dict[str, Any]) -> None:
    cfg["setup_commands"].insert(0, f"echo 'export {STORAGE_ENV}=s3://my-bucket/trick-search' >> ~/.bashrc")


def _no_storage(cfg: dict[str, Any]) -> None:
    cfg["docker"]["run_options"] = [o for o in cfg["docker"]["run_options"] if STORAGE_ENV not in o]


def _storage_only_in_bashrc(cfg: dict[str, Any]) -> None:
    _no_storage(cfg)
    cfg["setup_commands"].insert(0, f"echo 'export {STORAGE_ENV}=s3://my-bucket/trick-search' >> ~/.bashrc")


def _replace_in_head_start(old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def edit(cfg: dict[str, Any]) -> None:
        cmds = cfg["head_start_ray_commands"]
        assert any(old in c for c in cmds)
        cmds[:] = [c.replace(old, new) for c in cmds]

    return edit


_expose_dashboard = _replace_in_head_start("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")

AWS_BREAKS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "head type removed": (lambda c: c["available_node_types"].pop("head"), "head_node_type"),
    "GPU removed": (lambda c: _gpu(c)["resources"].pop("GPU"), "GPU: 8"),
    "4 GPUs": (lambda c: _gpu(c)["resources"].update(GPU=4), "GPU: 8"),
    "no project install": (_drop_install, "pip install -e"),
    "install of another path": (
        lambda c: c["setup_commands"].__setitem__(-1, "pip install -e /home/ray/elsewhere"),
        "pip install -e",
    ),
    "checkout mounted elsewhere": (lambda c: c.update(file_mounts={"/home/ray/src": "."}), "pip install -e"),
    "checkout not mounted": (lambda c: c.update(file_mounts={}), "does not mount the checkout"),
    "worker type overrides setup without install": (
        lambda c: _gpu(c).update(worker_setup_commands=["echo hi"]),
        "gpu_8x_v100",
    ),
    "storage on local disk": (_set_storage("/home/ray/experiments"), "not a shared URI"),
    "storage on http": (_set_storage("https://example.com/x"), "only s3:// or gs://"),
    "storage set twice": (_storage_also_in_bashrc, "exactly once"),
    "storage missing": (_no_storage, "exactly once"),
    "storage out of docker env": (_storage_only_in_bashrc, "docker.run_options"),
    "image Ray differs from pin": (
        lambda c: c["docker"].update(image="rayproject/ray:2.59.0-py311-gpu"),
        "pin in pyproject",
    ),
    "image without Ray version": (lambda c: c["docker"].update(image="rayproject/ray:latest-gpu"), "pin in pyproject"),
    "dashboard on all interfaces": (_expose_dashboard, "dashboard is bound"),
    # Leaving the start commands to Ray's AWS defaults would expose the dashboard (they bind 0.0.0.0):
    # the check runs on the prepared config, so it sees that.
    "head start left to AWS defaults": (lambda c: c.pop("head_start_ray_commands"), "dashboard is bound"),
    "idle timeout missing": (lambda c: c.pop("idle_timeout_minutes"), "idle_timeout_minutes"),
    "max below min": (lambda c: _gpu(c).update(min_workers=3, max_workers=2), "max_workers 2 < min_workers 3"),
    "workers without S3 role": (lambda c: _gpu(c)["node_config"].pop("IamInstanceProfile"), "IamInstanceProfile"),
}


@pytest.mark.parametrize("name", list(AWS_BREAKS))
def test_invariants_reject_broken_aws(name: str) -> None:
    edit, expected = AWS_BREAKS[name]
    raw = load(AWS)
    edit(raw)
    problems = invariant_problems(raw, prepare(raw), ray_pin())
    assert any(expected in p for p in problems), problems


ONPREM_BREAKS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "storage outside the shared mount": (_set_storage("/home/ray/experiments"), "not under a shared mount"),
    "shared mount not in the container": (
        lambda c: c["docker"].update(run_options=[o for o in c["docker"]["run_options"] if "--volume" not in o]),
        "not under a shared mount",
    ),
    "relative storage path": (_set_storage("trick-search"), "absolute path"),
    "no project install": (_drop_install, "pip install -e"),
    "dashboard on all interfaces": (_expose_dashboard, "dashboard is bound"),
    "image Ray differs from pin": (
        lambda c: c["docker"].update(image="rayproject/ray:2.9.3-py311-gpu"),
        "pin in pyproject",
    ),
}


@pytest.mark.parametrize("name", list(ONPREM_BREAKS))
def test_invariants_reject_broken_onprem(name: str) -> None:
    edit, expected = ONPREM_BREAKS[name]
    raw = load(ONPREM)
    edit(raw)
    problems = invariant_problems(raw, prepare(raw), ray_pin())
    assert any(expected in p for p in problems), problems


def test_s3_storage_is_accepted_onprem() -> None:
    """The on-prem file may use object storage instead of the NFS path."""
    raw = load(ONPREM)
    _set_storage("s3://my-bucket/trick-search")(raw)
    assert invariant_problems(raw, ray_validate(raw), ray_pin()) == []


def test_ray_validator_rejects_a_misspelt_key() -> None:
    """Ray's schema is strict (no unknown keys), so a typo cannot pass silently."""
    import jsonschema

    raw = load(AWS)
    raw["setup_command"] = raw.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(raw)


def test_ray_validator_rejects_missing_head_type() -> None:
    raw = load(AWS)
    del raw["available_node_types"]["head"]
    with pytest.raises(ValueError, match="head_node_type"):
        ray_validate(raw)


def test_ray_validator_rejects_node_types_onprem() -> None:
    """The local provider makes its node type itself and refuses hand-written ones."""
    raw = load(ONPREM)
    raw["available_node_types"] = load(AWS)["available_node_types"]
    raw["head_node_type"] = "head"
    with pytest.raises(click.ClickException, match="available_node_types"):
        ray_validate(raw)


def test_offline_guard_blocks_connections() -> None:
    """The guard around the validator really refuses connections (so its silence means something)."""
    with _offline(), pytest.raises(AssertionError, match="network"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    with socket.socket() as sock, _offline(), pytest.raises(AssertionError, match="network"):
        sock.connect(("127.0.0.1", 9))
