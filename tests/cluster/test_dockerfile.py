"""docker/Dockerfile installs what setup.cfg declares, on a pinned CUDA PyTorch base whose torch
satisfies the package's bound, without replacing that torch, and runs torchrun as a non-root user.

No image is built here (no Docker daemon in CI). What is checked instead: the Dockerfile's own
requirement-extraction step, run on this repository's setup.cfg; the build context its
.dockerignore lets through, built into a wheel offline; and the Dockerfile's instructions.
Not checked: that the base image tag exists in the registry, the Python version inside it, and
the resolution of the requirements against the packages the image ships (`docker build` does).
"""
from __future__ import annotations

import configparser
import importlib.metadata
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.helpers.slurm_harness import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / "docker" / "Dockerfile.dockerignore"
BASE_IMAGE = re.compile(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+)\.(\d+)-cudnn\d+-(runtime|devel)")


# ------------------------------------------------------------------ parsing
def instructions():
    """(INSTRUCTION, arguments) of the Dockerfile: continuations joined, comments dropped."""
    result, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


def base_image():
    args = {}
    for keyword, value in instructions():
        if keyword == "ARG" and "=" in value:
            name, _, default = value.partition("=")
            args[name] = default
        if keyword == "FROM":
            return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], value)
    raise AssertionError("no FROM in the Dockerfile")


def setup_cfg():
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(REPO / "setup.cfg")
    return cfg


def declared_requirements():
    return [Requirement(line) for line in setup_cfg()["options"]["install_requires"].split("\n")
            if line.strip() and not line.strip().startswith("#")]


def pip_installs():
    """Argument lists of every `pip install` in a RUN instruction."""
    found = []
    for keyword, value in instructions():
        if keyword != "RUN":
            continue
        lexer = shlex.shlex(value, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command = []
        for token in [*lexer, ";"]:
            if token in ("&&", "||", ";", "|"):
                if "pip" in command and "install" in command[command.index("pip"):]:
                    found.append(command[command.index("install", command.index("pip")) + 1:])
                command = []
            else:
                command.append(token)
    return found


def _positional(args):
    """Requirement arguments of a pip install (options and their values removed)."""
    takes_value = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url",
                   "--extra-index-url", "-f", "--find-links"}
    out, skip = [], False
    for word in args:
        if skip:
            skip = False
        elif word in takes_value:
            skip = True
        elif not word.startswith("-"):
            out.append(word)
    return out


# ------------------------------------------------------------------ base image
def test_base_image_is_pinned_and_its_torch_satisfies_setup_cfg():
    image = base_image()
    match = BASE_IMAGE.fullmatch(image)
    assert match, f"base image {image!r} is not a pinned pytorch/pytorch:<torch>-cuda<x.y>-cudnn<n>-<flavour> tag"
    torch_version, cuda_major = Version(match.group(1)), int(match.group(2))
    (torch_req,) = [r for r in declared_requirements() if r.name == "torch"]
    assert torch_version in torch_req.specifier, f"{image} ships torch {torch_version}; setup.cfg wants {torch_req}"
    assert cuda_major >= 12, "Hopper GPUs (H100/H200) want CUDA 12"


# ------------------------------------------------------------------ what gets installed
def test_dependency_step_installs_exactly_what_setup_cfg_declares(tmp_path):
    """Runs the Dockerfile's requirement-extraction RUN on this setup.cfg (paths moved into a
    temporary folder, `python` the interpreter of the tests) and compares the result."""
    (step,) = [v for k, v in instructions() if k == "RUN" and "/tmp/requirements.txt" in v
               and "pip install" not in v]
    constraint, requirements = tmp_path / "torch-constraint.txt", tmp_path / "requirements.txt"
    script = step.replace("/opt/torch-constraint.txt", str(constraint)).replace(
        "/tmp/requirements.txt", str(requirements))
    (tmp_path / "setup.cfg").write_text((REPO / "setup.cfg").read_text())
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    extracted = [Requirement(line) for line in requirements.read_text().splitlines() if line.strip()]
    assert [str(r) for r in extracted] == [str(r) for r in declared_requirements()]
    # The constraint pins torch to the build that is present (in the image: the base image's).
    assert constraint.read_text().split() == [f"torch=={importlib.metadata.version('torch')}"]
    assert ["--constraint", "/opt/torch-constraint.txt", "--requirement", "/tmp/requirements.txt"] in pip_installs()


def test_every_pip_install_keeps_the_base_torch_and_no_pin_conflicts_with_setup_cfg():
    declared = {r.name.lower(): r for r in declared_requirements()}
    installs = pip_installs()
    assert installs, "the Dockerfile installs nothing with pip"
    for args in installs:
        assert "--constraint" in args and args[args.index("--constraint") + 1] == "/opt/torch-constraint.txt", args
        for spec in _positional(args):
            if spec.startswith("."):
                continue
            req = Requirement(spec)
            assert req.name.lower() != "torch", "torch comes from the base image, never from pip"
            pins = [s.version for s in req.specifier if s.operator == "=="]
            want = declared.get(req.name.lower())
            for pin in pins:
                assert want is None or Version(pin) in want.specifier, f"{spec} conflicts with setup.cfg's {want}"


def test_package_step_copies_every_package_and_installs_it_without_dependencies():
    steps = instructions()
    copied = {source for k, v in steps if k == "COPY" for source in v.split()[:-1]}
    include = [p.strip() for p in setup_cfg()["options.packages.find"]["include"].split() if p.strip()]
    top_level = {p.split(".")[0] for p in include}
    missing = (top_level | {"setup.cfg", "pyproject.toml", "README.md", "launch", "conf"}) - copied
    assert not missing, f"not copied into the image: {sorted(missing)}"
    package_installs = [a for a in pip_installs() if "." in _positional(a)]
    assert package_installs and all("--no-deps" in a for a in package_installs)


def test_runs_torchrun_as_a_non_root_user():
    steps = instructions()
    users = [v for k, v in steps if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    last_user = max(i for i, (k, _) in enumerate(steps) if k == "USER")
    assert not any(k == "RUN" for k, _ in steps[last_user:]), "install steps belong before USER"
    (entry,) = [v for k, v in steps if k == "ENTRYPOINT"]
    assert entry == '["torchrun"]'
    workdirs = [v for k, v in steps[:last_user] if k == "WORKDIR"]
    (cmd,) = [v for k, v in steps if k == "CMD"]
    assert f"{workdirs[-1]}/launch/train.py" in cmd  # where `COPY launch ./launch` put it


# ------------------------------------------------------------------ the build context
def _ignore_patterns():
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            patterns.append((negate, _glob_regex(line.lstrip("!"))))
    return patterns


def _glob_regex(pattern):
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


def _in_context(path, patterns):
    """Docker's rule, for the patterns used here: the last pattern matching the path or one of its
    parent folders decides; `!` lets it back in."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    keep = True
    for negate, regex in patterns:
        if any(regex.fullmatch(p) for p in prefixes):
            keep = negate
    return keep


def test_build_context_builds_a_wheel_with_the_declared_requirements(tmp_path):
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: cannot list the files of a clean clone")
    patterns = _ignore_patterns()
    context = tmp_path / "context"
    kept = [f for f in listed.stdout.splitlines() if (REPO / f).is_file() and _in_context(f, patterns)]
    assert not [f for f in kept if f.startswith((".venv/", "outputs/", "data/", ".git/"))]
    for name in kept:
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        (context / name).write_bytes((REPO / name).read_bytes())
    for keyword, value in instructions():
        if keyword == "COPY":
            for source in value.split()[:-1]:
                assert (context / source).exists(), f"COPY {source}: left out of the build context"

    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--no-index", "--wheel-dir", str(tmp_path / "dist"), str(context)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [Requirement(line.split(":", 1)[1].strip()) for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")]
    base = sorted(str(r) for r in requires if r.marker is None)
    assert base == sorted(str(r) for r in declared_requirements())
    packages = sorted(str(p.parent.relative_to(REPO)) for top in ("partial_fc", "npc_head")
                      for p in (REPO / top).rglob("__init__.py"))
    for package in packages:
        assert f"{package}/__init__.py" in names, f"{package} missing from the wheel"


def test_compile_caches_live_in_the_container_tmp_not_a_mounted_home():
    env = {}
    for keyword, value in instructions():
        if keyword == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(value)))
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert env[name].startswith("/tmp/"), (name, env.get(name))
    assert env["TORCHINDUCTOR_CACHE_DIR"] != env["TRITON_CACHE_DIR"]
