"""Text templates of a federation folder and its site kits (filled by :mod:`shared.provision`).

The start scripts are POSIX ``sh`` and run Flower's own commands with every
security option spelt out, so a hospital's IT team can read what runs. No
``--insecure`` anywhere.
"""

from __future__ import annotations

__all__ = ["FLWR_ENV", "KIT_README", "NODE_CONFIG", "SUPERLINK_SCRIPT", "SUPERNODE_SCRIPT"]


FLWR_ENV = ("export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 "
             "FLWR_DISABLE_UPDATE_CHECK=1")

SUPERLINK_SCRIPT = """#!/bin/sh
# medfed federation '{name}': start the coordinating SuperLink with TLS and SuperNode authentication.
# Only SuperNodes whose public key was registered (medfed deploy add-site --register, or
# 'flwr supernode register') are accepted. Registrations live in state/superlink.db.
# Extra arguments are passed on to flower-superlink (e.g. --log-file superlink.log).
# Bind address: MEDFED_BIND_HOST (default 0.0.0.0, all interfaces).
set -eu
HERE="$(cd "$(dirname "$0")" && pwd)"
{env}
mkdir -p "$HERE/state"
exec flower-superlink \\
    --ssl-ca-certfile "$HERE/ca.pem" \\
    --ssl-certfile "$HERE/superlink.pem" \\
    --ssl-keyfile "$HERE/superlink.key" \\
    --enable-supernode-auth \\
    --database "$HERE/state/superlink.db" \\
    --isolation subprocess \\
    --disable-runtime-dependency-installation \\
    --host "${{MEDFED_BIND_HOST:-0.0.0.0}}" \\
    --port {port} \\
    "$@"
"""

SUPERNODE_SCRIPT = """#!/bin/sh
# medfed site kit '{site}' of federation '{name}': start this hospital's Flower SuperNode.
# TLS: the SuperLink must present a certificate of the federation CA (ca.pem).
# Authentication: every request is signed with node.key; the SuperLink accepts only registered keys.
# Extra arguments are passed on to flower-supernode (e.g. --max-retries 5).
# Runtime API port on this machine: MEDFED_RUNTIME_PORT (default 9094; one per SuperNode).
set -eu
KIT="$(cd "$(dirname "$0")" && pwd)"
if grep -q '{placeholder}' "$KIT/node-config.toml"; then
    echo "medfed: set data-path in $KIT/node-config.toml to this site's image folder or manifest first" >&2
    exit 2
fi
if [ ! -f "$KIT/node.key" ]; then
    echo "medfed: $KIT/node.key (this site's private authentication key) is missing" >&2
    exit 2
fi
if [ -n "$(find "$KIT/node.key" -perm /077)" ]; then
    echo "medfed: $KIT/node.key is readable by others; run: chmod 600 $KIT/node.key" >&2
    exit 2
fi
{env}
exec flower-supernode \\
    --superlink {address} \\
    --root-certificates "$KIT/ca.pem" \\
    --auth-supernode-private-key "$KIT/node.key" \\
    --node-config "$KIT/node-config.toml" \\
    --port "${{MEDFED_RUNTIME_PORT:-9094}}" \\
    "$@"
"""

NODE_CONFIG = """# Node config of site '{site}' (read by start-supernode.sh via --node-config).
# Only the site sets these; the server cannot override them. Unknown keys are refused.
#   data-path  folder of class folders, or a CSV manifest (path,label[,patient_id,...])
#   site-id    this site's name in the federation's reports (no patient data!)
#   cache-dir  decoded, preprocessed image cache ("" = ~/.cache/medfed)
#   state-dir  persistent site state: the DP privacy ledger ("" = ~/.local/state/medfed);
#              back it up, never wipe it: deleting it forgets the privacy already spent
data-path = "{placeholder}"
site-id = "{site}"
cache-dir = "/var/cache/medfed"
state-dir = "/var/lib/medfed"
"""

KIT_README = """# medfed site kit: {site}

This folder lets the hospital '{site}' join the federated-learning federation
'{name}' coordinated at `{address}`. Keep it on the machine that holds the
site's images, readable only by the account that runs medfed (the folder is
mode 0700, `node.key` is 0600).

## What the kit holds

| file | what it is | secret? |
|---|---|---|
| `node.key` | this site's private authentication key (ECDSA P-384, OpenSSH format) | **yes**: never copy it elsewhere, never send it |
| `node.pub` | its public key, registered at the SuperLink (fingerprint `{fingerprint}`) | no |
| `ca.pem` | the federation CA certificate: the SuperLink must present a certificate signed by it | no |
| `node-config.toml` | site-only settings (image folder, site id, cache and state folders) | no (holds a local path) |
| `start-supernode.sh` | starts the Flower SuperNode with TLS and authentication | no |

## Start

1. Install medfed (it brings Flower 1.41) and put its `bin` folder on `PATH`.
2. Set `data-path` in `node-config.toml` to the site's image folder or CSV
   manifest, and check the data: `medfed data check /path/to/images --task pneumonia-cxr`
   (exit code 0 = ready).
3. `./start-supernode.sh` (under systemd or similar, with a restart on failure:
   a SuperNode restarted within about a minute of a crash is refused once and
   succeeds on the next attempt, when the SuperLink has marked it offline).
   Several SuperNodes on one machine need different `MEDFED_RUNTIME_PORT`s.

The script refuses to start while `data-path` is not set or while `node.key`
is readable by other accounts. No `--insecure` anywhere: the connection is
TLS-encrypted, the SuperLink's certificate is checked against `ca.pem`, and
every request is signed with `node.key`.

## What leaves the site

Model weights after local training, training-loss values, evaluation
*counts* (confusion counts, score histograms), the number of images, the
site id and timings. Never images, file paths, file names, patient ids or
DICOM header values. Errors reach the server as an error type only; details
stay in this machine's log.

## Check that the connection is TLS + authenticated

* The SuperNode log shows `SuperNode ID: <number>` after connecting; a
  SuperNode whose key is not registered stops with `Failed to initialize the
  connection to the SuperLink` instead.
* The start command line (`ps -o args -C flower-supernode` or the script)
  holds `--root-certificates` and `--auth-supernode-private-key` and no
  `--insecure`.
* `openssl s_client -connect {address} -CAfile ca.pem </dev/null` ends with
  `Verify return code: 0 (ok)` (the SuperLink presents a certificate of the
  federation CA).
* The coordinator's `flwr supernode list` shows this site's node id as online.

If this kit is lost or the key may have been copied, tell the coordinator:
`medfed deploy revoke-site` makes the SuperLink refuse this key; you then get
a new kit.
"""  # noqa: E501 - a Markdown table row (the `node.key` line) cannot be wrapped
