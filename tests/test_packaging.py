"""The package as users install it: declared dependencies and their floors, one version, the
configs and entry points working from outside the repository after a wheel install."""

import ast
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements(extra: str | None = None) -> list[Requirement]:
    deps = project()["dependencies"] if extra is None else project()["optional-dependencies"][extra]
    return [Requirement(d) for d in deps]


def test_installed_versions_meet_the_declared_floors_and_caps():
    """What runs here is what pyproject.toml admits: a floor raised in the code (PyAV 17's
    reformat(threads=1)) and not in pyproject, or a cap the environment has outgrown, fails here."""
    wrong = []
    for req in requirements() + requirements("test"):
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = md.version(req.name)
        except md.PackageNotFoundError:
            if req.name != "hydra-submitit-launcher":  # optional in a bare test install
                wrong.append(f"{req.name}: not installed")
            continue
        if not req.specifier.contains(installed, prereleases=True):
            wrong.append(f"{req.name} {installed} outside {req.specifier}")
    assert not wrong, wrong


def _imported_top_level() -> set[str]:
    names = set()
    for path in (ROOT / "vidrep").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


# import name -> distribution name, where they differ
DISTRIBUTION = {
    "cv2": "opencv-contrib-python-headless",
    "PIL": "Pillow",
    "sklearn": "scikit-learn",
    "hydra": "hydra-core",
    "hydra_plugins": "hydra-joblib-launcher",
    "google": "protobuf",  # google.protobuf (models/caffe.py)
}
# imported only inside a guard that names the extra to install (bench/, the slurm launcher)
OPTIONAL = {"litdata", "submitit"}


def test_every_third_party_import_is_declared():
    declared = {req.name.lower() for req in requirements()}
    imported = _imported_top_level() - set(sys.stdlib_module_names) - OPTIONAL - {"vidrep"}
    missing = sorted(n for n in imported if DISTRIBUTION.get(n, n).lower() not in declared)
    assert not missing, f"imported by vidrep/ but not in pyproject's dependencies: {missing}"


def _closure(names: list[str]) -> set[str]:
    """Distributions pulled by `names` through their unconditional requirements (extras not taken)."""
    seen: set[str] = set()
    todo = [n.lower() for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for r in map(Requirement, reqs):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name.lower())
    return seen


def test_no_declared_dependency_pulls_pandas():
    """pandas (~84 MB) is needed by nothing vidrep does; only extras of Lightning and torchmetrics
    (test, dev) ask for it."""
    assert "pandas" not in _closure([req.name for req in requirements()])


def test_one_version_source():
    import vidrep

    text = (ROOT / "vidrep" / "__init__.py").read_text()
    assert not re.search(r"__version__\s*=\s*['\"]\d+\.\d", text), "the version is written only in pyproject.toml"
    assert vidrep.__version__ in (md.version("vidrep"), "0+unknown")
    cff = (ROOT / "CITATION.cff").read_text()
    assert re.search(rf"^version: {re.escape(project()['version'])}$", cff, re.M), "CITATION.cff's version"
    assert "Wang" in cff and "ICCV" in cff and (ROOT / "LICENSE").read_text().startswith("MIT License")


@pytest.mark.slow
def test_a_wheel_runs_from_any_directory(tmp_path):
    """The issue's acceptance: build a wheel, install it (no dependencies, beside the venv's torch),
    and from a directory outside the repository plan the paper's 8M run on 4 GPUs without a corpus,
    and ask each console script for its help."""
    wheels, target, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("vidrep-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target), "WANDB_MODE": "offline"}
    run_dir = tmp_path / "plan"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vidrep.train",
            "data=8M",
            "trainer.devices=4",
            "dry_run=true",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    schedule = json.loads((run_dir / "schedule.json").read_text())
    # the README's table, `scaling=paper`, 4 GPUs
    assert schedule["world_size"] == 4 and schedule["per_rank_pairs"] == [13, 13, 12, 12]
    assert (schedule["global_batch_pairs"], schedule["lr"], schedule["max_steps"]) == (50, 0.001, 400_000)
    assert schedule["lr_drops_at_steps"] == [100_000, 200_000, 300_000] and schedule["epochs"] == 5.0
    assert (schedule["hard_negatives_from_step"], schedule["negative_pool"]) == (150_000, 98)
    assert schedule["train_pairs"] == 4_000_000
    # the installed package's code ran, not the checkout's
    where = subprocess.run(
        [sys.executable, "-c", "import vidrep; print(vidrep.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.strip().startswith(str(target))
    scripts = target / "bin"
    for name in ("vidrep-train", "vidrep-mine", "vidrep-evaluate"):
        help_ = subprocess.run(
            [sys.executable, str(scripts / name), "--help"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert help_.returncode == 0 and "== Configuration groups ==" in help_.stdout, (name, help_.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("spelling", ["module", "console script"])
def test_ddp_ranks_start_with_either_spelling(tmp_path, tiny_corpus, spelling):
    """Lightning starts the other DDP ranks with the program that started rank 0: `python -m
    vidrep.train` (the module again) or the console script (its file); both must train as one run."""
    import shutil

    from conftest import TINY

    if spelling == "module":
        program = [sys.executable, "-m", "vidrep.train"]
    else:
        script = shutil.which("vidrep-train") or str(Path(sys.executable).parent / "vidrep-train")
        if not Path(script).is_file():
            pytest.skip("the console script is installed by `pip install -e .` (CI does)")
        program = [script]
    work = tmp_path / "elsewhere"
    work.mkdir()
    args = [*TINY, f"data.root={tiny_corpus}", "~data.demo", "logger=csv", "trainer=ddp", "trainer.accelerator=cpu"]
    args += ["trainer.devices=2", "trainer.max_steps=2", f"hydra.run.dir={tmp_path}/run"]
    out = subprocess.run(
        [*program, *args], cwd=work, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in work.iterdir()) == []  # the ranks made no folders of their own
    import torch

    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 and "world_size" in (tmp_path / "run" / "schedule.json").read_text()
    assert json.loads((tmp_path / "run" / "schedule.json").read_text())["world_size"] == 2
