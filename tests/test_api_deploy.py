"""The deployment files: the compose file's shape, and `docker compose config` where it exists."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_compose_wires_redis_ingest_and_api():
    spec = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = spec["services"]
    assert set(services) == {"redis", "ingest", "api"}
    api, ingest = services["api"], services["ingest"]
    assert api["environment"]["KVRAG_REDIS_URL"].startswith("redis://redis:")
    assert api["depends_on"]["ingest"]["condition"] == "service_completed_successfully"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert ingest["restart"] == "no" and "kvrag ingest" in " ".join(ingest["command"])
    assert any(v.startswith("kvrag-data:/data") for v in api["volumes"])
    assert any(v.startswith("kvrag-data:/data") for v in ingest["volumes"])


def test_dockerfile_runs_kvrag_serve():
    text = (REPO / "Dockerfile").read_text()
    assert 'CMD ["kvrag", "serve"' in text and "HEALTHCHECK" in text and "USER kvrag" in text


def test_docker_compose_config():
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    out = subprocess.run(
        [*cli, "-f", str(REPO / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
