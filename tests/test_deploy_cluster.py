"""The scale-out compose file: a 3-node Redis Cluster, its one-shot init, ingestion, two API
replicas over a read-only data dir; and `docker compose config` where the plugin exists."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from cache.cluster_url import parse_cluster_url
from tests.conftest import REPO
from tests.test_api_deploy import _compose_cli

COMPOSE = REPO / "docker-compose.cluster.yml"


def test_cluster_compose_wires_three_nodes_init_ingest_and_two_replicas():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert set(services) == {
        "redis-1",
        "redis-2",
        "redis-3",
        "redis-cluster-init",
        "ingest",
        "api-1",
        "api-2",
    }
    for name in ("redis-1", "redis-2", "redis-3"):
        command = " ".join(services[name]["command"])
        assert "--cluster-enabled yes" in command
        assert "--cluster-require-full-coverage no" in command
        assert "--maxmemory-policy allkeys-lru" in command
        assert services[name]["hostname"] == name and services[name]["volumes"] == [f"{name}:/data"]
    init = " ".join(services["redis-cluster-init"]["command"])
    assert "redis-cli --cluster create" in init and "--cluster-yes" in init
    assert all(n in init for n in ("redis-1", "redis-2", "redis-3"))

    ingest = services["ingest"]
    assert "kvrag ingest" in " ".join(ingest["command"]) and ingest["restart"] == "no"
    assert "kvrag-data:/data" in ingest["volumes"]  # the one writer
    ports = set()
    for name in ("api-1", "api-2"):
        api = services[name]
        env = api["environment"]
        nodes, options = parse_cluster_url(env["KVRAG_REDIS_URL"])
        assert nodes == [("redis-1", 6379), ("redis-2", 6379), ("redis-3", 6379)]
        assert not options["ssl"]
        assert env["KVRAG_CACHE_DISK_MB"] == "0"
        assert not env["KVRAG_CACHE_STATS_FILE"].startswith("/data")
        assert api["volumes"] == ["kvrag-data:/data:ro"]  # replicas only read the index
        assert api["depends_on"]["ingest"]["condition"] == "service_completed_successfully"
        init_done = api["depends_on"]["redis-cluster-init"]["condition"]
        assert init_done == "service_completed_successfully"
        ports.add(api["ports"][0].rsplit(":", 1)[0])
    assert len(ports) == 2
    same_tier = services["api-1"]["environment"]["KVRAG_REDIS_URL"]
    assert ingest["environment"]["KVRAG_REDIS_URL"] == same_tier


def test_cluster_compose_config():
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    out = subprocess.run(
        [*cli, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
