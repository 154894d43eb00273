"""Redis Cluster URLs: `redis+cluster://[user:password@]host:port[,host:port...][/]`.

One URL names the whole cluster, so KVRAG_REDIS_URL stays one setting: the scheme picks the
cluster client (`rediss+cluster://` is TLS), the hosts are its startup nodes (list every
master, so start-up does not depend on one of them being up).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from cache.redis_tier import _redact

SCHEMES = ("redis+cluster", "rediss+cluster")


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SCHEMES


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """`redis+cluster://[user:password@]host:port[,host:port...][/]` -> startup nodes and the
    client options (username, password, ssl); `rediss+cluster://` is TLS."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise ValueError(f"not a cluster URL (want redis+cluster://host:port,...): {_redact(url)}")
    netloc, _, path = rest.partition("/")
    if "?" in netloc or "?" in path or path.strip("/") not in ("", "0"):
        raise ValueError(f"a cluster URL takes no database number or query: {_redact(url)}")
    options: dict[str, Any] = {"ssl": scheme.lower() == "rediss+cluster"}
    userinfo, at, hosts = netloc.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        options["username"] = unquote(user) or None
        options["password"] = unquote(password) if colon else None
    nodes = []
    for part in hosts.split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon:
            host, port = port, "6379"
        host = host.strip("[]")  # [::1]:7000
        if not host or not port.isdigit():
            raise ValueError(f"bad node {part!r} in cluster URL {_redact(url)}")
        nodes.append((host, int(port)))
    return nodes, options
