"""Bad inputs of every kind, each given to a CLI as a new user would (`python -m ...` in a
fresh process, a home folder of its own): exit code 2, exactly one `error:` line on stderr,
no traceback, torch never imported on the way, and nothing the user wrote or a search
produced changed (paths, sizes, mtimes and hashes of the whole folder, before and after).
No case starts Ray."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import PYTHON, cli_env

SPACE = """\
experiment: {{name: {name}, num_samples: 2}}
train:
  model: {{name: resnet18_vd, small_input: true}}
  data: {{kind: digits, image_size: 16, subset: 0.2, loader_workers: 0}}
  batch: {{global_batch: 32, micro_batch: 8}}
  distributed: {{num_workers: 2}}
  run: {{epochs: 2}}
search:
  mix.mode: {{choice: [none, cutmix]}}
  batch.global_batch: {{choice: [16, 32]}}
"""

TRAIN = """\
model: {name: resnet18_vd, small_input: true}
data: {kind: digits, image_size: 16, subset: 0.2}
batch: {global_batch: 32, micro_batch: 8}
distributed: {num_workers: 2}
run: {epochs: 1}
"""

# Records which heavy packages a CLI process imported, when it exits.
OBSERVER = """\
import atexit, json, os, sys

def _record():
    with open(os.environ["TRICK_TEST_IMPORTED"], "w") as f:
        json.dump(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "torchvision", "ray"}), f)

atexit.register(_record)
"""


def _images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (40 * i % 255, 90, 200)).save(folder / f"{i}.png")


def make_world(root: Path) -> Path:
    """What a user has: a home, space and config files, an exported best.yaml, data
    folders (good and broken), and a storage folder holding an earlier experiment and runs."""
    (root / "home").mkdir(parents=True)
    user = root / "user"
    user.mkdir()
    (user / "space.yaml").write_text(SPACE.format(name="fresh"))
    (user / "train.yaml").write_text(TRAIN)
    (user / "best.yaml").write_text(TRAIN + "provenance: {trial_id: t1}\n")
    (user / "notes.txt").write_text("keep me\n")
    (user / "ckpts").mkdir()
    (user / "list.yaml").write_text("- a\n- b\n")
    (user / "syntax.yaml").write_text("experiment:\n  name: [x\n")
    old = root / "storage" / "old"
    old.mkdir(parents=True)
    (old / "space.yaml").write_text(SPACE.format(name="old"))
    info = {"space_file": str(user / "space.yaml"), "sha256": "0" * 64, "overrides": [], "experiment_id": "e1"}
    (old / "search.json").write_text(json.dumps(info, indent=2) + "\n")
    (old / "optuna.db").write_bytes(b"SQLite format 3\x00 study")
    for name, text in (("damaged", '{"space_file": "a"}\n'), ("garbled", "garbage{\n")):
        (root / "storage" / name).mkdir()
        (root / "storage" / name / "space.yaml").write_text(SPACE.format(name=name))
        (root / "storage" / name / "search.json").write_text(text)
    (root / "storage" / "train" / "prod").mkdir(parents=True)
    (root / "storage" / "train" / "prod" / "result.json").write_text("{}\n")
    data = root / "data"
    for name, train, val in (("ok", "ab", "ab"), ("mismatch", "ab", "ac"), ("corrupt", "ab", "ab")):
        for split, classes in (("train", train), ("val", val)):
            for c in classes:
                _images(data / name / split / c, 3)
    (data / "corrupt" / "train" / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    _images(data / "noval" / "train" / "a", 3)
    (data / "afile").write_text("not a folder\n")
    return root


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root: files with size, mtime and hash; folders by name."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = ("dir",)
        for f in filenames:
            p = os.path.join(dirpath, f)
            st = os.stat(p)
            with open(p, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            out[os.path.relpath(p, root)] = ("file", st.st_size, st.st_mtime_ns, digest)
    return out


@dataclass
class Case:
    id: str
    module: str
    args: list[str]
    expect: list[str] = field(default_factory=list)
    """Parts the error line must contain ({w} is the world folder)."""


S = ["--storage-path", "{w}/storage"]
RUN = "search.run"
SPACE_ARG = ["--space", "{w}/user/space.yaml", *S]
CFG = ["--config", "{w}/user/train.yaml", "--storage-path", "{w}/storage/train"]
TRAIN_CLI = "trainable.train"
EXPORT = "search.export"
IMAGES = ["--set", "train.data.kind=imagefolder", "--set", "train.data.image_size=16"]

CASES = [
    # space files
    Case("space-missing", RUN, ["--space", "{w}/user/nope.yaml", *S], ["nope.yaml: no such file"]),
    Case("space-unknown-name", RUN, ["--space", "quickstrat", *S], ["did you mean 'quickstart'"]),
    Case("space-yaml-syntax", RUN, ["--space", "{w}/user/syntax.yaml", *S], ["syntax.yaml: line "]),
    Case("space-not-a-mapping", RUN, ["--space", "{w}/user/list.yaml", *S], ["expected a mapping", "got list"]),
    Case("space-unknown-key", RUN, [*SPACE_ARG, "--set", "train.mix.mdoe=cutmix"],
         ["train.mix.mdoe", "did you mean 'train.mix.mode'"]),
    Case("space-unknown-section", RUN, [*SPACE_ARG, "--set", "trian.run.epochs=1"], ["trian: unknown section"]),
    Case("space-bad-distribution", RUN, [*SPACE_ARG, "--set", "search.mix.mode={choise: [none]}"],
         ["search.mix.mode", "'choise'", "did you mean 'choice'"]),
    Case("space-value-out-of-range", RUN, [*SPACE_ARG, "--set", "search.label_smoothing={uniform: [0, 2]}"],
         ["search.label_smoothing", "out of range"]),
    Case("space-empty-search", RUN, [*SPACE_ARG, "--set", "search.mix.mode=null", "--set",
                                     "search.batch.global_batch=null"], ["search: empty"]),
    Case("space-unknown-search-key", RUN, [*SPACE_ARG, "--set", "search.mix.mood={choice: [none]}"],
         ["search.mix.mood: unknown key path", "did you mean 'mix.mode'"]),
    Case("space-no-whole-accumulation", RUN, [*SPACE_ARG, "--set", "search.batch.global_batch={choice: [24]}"],
         ["no accumulation reaches global batch 24"]),
    # --set and flags
    Case("set-without-equals", RUN, [*SPACE_ARG, "--set", "train.run.epochs"], ["expected key.path=value"]),
    Case("set-bad-value", RUN, [*SPACE_ARG, "--set", "train.run.epochs=0"], ["train.run.epochs", "(got 0)"]),
    Case("num-samples-zero", RUN, [*SPACE_ARG, "--num-samples", "0"], ["experiment.num_samples"]),
    Case("max-concurrent-zero", RUN, [*SPACE_ARG, "--max-concurrent-trials", "0"],
         ["experiment.max_concurrent_trials"]),
    Case("unsafe-name", RUN, [*SPACE_ARG, "--name", "a/b"], ["'a/b' is not a safe folder name"]),
    Case("grace-beyond-epochs", RUN, [*SPACE_ARG, "--set", "experiment.scheduler.grace_period=5"],
         ["grace_period", "5 is more than train.run.epochs 2"]),
    # data (checked by the driver before Ray)
    Case("data-missing-root", RUN, [*SPACE_ARG, *IMAGES, "--set", "train.data.root={w}/data/gone"],
         ["{w}/data/gone: no such folder"]),
    Case("data-no-val", RUN, [*SPACE_ARG, *IMAGES, "--set", "train.data.root={w}/data/noval"],
         ["{w}/data/noval/val: missing"]),
    Case("data-class-mismatch", RUN, [*SPACE_ARG, *IMAGES, "--set", "train.data.root={w}/data/mismatch"],
         ["only in train: b; only in val: c"]),
    Case("data-corrupt-jpeg", RUN, [*SPACE_ARG, *IMAGES, "--set", "train.data.root={w}/data/corrupt"],
         ["{w}/data/corrupt/train/b/broken.jpg: corrupt", "data.skip_corrupt: true"]),
    Case("data-global-batch-over-folder", RUN, [*SPACE_ARG, *IMAGES, "--set", "train.data.root={w}/data/ok",
                                                "--set", "train.data.subset=1.0"],
         ["search.batch.global_batch: 32 is more than the 6 training images", "no value fits"]),
    Case("data-global-batch-over-subset", RUN, [*SPACE_ARG, "--set", "train.data.subset=0.015"],
         ["search.batch.global_batch: 32 is more than the 20 training images", "values that fit: 16"]),
    Case("data-subset-too-small", RUN, [*SPACE_ARG, "--set", "search.data.subset={uniform: [0.005, 0.5]}"],
         ["search.data.subset: 0.005 leaves 10 of the 1437", "smallest data.subset that fits is 0.024"]),
    Case("data-cifar-root-is-a-file", RUN, [*SPACE_ARG, "--set", "train.data.kind=cifar10",
                                            "--set", "train.data.root={w}/data/afile"], ["afile: not a folder"]),
    Case("pretrained-missing", RUN, [*SPACE_ARG, "--set", "train.model.pretrained={w}/user/r18.pt"],
         ["train.model.pretrained: {w}/user/r18.pt: no such file"]),
    Case("pretrained-searched-missing", RUN,
         [*SPACE_ARG, "--set", "search.model.pretrained={choice: [null, {w}/user/gone.pt]}"],
         ["search.model.pretrained: {w}/user/gone.pt: no such file"]),
    # storage and existing experiments
    Case("storage-is-a-file", RUN, [*SPACE_ARG[:2], "--storage-path", "{w}/user/notes.txt"],
         ["--storage-path {w}/user/notes.txt: cannot write there"]),
    Case("storage-under-a-file", RUN, [*SPACE_ARG[:2], "--storage-path", "{w}/user/notes.txt/sub"],
         ["cannot write there"]),
    Case("storage-unwritable", RUN, [*SPACE_ARG[:2], "--storage-path", "/sys/trick-search-storage"],
         ["--storage-path /sys/trick-search-storage: cannot write there"]),
    Case("experiment-exists", RUN, [*SPACE_ARG, "--name", "old"],
         ["experiment {w}/storage/old already exists", "--resume"]),
    Case("resume-missing", RUN, [*SPACE_ARG, "--name", "never", "--resume"],
         ["--resume: no experiment at {w}/storage/never"]),
    Case("resume-with-new-override", RUN, [*SPACE_ARG, "--name", "old", "--resume", "--set", "train.run.epochs=3"],
         ["'train.run.epochs=3' was not part of it"]),
    # production training
    Case("train-config-missing", TRAIN_CLI, ["--config", "{w}/user/nope.yaml"], ["nope.yaml: no such file"]),
    Case("train-config-not-a-mapping", TRAIN_CLI, ["--config", "{w}/user/list.yaml"], ["expected a mapping"]),
    Case("train-config-yaml-syntax", TRAIN_CLI, ["--config", "{w}/user/syntax.yaml"], ["syntax.yaml: line "]),
    Case("train-config-space-file", TRAIN_CLI, ["--config", "{w}/user/space.yaml"], ["experiment: unknown key"]),
    Case("train-set-unknown-key", TRAIN_CLI, [*CFG, "--set", "run.epoch=2"], ["did you mean 'run.epochs'"]),
    Case("train-set-bad-value", TRAIN_CLI, [*CFG, "--set", "mix.mode=blend"], ["mix.mode", "'blend'"]),
    Case("train-negative-workers", TRAIN_CLI, [*CFG, "--num-workers", "-1"], ["--num-workers -1: must be >= 1"]),
    Case("train-workers-split", TRAIN_CLI, [*CFG, "--num-workers", "3"], ["cannot be split over 3 workers"]),
    Case("train-data-class-mismatch", TRAIN_CLI,
         [*CFG, "--set", "data.kind=imagefolder", "--set", "data.root={w}/data/mismatch"], ["only in val: c"]),
    Case("train-global-batch-over-subset", TRAIN_CLI, [*CFG, "--set", "data.subset=0.01"],
         ["batch.global_batch: 32 is more than the 10 training images", "at least 0.024"]),
    Case("train-pretrained-folder", TRAIN_CLI, [*CFG, "--set", "model.pretrained={w}/user/ckpts"],
         ["model.pretrained: {w}/user/ckpts: is a folder"]),
    Case("train-storage-is-a-file", TRAIN_CLI, ["--config", "{w}/user/train.yaml", "--storage-path",
                                               "{w}/user/notes.txt"], ["cannot write there"]),
    Case("train-address-malformed", TRAIN_CLI, [*CFG, "--address", "headnode"], ["expected host:port"]),
    # export
    Case("export-no-experiment", EXPORT, ["--experiment", "{w}/storage/never", "--out", "{w}/user/new.yaml"],
         ["no such folder"]),
    Case("export-not-an-experiment", EXPORT, ["--experiment", "{w}/storage/train", "--out", "{w}/user/new.yaml"],
         ["not an experiment of this tool"]),
    Case("export-out-exists", EXPORT, ["--experiment", "{w}/storage/old", "--out", "{w}/user/best.yaml"],
         ["{w}/user/best.yaml: already exists", "nothing was overwritten"]),
    Case("export-out-under-a-file", EXPORT, ["--experiment", "{w}/storage/old", "--out", "{w}/user/notes.txt/b.yaml"],
         ["is a file, not a folder"]),
    Case("export-damaged-search-json", EXPORT, ["--experiment", "{w}/storage/damaged", "--out", "{w}/user/n.yaml"],
         ["{w}/storage/damaged/search.json: damaged"]),
    Case("export-garbled-search-json", EXPORT, ["--experiment", "{w}/storage/garbled", "--out", "{w}/user/n.yaml"],
         ["{w}/storage/garbled/search.json: unreadable"]),
    Case("export-rank-zero", EXPORT, ["--experiment", "{w}/storage/old", "--out", "{w}/user/n.yaml", "--rank", "0"],
         ["--rank 0: must be >= 1"]),
    Case("export-negative-workers", EXPORT,
         ["--experiment", "{w}/storage/old", "--out", "{w}/user/n.yaml", "--num-workers", "-2"],
         ["--num-workers -2: must be >= 1"]),
]


@pytest.fixture(scope="module")
def observer(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("observer")
    (folder / "sitecustomize.py").write_text(OBSERVER)
    return folder


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case: Case, tmp_path: Path, observer: Path) -> None:
    check_one_line(case, make_world(tmp_path / "w"), tmp_path, observer)


def check_one_line(case: Case, world: Path, tmp_path: Path, observer: Path, **extra_env: str) -> None:
    """Run the case's CLI in a fresh process: exit 2, one `error:` line with the expected
    parts, no traceback, no torch, nothing in the world folder changed."""
    imported = tmp_path / "imported.json"
    # the machine's data cache (derived, deletable: an index kept once a folder is a few seconds old) lives outside
    env = cli_env(HOME=str(world / "home"), TRICK_TEST_IMPORTED=str(imported),
                  TRICK_SEARCH_CACHE=str(tmp_path / "machine-cache"), **extra_env)
    env["PYTHONPATH"] = f"{observer}{os.pathsep}{env['PYTHONPATH']}"
    for var in ("TRICK_SEARCH_STORAGE", "RAY_ADDRESS"):
        env.pop(var, None)
    args = [a.replace("{w}", str(world)) for a in case.args]
    before = snapshot(world)

    r = subprocess.run([PYTHON, "-m", case.module, *args], cwd=world / "user", env=env,
                       capture_output=True, text=True, timeout=120, check=False)

    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for part in case.expect:
        assert part.replace("{w}", str(world)) in lines[0], (part, lines[0])
    assert "torch" not in json.loads(imported.read_text()), "torch imported on the way to a user error"
    assert snapshot(world) == before


def test_the_world_is_valid_as_given(tmp_path: Path) -> None:
    """The files every case starts from pass every check a CLI makes before Ray, so each
    case's error comes from its own change."""
    from search.run import prepare
    from trainable.feasibility import check_config_feasible
    from trainable.train import prepare_config

    world = make_world(tmp_path / "w")
    before = snapshot(world)
    _, exp, _ = prepare(str(world / "user" / "space.yaml"), [], False, None, str(world / "storage"))
    assert exp.path == f"{world}/storage/fresh" and not Path(exp.path).exists()
    resumed, old, _ = prepare(str(world / "user" / "space.yaml"), [], True, "old", str(world / "storage"))
    assert old.path == f"{world}/storage/old" and resumed.experiment.name == "old"
    images = ["train.data.kind=imagefolder", f"train.data.root={world}/data/ok", "train.data.subset=1.0",
              "search.batch.global_batch={choice: [4, 6]}", "train.batch.global_batch=4", "train.batch.micro_batch=1"]
    prepare(str(world / "user" / "space.yaml"), images, False, None, str(world / "storage"))
    cfg = prepare_config(str(world / "user" / "train.yaml"))
    check_config_feasible(cfg, "train.yaml")
    assert snapshot(world) == before


# Data on object storage (moto's S3 server): checked from the listing by the driver, before Ray.
# The local folder cases again with the folders in a bucket: the same messages, naming the URI.
MIRRORED = ("data-missing-root", "data-no-val", "data-class-mismatch", "data-global-batch-over-folder",
            "train-data-class-mismatch")
S3_CASES = [
    *(Case(f"s3-{c.id}", c.module, [a.replace("{w}/data", "{s3}") for a in c.args],
           [e.replace("{w}/data", "{s3}") for e in c.expect]) for c in CASES if c.id in MIRRORED),
    Case("s3-no-such-bucket", RUN, [*SPACE_ARG, *IMAGES, "--set", "train.data.root=s3://no-such-bucket/data"],
         ["s3://no-such-bucket/data: no such bucket"]),
    Case("s3-uri-for-cifar", RUN, [*SPACE_ARG, "--set", "train.data.kind=cifar10", "--set", "train.data.root={s3}/ok"],
         ["is read for data.kind imagefolder only"]),
]


@pytest.fixture(scope="module")
def s3_world(tmp_path_factory):
    """A bucket holding the world's data folders (ok, mismatch, noval), and a second server
    that refuses the credentials every case uses."""
    from tests.conftest import S3Server

    pytest.importorskip("boto3")
    top = tmp_path_factory.mktemp("s3world")
    world = make_world(top / "template")
    server = S3Server(top / "server")
    denied = S3Server(top / "denied", enforce_auth=True)
    try:
        for name in ("ok", "mismatch", "noval"):
            server.upload(world / "data" / name, name)
        yield server, denied
    finally:
        server.stop()
        denied.stop()


@pytest.mark.parametrize("case", S3_CASES, ids=[c.id for c in S3_CASES])
def test_bad_data_on_object_storage_is_one_line_before_ray(case: Case, tmp_path: Path, observer: Path,
                                                          s3_world) -> None:
    server, _ = s3_world
    uri = f"s3://{server.BUCKET}"
    case = Case(case.id, case.module, [a.replace("{s3}", uri) for a in case.args],
                [e.replace("{s3}", uri) for e in case.expect])
    check_one_line(case, make_world(tmp_path / "w"), tmp_path, observer, **server.env)


def test_data_the_credentials_cannot_read_is_one_line(tmp_path: Path, observer: Path, s3_world) -> None:
    _, denied = s3_world
    uri = f"s3://{denied.BUCKET}/ok"
    case = Case("s3-access-denied", RUN, [*SPACE_ARG, *IMAGES, "--set", f"train.data.root={uri}"],
                [f"{uri}: cannot list it with this machine's credentials", "ACCESS_DENIED"])
    check_one_line(case, make_world(tmp_path / "w"), tmp_path, observer, **denied.env)


# Feasibility follows `when` -----------------------------------------------------------------------------------
WHEN_SPACE = SPACE.split("search:\n")[0].replace("{name}", "when") + """search:
  data.subset: {{choice: [0.1, 1.0]}}
  batch.global_batch: {{choice: [32, 1024]{when}}}
"""


def _feasibility_error(tmp_path: Path, when: str) -> str | None:
    from spaces import load_space
    from trainable.config import ConfigError
    from trainable.feasibility import check_space_feasible

    path = tmp_path / f"space{abs(hash(when))}.yaml"
    path.write_text(WHEN_SPACE.format(when=when))
    space = load_space(path)
    try:
        check_space_feasible(space.train, space.search, "space.yaml")
    except ConfigError as err:
        return str(err)
    return None


def test_feasibility_checks_only_the_combinations_when_allows(tmp_path: Path) -> None:
    # 1024 is drawn only with the whole training set (1437 images): every trial can train
    assert _feasibility_error(tmp_path, ", when: {data.subset: [1.0]}") is None
    # drawn with a tenth (142 images) it cannot, and the message is the one without `when`
    refused = _feasibility_error(tmp_path, ", when: {data.subset: [0.1]}")
    assert refused is not None and refused == _feasibility_error(tmp_path, "")
    assert "search.batch.global_batch: 1024 is more than the 142 training images" in refused


def test_accumulation_check_follows_when(tmp_path: Path) -> None:
    from spaces import SpaceError, load_space

    text = SPACE.format(name="acc").replace(
        "  batch.global_batch: {choice: [16, 32]}\n",
        "  batch.micro_batch: {choice: [8, 12]}\n  batch.global_batch: {choice: [48], when: {batch.micro_batch: [%s]}}\n")
    (tmp_path / "ok.yaml").write_text(text % "12")
    load_space(tmp_path / "ok.yaml")  # 48 = 12 x 2 workers x 2 steps; with 8 the base 32 = 8 x 2 x 2
    (tmp_path / "bad.yaml").write_text(text % "8")
    with pytest.raises(SpaceError, match="no accumulation reaches global batch 32"):
        load_space(tmp_path / "bad.yaml")  # micro-batch 12 keeps the base 32: not a multiple of 12 x 2
