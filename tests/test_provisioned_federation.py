"""A provisioned federation on localhost: TLS + SuperNode authentication, real Flower processes.

One SuperLink (started by the federation's own ``start-superlink.sh``) serves
every case of this module:

* two site kits (``start-supernode.sh``) train 2 rounds of medfed;
* refused: an unregistered key, a SuperNode trusting another CA, a plaintext
  (``--insecure``) SuperNode, a kit downgraded with ``--insecure``, a revoked
  site (kicked out while connected, refused on restart), and an app bundle
  at a SuperNode that pins app signers (``--trusted-entities``);
* what a ServerApp observes about nodes (node ids, registered public keys,
  names), mapped to sites by :func:`shared.site_identity.identify_nodes`;
* a site killed mid-round: the round ends with the other two, the run goes
  on, the restarted site rejoins and trains.

Every process is started in its own session and stopped by PID; the
teardown fails if any Flower process of this module is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from shared.data.phantoms import CHEST_CLASSES, make_chest_phantoms
from shared.provision import DATA_PATH_PLACEHOLDER, Federation, init_federation, load_federation, load_registry
from shared.results import RunFolder
from shared.site_identity import identify_nodes, key_fingerprint, load_site_fingerprints
from simulation.cli import main
from simulation.deploy_admin import list_nodes
from simulation.runner import app_dir, flower_env, free_port, stop_process_group, to_run_config_arg, wait_healthy

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
PROBE_APP = Path(__file__).resolve().parent / "flower_probe_app"
DATA_SITES = ("site-a", "site-b", "site-c")
ALL_SITES = (*DATA_SITES, "site-r", "site-w", "site-p")  # r: revoked, w: trusts a wrong CA, p: pins app signers


def write_site(root: Path, seed: int, n: int = 80) -> None:
    """A class-folder dataset of ``n`` 64-px phantom PNGs (about n/2 per class)."""
    images, labels = make_chest_phantoms(n, size=64, seed=seed)
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        folder = root / CHEST_CLASSES[int(lab)].upper()
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"img_{i:04d}.png"), img)


@dataclass
class Harness:
    """The federation folder, its running processes and their logs."""

    tmp: Path
    fed: Federation
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: list[int] = field(default_factory=list)

    @property
    def logs(self) -> Path:
        return self.tmp / "logs"

    def start(self, name: str, cmd: list[str], **env: str) -> subprocess.Popen[bytes]:
        out = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(cmd, env={**self.env, **env}, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True, cwd=self.tmp)
        out.close()
        self.procs[f"{name}#{p.pid}"] = p
        return p

    def port(self) -> int:
        """A free port, remembered for the leftover-process check."""
        port = free_port()
        self.ports.append(port)
        return port

    def start_kit(self, site: str, *extra: str, kit: Path | None = None, log: str | None = None
                  ) -> subprocess.Popen[bytes]:
        script = (kit or self.fed.kit(site)) / "start-supernode.sh"
        return self.start(log or site, ["sh", str(script), *extra], MEDFED_RUNTIME_PORT=str(self.port()))

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def node_id(self, site: str) -> int:
        return int(load_registry(self.fed.root)["sites"][site]["node-id"])

    def status(self) -> dict[int, str]:
        return {n.node_id: n.status for n in list_nodes(self.fed)}

    def wait(self, what: str, predicate: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(1.0)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; logs in {self.logs}")

    def wait_online(self, site: str, proc: subprocess.Popen[bytes], timeout: float = 180.0) -> None:
        nid = self.node_id(site)

        def online() -> bool:
            assert proc.poll() is None, f"{site} exited with {proc.returncode}:\n{self.log(site)[-3000:]}"
            return self.status().get(nid) == "online"

        self.wait(f"{site} online", online, timeout)

    def flwr_run(self, app: Path, run_config: dict[str, Any], name: str) -> subprocess.Popen[bytes]:
        # These tests are about who may join and what survives a lost site; the post-training phases
        # (calibration, OOD statistics: a ClientApp start per message at each site) are covered by
        # tests/test_deployment.py and the simulation tests, so they are off here unless a test asks.
        if Path(app).resolve() == Path(app_dir()).resolve():  # medfed's app (not the probe app)
            run_config = {"calibration": "none", "ood-stats": False, **run_config}
        cmd = [str(BIN / "flwr"), "run", str(app), self.fed.name, "--stream", "--run-config",
               to_run_config_arg(run_config)]
        return self.start(name, cmd)

    def stop_all(self) -> list[str]:
        """Stop every process group started here; return (and kill) Flower processes still left after 30 s.

        Flower detaches the SuperLink's SuperExec into its own session; it exits by itself once it
        sees its parent gone, which can take a while on a loaded machine.
        """
        for p in self.procs.values():
            stop_process_group(p)
        markers = [str(self.tmp), *(f":{p} " for p in self.ports)]
        deadline = time.monotonic() + 30.0
        while (left := leftover_processes(markers)) and time.monotonic() < deadline:
            time.sleep(1.0)
        for line in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split(":")[0]), signal.SIGKILL)
        return left


def leftover_processes(markers: list[str]) -> list[str]:
    """Command lines of running processes that mention any of ``markers`` (this module's Flower processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(m in cmd for m in markers) and ("flwr" in cmd or "flower" in cmd):
            found.append(f"{entry.name}: {cmd}")
    return found


def _run_until_done(h: Harness, proc: subprocess.Popen[bytes], name: str, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_group(proc)
        raise AssertionError(f"{name} did not finish within {timeout:.0f} s:\n{h.log(name)[-4000:]}") from None
    return h.log(name)


@pytest.fixture(scope="module")
def h(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """``medfed deploy init`` + ``add-site`` x6, the SuperLink, ``deploy register``, sites a and b online."""
    tmp = tmp_path_factory.mktemp("provisioned")
    (tmp / "logs").mkdir()
    port = free_port()
    root = tmp / "federation"
    assert main(["deploy", "init", str(root), "--superlink", f"127.0.0.1:{port}"]) == 0
    for site in ALL_SITES:
        assert main(["deploy", "add-site", str(root), site]) == 0
    fed = load_federation(root)
    for i, site in enumerate(ALL_SITES):
        data = tmp / "data" / (site if site in DATA_SITES else "site-a")
        if site in DATA_SITES:
            write_site(data, seed=11 + i)
        cfg = fed.kit(site) / "node-config.toml"
        cfg.write_text(cfg.read_text().replace(DATA_PATH_PLACEHOLDER, str(data))
                       .replace("/var/cache/medfed", str(tmp / "cache" / site))
                       .replace("/var/lib/medfed", str(tmp / "state" / site)))
    harness = Harness(tmp=tmp, fed=fed, env=flower_env(fed.flwr_home), ports=[port])
    try:
        link = harness.start("superlink", ["sh", str(fed.superlink_script)])
        wait_healthy(port, link, harness.logs / "superlink.log", timeout=180.0, ca_file=fed.ca_cert)
        assert main(["deploy", "register", str(root)]) == 0
        assert all(e["node-id"] is not None for e in load_registry(root)["sites"].values())
        for site in ("site-a", "site-b"):
            harness.wait_online(site, harness.start_kit(site))
        yield harness
    finally:
        left = harness.stop_all()
        assert not left, f"Flower processes left running: {left}"


# --- what a ServerApp sees; an app refused by a SuperNode that pins app signers ----------------------


@pytest.fixture(scope="module")
def probe(h: Harness) -> dict[str, Any]:
    """The probe app run once with sites a, b and p (p starts with ``--trusted-entities``)."""
    signer = ed25519.Ed25519PrivateKey.generate().public_key()
    line = signer.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    trusted = h.tmp / "trusted-entities.yaml"
    trusted.write_text(f'fpk_medfed_federation: "{line}"\n')
    pinned = h.start_kit("site-p", "--trusted-entities", str(trusted))
    h.wait_online("site-p", pinned)
    out = h.tmp / "probe.json"
    run = h.flwr_run(PROBE_APP, {"out": str(out), "timeout": 120.0}, "probe-run")
    output = _run_until_done(h, run, "probe-run", 400)
    stop_process_group(pinned)
    assert out.is_file(), output[-4000:]
    return json.loads(out.read_text())


def test_serverapp_sees_authenticated_keys_and_maps_them_to_sites(h: Harness, probe: dict[str, Any]) -> None:
    nodes = {int(k): v for k, v in probe["nodes"].items()}
    expected = {h.node_id(s): s for s in ("site-a", "site-b", "site-p")}
    assert set(nodes) == set(expected)  # the online, registered nodes, nothing else
    ids = identify_nodes({nid: v["public-key"].encode() for nid, v in nodes.items()},
                         load_site_fingerprints(h.fed.registry))
    assert ids.sites == expected and ids.unknown == {}
    # the name given at 'flwr supernode register --name' reaches the ServerApp too
    assert {nid: v["name"] for nid, v in nodes.items()} == expected
    for nid, v in nodes.items():
        assert key_fingerprint(v["public-key"]) == load_registry(h.fed.root)["sites"][expected[nid]]["fingerprint"]
    # site-ids in replies are claims from the node config; here they agree with the authenticated identity
    replies = {int(k): v for k, v in probe["replies"].items()}
    for site in ("site-a", "site-b"):
        assert replies[h.node_id(site)] == {"site-id": site}


def test_supernode_pinning_app_signers_refuses_an_unsigned_app(h: Harness, probe: dict[str, Any]) -> None:
    """Flower 1.41: a SuperNode with --trusted-entities refuses a FAB submitted with 'flwr run' (never signed).

    The FAB never reaches a ClientApp there: the node replies INVALID_FAB (7) and logs why.
    """
    reply = probe["replies"][str(h.node_id("site-p"))]
    assert reply["error-code"] == 7, reply
    log = h.log("site-p")
    assert "The FAB could not be verified" in log
    assert "Starting Flower SuperExec" in log and "Receiving: query message" in log
    assert "site-id" not in json.dumps(reply)


# --- refused SuperNodes, while a real run goes on ----------------------------------------------------


@pytest.fixture(scope="module")
def refusals(h: Harness, probe: dict[str, Any]) -> dict[str, subprocess.Popen[bytes]]:
    """Start every SuperNode that must be refused (the revoked one after revoking it live)."""
    revoked = h.start_kit("site-r")
    h.wait_online("site-r", revoked)
    revoked_id = h.node_id("site-r")
    assert main(["deploy", "revoke-site", str(h.fed.root), "site-r", "--unregister"]) == 0
    try:
        revoked.wait(timeout=120)  # a connected SuperNode is shut out once its key is unregistered
    except subprocess.TimeoutExpired:
        raise AssertionError(f"revoked site-r still runs:\n{h.log('site-r')[-3000:]}") from None
    assert h.status()[revoked_id] == "unregistered"
    moved = sorted((h.fed.root / "revoked").glob("site-r-*"))
    assert len(moved) == 1

    other = init_federation(h.tmp / "other-federation", str(h.fed.superlink))
    assert main(["deploy", "add-site", str(other.root), "intruder"]) == 0
    (h.fed.kit("site-w") / "ca.pem").write_bytes(other.ca_cert.read_bytes())  # site-w trusts another CA
    retry = ["--max-retries", "1000", "--max-wait-time", "40"]
    supernode = str(BIN / "flower-supernode")
    node_cfg = str(h.fed.kit("site-a") / "node-config.toml")
    started = {
        "unregistered": h.start("unregistered", [
            supernode, "--superlink", str(h.fed.superlink), "--root-certificates", str(h.fed.ca_cert),
            "--auth-supernode-private-key", str(other.kit("intruder") / "node.key"),
            "--node-config", node_cfg, "--port", str(h.port()), *retry]),
        "wrong-ca": h.start_kit("site-w", *retry, log="wrong-ca"),
        "plaintext": h.start("plaintext", [
            supernode, "--insecure", "--superlink", str(h.fed.superlink), "--node-config", node_cfg,
            "--port", str(h.port()), *retry]),
        "kit-downgraded": h.start_kit("site-c", "--insecure", *retry, log="kit-downgraded"),
        "revoked-restart": h.start_kit("site-r", *retry, kit=moved[0], log="revoked-restart"),
    }
    return started


@pytest.fixture(scope="module")
def first_run(h: Harness, refusals: dict[str, subprocess.Popen[bytes]]) -> tuple[Path, str]:
    """2 rounds of medfed with the two kits, started while the refused SuperNodes keep trying.

    The run is given the federation's ``sites.json`` (``site-registry``): the server names each
    node by the site its authenticated key is registered to.
    """
    results = h.tmp / "results"
    run = h.flwr_run(app_dir(), {
        "num-server-rounds": 2, "results-dir": str(results), "run-name": "provisioned",
        "model": "small-cnn", "image-size": 64, "min-sites": 2, "round-timeout": 300.0,
        "site-registry": str(h.fed.registry),
    }, "first-run")
    output = _run_until_done(h, run, "first-run", 900)
    for name, p in refusals.items():
        try:
            p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"refused SuperNode '{name}' still runs:\n{h.log(name)[-3000:]}") from None
    return results / "provisioned", output


def test_two_site_kits_train_two_rounds_over_tls_with_authentication(h: Harness, first_run: tuple[Path, str]) -> None:
    run_dir, output = first_run
    assert (run_dir / "summary.json").is_file(), output[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for r in metrics["rounds"]:
        # only the two kits took part: nothing refused below reached the run
        assert set(r["train-sites"]) == set(r["evaluate-sites"]) == {"site-a", "site-b"}
        assert r["train-failures"] == 0 and r["evaluate-failures"] == 0
    assert 0.0 <= metrics["rounds"][-1]["evaluate"]["auroc"] <= 1.0
    assert (run_dir / "model.pt").is_file() and "[round 2/2]" in output
    # identity from the authenticated keys: the server ran with the registry, and its roll call named
    # each node by the site its key is registered to (kits declare the same names: no mismatch warning)
    assert RunFolder.open(run_dir).run_config()["site-registry"] == str(h.fed.registry)
    for site in ("site-a", "site-b"):
        assert f"[medfed] site: {site}: 64 training and 16 validation images" in output, output[-4000:]
    assert "declares itself" not in output and "registry does not know" not in output
    # the running processes (the start scripts exec Flower) hold exactly the secure options
    running = {name.split("#")[0]: p for name, p in h.procs.items() if p.poll() is None}
    link = _cmdline(running["superlink"])
    assert "flower-superlink" in link[1] and "--insecure" not in link
    assert {"--enable-supernode-auth", "--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile"} <= set(link)
    for site in ("site-a", "site-b"):
        args = _cmdline(running[site])
        assert "flower-supernode" in args[1] and "--insecure" not in args
        assert args[args.index("--root-certificates") + 1] == str(h.fed.kit(site) / "ca.pem")
        assert args[args.index("--auth-supernode-private-key") + 1] == str(h.fed.kit(site) / "node.key")
    assert "Uvicorn running on https://" in h.log("superlink")
    for site in ("site-a", "site-b"):
        assert f"SuperNode ID: {h.node_id(site)}" in h.log(site)


def _cmdline(p: subprocess.Popen[bytes]) -> list[str]:
    return Path(f"/proc/{p.pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def _refused(h: Harness, refusals: dict[str, subprocess.Popen[bytes]], name: str) -> str:
    p = refusals[name]
    assert p.returncode not in (None, 0), f"{name} exited with {p.returncode}:\n{h.log(name)[-3000:]}"
    log = h.log(name)
    assert "SuperNode ID:" not in log.split("Starting Flower SuperNode")[-1], log[-3000:]
    return log


def test_unregistered_key_is_refused(h: Harness, refusals: dict, first_run: tuple) -> None:  # type: ignore[type-arg]
    log = _refused(h, refusals, "unregistered")
    assert "Failed to activate SuperNode" in log
    intruder = key_fingerprint((h.tmp / "other-federation" / "sites" / "intruder" / "node.pub").read_text())
    assert intruder not in {n.fingerprint for n in list_nodes(h.fed)}  # the SuperLink never took it in


def test_supernode_trusting_another_ca_is_refused(h: Harness, refusals: dict, first_run: tuple) -> None:  # type: ignore[type-arg]
    log = _refused(h, refusals, "wrong-ca")
    assert "CERTIFICATE_VERIFY_FAILED" in log or "certificate verify failed" in log, log[-3000:]
    assert h.status()[h.node_id("site-w")] == "registered"  # its key is registered, yet it never came online


def test_plaintext_supernodes_are_refused(h: Harness, refusals: dict, first_run: tuple) -> None:  # type: ignore[type-arg]
    _refused(h, refusals, "plaintext")
    assert "Starting insecure channel" in h.log("plaintext")
    # a kit cannot be downgraded: Flower refuses --insecure next to the kit's TLS and key options
    log = _refused(h, refusals, "kit-downgraded")
    assert "Conflicting options" in log or "requires a secure TLS connection" in log, log[-2000:]
    online = {nid for nid, s in h.status().items() if s == "online"}
    assert online == {h.node_id("site-a"), h.node_id("site-b")}


def test_revoked_site_is_refused_on_restart(h: Harness, refusals: dict, first_run: tuple) -> None:  # type: ignore[type-arg]
    log = _refused(h, refusals, "revoked-restart")
    assert "Failed to activate SuperNode" in log
    reg = load_registry(h.fed.root)
    assert "site-r" not in reg["sites"] and [r["name"] for r in reg["revoked"]] == ["site-r"]
    assert "site-r" not in load_site_fingerprints(h.fed.registry).values()


# --- a site lost mid-round, and back --------------------------------------------------------------


def test_site_killed_mid_round_run_goes_on_and_restarted_site_rejoins(
    h: Harness, first_run: tuple[Path, str]
) -> None:
    """3 kits; site-c is SIGKILLed during round 1 training, restarted once the SuperLink marks it offline.

    Both runs use the federation's ``site-registry``. Flower 1.41 marks a silent SuperNode offline
    2 x 30 s after its last heartbeat; its pending messages then get NODE_UNAVAILABLE replies (made by
    the SuperLink: ``src_node_id`` 1), so the round ends before ``round-timeout`` and the failure is
    recorded under site-c.
    A SuperNode restarted while the SuperLink still counts it online is refused
    ("Failed to activate SuperNode"): the test restarts it once it is offline.
    """
    c = h.start_kit("site-c")
    h.wait_online("site-c", c)
    c_id = h.node_id("site-c")
    timeout = 240.0
    results = h.tmp / "results"
    marker = "Receiving: train message"
    before = h.log("site-c").count(marker)
    run = h.flwr_run(app_dir(), {
        "num-server-rounds": 3, "results-dir": str(results), "run-name": "lost-site",
        "model": "small-cnn", "image-size": 64, "min-sites": 2, "round-timeout": timeout,
        "site-registry": str(h.fed.registry),
    }, "lost-site-run")
    h.wait("site-c to receive round 1 training", lambda: h.log("site-c").count(marker) > before, 300)
    os.killpg(c.pid, signal.SIGKILL)  # the SuperNode, its SuperExec and the training ClientApp
    c.wait(timeout=10)
    killed_log = h.log("site-c")
    h.wait("the SuperLink to mark site-c offline", lambda: h.status().get(c_id) == "offline", 150)
    # The SuperLink answers for an offline node (NODE_UNAVAILABLE) only when the server pulls while the node
    # is offline (every 3 s); a node back online before that leaves its instruction unanswered, and the round
    # waits for round-timeout (recorded as train-no-reply; tests/test_round_loop.py covers both). Stay offline
    # for several pulls, so this test sees the SuperLink's answer.
    time.sleep(20)
    back = h.start_kit("site-c")
    h.wait_online("site-c", back)
    output = _run_until_done(h, run, "lost-site-run", 1200)
    run_dir = results / "lost-site"
    assert (run_dir / "summary.json").is_file(), output[-4000:]
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    first = rounds[0]
    assert set(first["train-sites"]) == {"site-a", "site-b"} and first["train-failures"] == 1, first
    assert "train-no-reply" not in first, first
    # the SuperLink's NODE_UNAVAILABLE reply (src_node_id 1) is mapped back to site-c by its instruction
    assert "round 1 train: site-c failed" in output and "node-1 failed" not in output, output[-4000:]
    assert first["train-phase-s"] < timeout  # ended by Flower's offline detection, not by the timeout
    assert set(first["evaluate-sites"]) >= {"site-a", "site-b"}
    rejoined = [i for i, r in enumerate(rounds) if i > 0 and "site-c" in r["train-sites"]]
    assert rejoined, [sorted(r["train-sites"]) for r in rounds]
    for r in rounds[rejoined[0]:]:  # from its return on, site-c trains and evaluates in every round
        assert set(r["train-sites"]) == set(r["evaluate-sites"]) == {"site-a", "site-b", "site-c"}
        assert r["train-failures"] == 0
    assert f"SuperNode ID: {c_id}" in h.log("site-c").split("Starting Flower SuperNode")[-1]  # same identity
    # one roll call per node: the restarted SuperNode keeps its node id and its site, and is not asked again
    assert output.count("[medfed] site: site-c:") == 1
    assert "Receiving: query message" not in h.log("site-c")[len(killed_log):]
