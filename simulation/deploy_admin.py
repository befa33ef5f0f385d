"""Talk to a running federation's SuperLink: register, unregister and list SuperNodes.

Registration and unregistration run Flower's own CLI (``flwr supernode
register`` / ``unregister``) with the federation's ``admin/`` folder as
``FLWR_HOME``, i.e. exactly the command ``medfed deploy`` prints when it
cannot reach the SuperLink. Listing uses Flower's Control API client
directly, because ``flwr supernode list`` does not show public keys and the
registry matches nodes by key.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.provision import Federation
from shared.site_identity import key_fingerprint
from simulation.runner import flower_env

__all__ = ["FlowerAdminError", "RegisteredNode", "list_nodes", "register_command", "register_site",
           "unregister_command", "unregister_node"]

logger = logging.getLogger(__name__)
TIMEOUT_S = 120.0


class FlowerAdminError(RuntimeError):
    """The SuperLink could not be reached or refused the request."""


def _flwr() -> str:
    local = Path(sys.executable).parent / "flwr"
    return str(local) if local.exists() else (shutil.which("flwr") or "flwr")


def register_command(fed: Federation, site: str) -> list[str]:
    """The ``flwr supernode register`` command for ``site`` (run with ``FLWR_HOME=<fed>/admin``)."""
    return ["flwr", "supernode", "register", str(fed.kit(site) / "node.pub"), fed.name, "--name", site,
            "--format", "json"]


def unregister_command(fed: Federation, node_id: int) -> list[str]:
    """The ``flwr supernode unregister`` command for ``node_id`` (run with ``FLWR_HOME=<fed>/admin``)."""
    return ["flwr", "supernode", "unregister", str(node_id), fed.name, "--format", "json"]


def shell_line(fed: Federation, cmd: list[str]) -> str:
    """``cmd`` as one shell line with the federation's ``FLWR_HOME``."""
    return f"FLWR_HOME={shlex.quote(str(fed.flwr_home))} " + " ".join(shlex.quote(c) for c in cmd)


def _run_flwr(fed: Federation, cmd: list[str]) -> dict[str, Any]:
    argv = [_flwr(), *cmd[1:]]
    try:
        proc = subprocess.run(argv, env=flower_env(fed.flwr_home), capture_output=True, text=True,
                              timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise FlowerAdminError(f"'{' '.join(cmd[:3])}' got no answer from the SuperLink at {fed.superlink} "
                               f"within {TIMEOUT_S:.0f} s: is it running?") from exc
    payload: dict[str, Any] = {}
    start = proc.stdout.find("{")
    if start >= 0:
        try:
            payload, _ = json.JSONDecoder().raw_decode(proc.stdout[start:])
        except ValueError:
            payload = {}
    if proc.returncode != 0 or not payload.get("success"):
        detail = payload.get("error-message") or (proc.stderr.strip() or proc.stdout.strip())[-600:]
        detail = " ".join((detail or "no output").split())
        raise FlowerAdminError(f"'{' '.join(cmd[:3])}' failed against the SuperLink at {fed.superlink}: {detail}")
    return payload


def register_site(fed: Federation, site: str) -> int:
    """Register ``site``'s public key at the SuperLink; return the node id it was given.

    Raises
    ------
    FlowerAdminError
        When the SuperLink is unreachable or refuses (e.g. the key is registered already).
    """
    payload = _run_flwr(fed, register_command(fed, site))
    node_id = int(payload["node-id"])
    logger.info("site %s registered as node %d", site, node_id)
    return node_id


def unregister_node(fed: Federation, node_id: int) -> None:
    """Unregister ``node_id`` at the SuperLink: its key is refused from then on.

    Raises
    ------
    FlowerAdminError
        When the SuperLink is unreachable or does not know the node.
    """
    _run_flwr(fed, unregister_command(fed, node_id))
    logger.info("node %d unregistered", node_id)


@dataclass(frozen=True)
class RegisteredNode:
    """One SuperNode the SuperLink knows."""

    node_id: int
    status: str
    fingerprint: str
    name: str


def list_nodes(fed: Federation) -> list[RegisteredNode]:
    """Every SuperNode the SuperLink knows, with its key fingerprint and status.

    Uses Flower's Control API over TLS with the federation CA (the same
    connection ``flwr supernode list`` makes).

    Raises
    ------
    FlowerAdminError
        When the SuperLink cannot be reached.
    """
    from flwr.proto.control_pb2 import ListNodesRequest  # noqa: PLC0415 - Flower only where needed
    from flwr.supercore.control import ControlHttpClient  # noqa: PLC0415
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor  # noqa: PLC0415

    try:
        client = ControlHttpClient.from_server_address(
            str(fed.superlink), False, fed.ca_cert.read_bytes(),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="medfed deploy")],
        )
        try:
            res = client.ListNodes(ListNodesRequest())
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 - httpx/TLS errors of many kinds: one message
        raise FlowerAdminError(f"could not list the SuperLink's nodes at {fed.superlink}: "
                               f"{type(exc).__name__}: {exc}") from exc
    out = []
    for n in res.nodes_info:
        fp = key_fingerprint(n.public_key) if n.public_key else "no key"
        out.append(RegisteredNode(node_id=int(n.node_id), status=str(n.status), fingerprint=fp,
                                  name=n.name if n.HasField("name") else ""))
    return out
