"""Provisioning (``medfed deploy``): certificates, keys, kits, registry, refusals. No Flower processes.

Flower's own loaders are the oracles for the key and config formats, and
``cryptography``'s X.509 path validation checks the certificate chain.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from shared.errors import UserError
from shared.provision import (
    DATA_PATH_PLACEHOLDER,
    ProvisionError,
    add_site,
    init_federation,
    load_registry,
    parse_superlink_address,
    record_node_id,
    revoke_site,
)
from shared.site_identity import (
    RegistryError,
    identify_nodes,
    key_fingerprint,
    load_site_fingerprints,
    reply_node_id,
)
from simulation.cli import main


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _sans(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {*ext.get_values_for_type(x509.DNSName), *(str(ip) for ip in ext.get_values_for_type(x509.IPAddress))}


@pytest.fixture()
def fed(tmp_path: Path):  # noqa: ANN201
    return init_federation(tmp_path / "fed", "fl.hospital.org:8443", ["10.1.2.3"])


# --- certificates -------------------------------------------------------------------------------


def test_superlink_certificate_chains_to_the_ca_for_each_name(fed) -> None:  # noqa: ANN001
    ca = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate((fed.root / "superlink" / "superlink.pem").read_bytes())
    assert _sans(leaf) == {"fl.hospital.org", "10.1.2.3", "127.0.0.1"}
    store = Store([ca])
    for name in (x509.DNSName("fl.hospital.org"),):
        chain = PolicyBuilder().store(store).build_server_verifier(name).verify(leaf, [])
        assert chain[-1] == ca
    import ipaddress

    for ip in ("10.1.2.3", "127.0.0.1"):
        PolicyBuilder().store(store).build_server_verifier(x509.IPAddress(ipaddress.ip_address(ip))).verify(leaf, [])
    # not valid for a name it was not issued for (localhost was not asked for)
    with pytest.raises(VerificationError):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("localhost")).verify(leaf, [])
    # ... nor against another federation's CA
    other = init_federation(fed.root.parent / "other", "fl.hospital.org:8443")
    other_ca = x509.load_pem_x509_certificate(other.ca_cert.read_bytes())
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([other_ca])).build_server_verifier(x509.DNSName("fl.hospital.org")).verify(leaf, [])


def test_localhost_only_when_given_and_ip_hosts(tmp_path: Path) -> None:
    f = init_federation(tmp_path / "a", "192.168.7.9:9000", ["localhost", "lb.internal"])
    leaf = x509.load_pem_x509_certificate((f.root / "superlink" / "superlink.pem").read_bytes())
    assert _sans(leaf) == {"192.168.7.9", "localhost", "lb.internal", "127.0.0.1"}
    f6 = init_federation(tmp_path / "b", "[2001:db8::5]:9000")
    leaf6 = x509.load_pem_x509_certificate((f6.root / "superlink" / "superlink.pem").read_bytes())
    assert _sans(leaf6) == {"2001:db8::5", "127.0.0.1"}
    assert str(f6.superlink) == "[2001:db8::5]:9000"


def test_superlink_tls_files_load_as_a_server(fed) -> None:  # noqa: ANN001
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(fed.root / "superlink" / "superlink.pem", fed.root / "superlink" / "superlink.key")
    ca = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (fed.root / "superlink" / "ca.pem").read_bytes() == fed.ca_cert.read_bytes()


# --- files, modes, scripts ----------------------------------------------------------------------


def test_private_keys_0600_private_folders_0700(fed) -> None:  # noqa: ANN001
    kit = add_site(fed.root, "hospital-a").kit
    for key in (fed.root / "ca" / "ca.key", fed.root / "superlink" / "superlink.key", kit / "node.key"):
        assert _mode(key) == 0o600, key
    for folder in (fed.root, fed.root / "ca", fed.root / "superlink", kit):
        assert _mode(folder) == 0o700, folder
    for public in (fed.ca_cert, kit / "ca.pem", kit / "node.pub"):
        assert b"PRIVATE" not in public.read_bytes()
    assert os.access(kit / "start-supernode.sh", os.X_OK) and os.access(fed.superlink_script, os.X_OK)


def test_node_key_is_what_flower_loads(fed) -> None:  # noqa: ANN001
    from flwr.cli.supernode.register import try_load_public_key

    kit = add_site(fed.root, "hospital-a").kit
    private = serialization.load_ssh_private_key((kit / "node.key").read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    pem = try_load_public_key(kit / "node.pub")  # what 'flwr supernode register' sends, and the SuperLink stores
    entry = load_registry(fed.root)["sites"]["hospital-a"]
    assert key_fingerprint(pem) == entry["fingerprint"] == key_fingerprint((kit / "node.pub").read_text())
    own = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key_fingerprint(own) == entry["fingerprint"]


def test_connection_config_is_tls_for_flower_cli(fed) -> None:  # noqa: ANN001
    from flwr.cli.flower_config import parse_superlink_connection

    data = tomllib.loads((fed.flwr_home / "config.toml").read_text())
    assert data["superlink"]["default"] == fed.name
    conn = parse_superlink_connection(data["superlink"][fed.name], fed.name)
    assert conn.address == "fl.hospital.org:8443" and conn.insecure is False
    assert Path(conn.root_certificates).is_absolute() and Path(conn.root_certificates).read_bytes() == \
        fed.ca_cert.read_bytes()


def test_scripts_are_valid_sh_without_insecure(fed) -> None:  # noqa: ANN001
    kit = add_site(fed.root, "hospital-a").kit
    for script in (fed.superlink_script, kit / "start-supernode.sh"):
        subprocess.run(["sh", "-n", str(script)], check=True)
        assert "--insecure" not in script.read_text()
    link = fed.superlink_script.read_text()
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth", "--database",
                 "--port 8443"):
        assert flag in link
    node = (kit / "start-supernode.sh").read_text()
    for flag in ("--root-certificates", "--auth-supernode-private-key", "--node-config", "fl.hospital.org:8443"):
        assert flag in node


def _fake_flower(tmp_path: Path) -> dict[str, str]:
    """A PATH whose flower-supernode prints its arguments instead of starting."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "flower-supernode"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{bindir}:/usr/bin:/bin"}


def test_site_start_script_guards_then_starts_with_tls_and_key(fed, tmp_path: Path) -> None:  # noqa: ANN001
    kit = add_site(fed.root, "hospital-a").kit
    env = _fake_flower(tmp_path)
    script = str(kit / "start-supernode.sh")
    r = subprocess.run([script], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "data-path" in r.stderr  # the template's placeholder is refused
    cfg = kit / "node-config.toml"
    cfg.write_text(cfg.read_text().replace(DATA_PATH_PLACEHOLDER, str(tmp_path / "images")))
    (kit / "node.key").chmod(0o644)
    r = subprocess.run([script], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "chmod 600" in r.stderr
    (kit / "node.key").chmod(0o600)
    r = subprocess.run([script, "--max-retries", "1"], env={**env, "MEDFED_RUNTIME_PORT": "9321"},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    args = r.stdout.split("\n")
    assert args[args.index("--root-certificates") + 1] == str(kit / "ca.pem")
    assert args[args.index("--auth-supernode-private-key") + 1] == str(kit / "node.key")
    assert args[args.index("--superlink") + 1] == "fl.hospital.org:8443"
    assert args[args.index("--port") + 1] == "9321" and args[-3:-1] == ["--max-retries", "1"]
    assert "--insecure" not in args
    # the node config is one Flower reads and medfed accepts
    from flwr.common.config import parse_config_args

    from shared.config import parse_node_config

    site = parse_node_config(parse_config_args([str(cfg)]))
    assert site.site_id == "hospital-a" and site.data_path == str(tmp_path / "images")


# --- registry -----------------------------------------------------------------------------------


def test_registry_records_names_keys_node_ids_and_revocations(fed) -> None:  # noqa: ANN001
    a = add_site(fed.root, "hospital-a")
    b = add_site(fed.root, "hospital-b")
    reg = load_registry(fed.root)
    assert set(reg["sites"]) == {"hospital-a", "hospital-b"} and reg["revoked"] == []
    assert reg["sites"]["hospital-a"]["fingerprint"] == a.fingerprint != b.fingerprint
    assert reg["sites"]["hospital-a"]["public-key"].startswith("ecdsa-sha2-nistp384 ")
    assert reg["sites"]["hospital-a"]["node-id"] is None
    record_node_id(fed.root, "hospital-a", 1234567890123)
    assert load_registry(fed.root)["sites"]["hospital-a"]["node-id"] == 1234567890123
    assert load_site_fingerprints(fed.registry) == {a.fingerprint: "hospital-a", b.fingerprint: "hospital-b"}

    revoked = revoke_site(fed.root, "hospital-a")
    assert revoked.node_id == 1234567890123 and revoked.fingerprint == a.fingerprint
    assert not a.kit.exists() and revoked.moved_to is not None and (revoked.moved_to / "node.pub").is_file()
    reg = load_registry(fed.root)
    assert set(reg["sites"]) == {"hospital-b"}
    assert [(r["name"], r["fingerprint"], r["node-id"]) for r in reg["revoked"]] == \
        [("hospital-a", a.fingerprint, 1234567890123)]
    assert load_site_fingerprints(fed.registry) == {b.fingerprint: "hospital-b"}
    again = add_site(fed.root, "hospital-a")  # the name can be given to a new kit, with a new key
    assert again.fingerprint != a.fingerprint


def test_site_made_key_keeps_private_key_at_the_site(fed, tmp_path: Path) -> None:  # noqa: ANN001
    key = ec.generate_private_key(ec.SECP256R1())
    pub = tmp_path / "site.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    site = add_site(fed.root, "hospital-c", public_key=pub)
    assert not site.has_private_key and not (site.kit / "node.key").exists()
    assert site.fingerprint == key_fingerprint(pub.read_text())
    assert load_registry(fed.root)["sites"]["hospital-c"]["key-generated-by"] == "site"
    with pytest.raises(ProvisionError, match="already site 'hospital-c'"):
        add_site(fed.root, "hospital-d", public_key=pub)
    priv = tmp_path / "site.key"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    with pytest.raises(ProvisionError, match="PRIVATE key"):
        add_site(fed.root, "hospital-d", public_key=priv)
    ed = tmp_path / "ed.pub"
    ed.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    with pytest.raises(ProvisionError, match="ECDSA"):
        add_site(fed.root, "hospital-d", public_key=ed)
    assert "hospital-d" not in load_registry(fed.root)["sites"] and not (fed.root / "sites" / "hospital-d").exists()


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["fl.hospital.org", "https://fl.hospital.org:8000", "fl.hospital.org:0",
                                  "fl.hospital.org:70000", ":8000", "fl_hospital.org:8000", "2001:db8::1:8000",
                                  "a..b:80", "-bad.org:80", "10.0.0.1:http", ""])
def test_malformed_superlink_address_refused(text: str) -> None:
    with pytest.raises(ProvisionError, match="HOST:PORT"):
        parse_superlink_address(text)


def test_addresses_accepted() -> None:
    assert str(parse_superlink_address("FL.Hospital.org:8000")) == "fl.hospital.org:8000"
    assert str(parse_superlink_address("10.0.0.5:1")) == "10.0.0.5:1"
    assert parse_superlink_address("[::1]:65535").port == 65535


def test_refusals_are_user_errors_with_a_fix(fed, tmp_path: Path) -> None:  # noqa: ANN001
    add_site(fed.root, "hospital-a")
    cases = [
        (lambda: init_federation(fed.root, "x.org:1"), "already holds a federation"),
        (lambda: add_site(fed.root, "hospital-a"), "already exists"),
        (lambda: revoke_site(fed.root, "hospital-z"), "unknown site 'hospital-z'"),
        (lambda: record_node_id(fed.root, "hospital-z", 1), "unknown site"),
        (lambda: add_site(fed.root, "Hospital A"), "lowercase"),
        (lambda: add_site(fed.root, "../x"), "lowercase"),
        (lambda: add_site(tmp_path / "nofed", "hospital-a"), "holds no federation"),
        (lambda: init_federation(tmp_path / "s", "x.org:1", ["not a name"]), "--san"),
    ]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    cases.append((lambda: init_federation(tmp_path / "busy", "x.org:1"), "not an empty folder"))
    for call, msg in cases:
        with pytest.raises(UserError, match=msg):
            call()
    assert not (tmp_path / "s").exists()


def test_identify_nodes_by_authenticated_key(fed) -> None:  # noqa: ANN001
    from flwr.cli.supernode.register import try_load_public_key

    a = add_site(fed.root, "hospital-a")
    b = add_site(fed.root, "hospital-b")
    rogue = init_federation(fed.root.parent / "rogue", "x.org:1")
    r = add_site(rogue.root, "hospital-a")  # same name, other key: a name is no identity
    # what grid.get_nodes() gives a ServerApp: node ids and the PEM keys the SuperLink stored at registration
    keys = {11: try_load_public_key(a.public_key), 22: try_load_public_key(b.public_key),
            33: try_load_public_key(r.public_key), 44: b""}
    ids = identify_nodes(keys, load_site_fingerprints(fed.registry))
    assert ids.sites == {11: "hospital-a", 22: "hospital-b"}
    assert ids.unknown == {33: r.fingerprint, 44: "no key"}
    assert ids.site_of(22) == "hospital-b" and ids.site_of(33) is None
    revoke_site(fed.root, "hospital-b")
    assert identify_nodes(keys, load_site_fingerprints(fed.registry)).site_of(22) is None


def test_reply_node_id_attributes_superlink_made_errors_to_the_lost_node() -> None:
    sent = {"m-a": 11, "m-c": 33}
    assert reply_node_id(11, "m-a", sent) == 11  # the node's own reply
    assert reply_node_id(1, "m-c", sent) == 33  # NODE_UNAVAILABLE made by the SuperLink for the lost node
    assert reply_node_id(22, "m-a", sent) is None  # a source that contradicts the instruction
    assert reply_node_id(11, "m-other-round", sent) is None


def test_registry_errors(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="not found"):
        load_site_fingerprints(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RegistryError, match="not a medfed sites.json"):
        load_site_fingerprints(bad)
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps({"sites": {"a": {"fingerprint": "SHA256:x"}, "b": {"fingerprint": "SHA256:x"}}}))
    with pytest.raises(RegistryError, match="share one key"):
        load_site_fingerprints(dup)
    with pytest.raises(RegistryError, match="public key"):
        key_fingerprint(b"not a key")


# --- the command line ---------------------------------------------------------------------------


def _secrets(root: Path) -> list[str]:
    """Every base64 line of every private key under ``root`` (what must never be printed)."""
    out = []
    for key in [*root.rglob("*.key")]:
        out += [line for line in key.read_text().splitlines() if line and not line.startswith("-----")]
    return out


def test_cli_output_is_safe_and_refusals_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "fed"
    assert main(["deploy", "init", str(root), "--superlink", "fl.hospital.org:8443", "--san", "10.9.9.9"]) == 0
    assert main(["deploy", "add-site", str(root), "hospital-a"]) == 0
    assert main(["deploy", "add-site", str(root), "hospital-b"]) == 0
    assert main(["deploy", "list", str(root)]) == 0
    assert main(["deploy", "revoke-site", str(root), "hospital-b"]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "federation 'fed' created" in text and "site 'hospital-a' added" in text
    assert "flwr supernode register" in text and "node.pub" in text
    secrets = _secrets(root)
    assert len(secrets) >= 4 * 3  # CA, SuperLink and two node keys, several lines each
    assert "PRIVATE KEY" not in text and not any(s in text for s in secrets)
    # every key is also absent when its base64 is re-wrapped (e.g. a single-line dump)
    for key in root.rglob("*.key"):
        body = "".join(key.read_text().splitlines()[1:-1])
        assert body[:40] not in text.replace("\n", "")

    refusals = [
        ["deploy", "init", str(root), "--superlink", "fl.hospital.org:8443"],
        ["deploy", "init", str(tmp_path / "new"), "--superlink", "fl.hospital.org"],
        ["deploy", "add-site", str(root), "hospital-a"],
        ["deploy", "revoke-site", str(root), "hospital-q"],
        ["deploy", "register", str(root), "hospital-q"],
        ["deploy", "add-site", str(tmp_path / "nowhere"), "hospital-a"],
    ]
    for argv in refusals:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("medfed deploy: ") and "Traceback" not in err
    assert not (tmp_path / "new").exists()
