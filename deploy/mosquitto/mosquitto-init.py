"""Prepare the broker's security volume before the broker starts.

Run by docker-compose's mosquitto-init service (the cityhub image, as root)
with the volume mounted where the broker sees it (/mosquitto/security):

- the dynamic-security file with the cityhub-admin account and the service
  accounts. An existing file keeps every account `cityhub gateways` and
  `cityhub devices` added; only the admin account (its password read from the
  file named by MQTT_ADMIN_PASSWORD_FILE) and the service accounts are made
  current, as the embedded broker does. MQTT_SERVICE_ACCOUNTS lists the
  service accounts as space-separated USERNAME=PASSWORD_FILE pairs, USERNAME
  being {kind}.{instance} (devices.dynsec.service_account: ingest, sim,
  monitor), e.g. "ingest.compose=/run/secrets/mqtt_ingest_password
  sim.compose=/run/secrets/mqtt_sim_password". A missing or empty password
  file, or a malformed pair, stops it with a message naming it;
- the plain listener on the broker's address on the compose stack's
  `internal` network (MQTT_INTERNAL_ADDRESS, compose gives the broker a fixed
  one; MQTT_PORT, 1883): conf.d/plain.conf. mosquitto.conf itself listens on
  the container's loopback only, so 1883 is open on no other network (not on
  `edge`, where the published ports are). Without MQTT_INTERNAL_ADDRESS the
  plain listener stays on loopback;
- the TLS listener: when the PKI directory (CITYHUB_PKI_DIR, /pki: compose
  mounts the secrets ca.crt, mqtt_server.crt and mqtt_server.key there as
  ca.crt, server.crt and server.key) holds all three, they are copied into
  the volume and conf.d/tls.conf opens port MQTT_TLS_PORT (8883) requiring a
  client certificate from that CA, TLS 1.2 (ECDHE with AEAD ciphers only) or
  TLS 1.3 (cityhub.localstack.mosquitto's TLS settings); without them conf.d/
  is left empty and the broker has only its plain listener. The CA's revocation list (crl.pem, from
  `cityhub pki revoke` / `cityhub pki crl`; MQTT_CRL_FILE names it, default
  crl.pem in the PKI directory: compose points it into the provisioning
  containers' PKI volume, where those commands write it) is copied too when
  present and named by `crlfile`: a revoked client certificate is refused. After a revoke,
  run this again and send the broker SIGHUP (Mosquitto 2.0 re-reads the CRL
  on SIGHUP; no restart).

Everything written belongs to the broker's uid (MOSQUITTO_UID, 1883 in the
eclipse-mosquitto image), secrets with mode 0600, whoever owns the sources.
"""

import json
import os
import shutil
import sys
from pathlib import Path

from cityhub.localstack.mosquitto import ADMIN_USER, TLS12_CIPHERS, TLS_MIN_VERSION
from contracts.errors import HubError
from devices.dynsec import Account, base_document, service_account

PKI_FILES = ("ca.crt", "server.crt", "server.key")
CRL_FILE = "crl.pem"

path = Path(sys.argv[1] if len(sys.argv) > 1 else "/mosquitto/security/dynamic-security.json")
security = path.parent
pki = Path(os.environ.get("CITYHUB_PKI_DIR", "/pki"))
crl = Path(os.environ.get("MQTT_CRL_FILE") or pki / CRL_FILE)
tls_port = int(os.environ.get("MQTT_TLS_PORT", "8883"))
plain_port = int(os.environ.get("MQTT_PORT", "1883"))
internal_address = os.environ.get("MQTT_INTERNAL_ADDRESS", "")
uid = int(os.environ.get("MOSQUITTO_UID", "1883"))
gid = int(os.environ.get("MOSQUITTO_GID", str(uid)))


def owned(target: Path, mode: int) -> None:
    target.chmod(mode)
    if os.geteuid() == 0:
        os.chown(target, uid, gid)


def write(target: Path, text: str, mode: int = 0o600) -> None:
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    owned(tmp, mode)
    tmp.replace(target)


# Shorter passwords are refused: the secrets script writes 32 random bytes.
MIN_PASSWORD_CHARS = 16


def read_secret(what: str, name: str) -> str:
    """A password file's text without its trailing newline; exit naming it if unusable."""
    if not name:
        sys.exit(f"mosquitto-init: {what}: no password file named")
    try:
        secret = Path(name).read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
    except (OSError, UnicodeDecodeError) as exc:
        sys.exit(f"mosquitto-init: {what}: cannot read {name} ({exc})")
    if len(secret) < MIN_PASSWORD_CHARS:
        shorter = f"shorter than {MIN_PASSWORD_CHARS} characters"
        sys.exit(f"mosquitto-init: {what}: {name} is empty or {shorter}")
    return secret


def service_accounts(spec: str) -> list[tuple[Account, str]]:
    """MQTT_SERVICE_ACCOUNTS's USERNAME=PASSWORD_FILE pairs as accounts and passwords."""
    accounts: list[tuple[Account, str]] = []
    seen: set[str] = set()
    for pair in spec.split():
        username, sep, name = pair.partition("=")
        kind, dot, instance = username.partition(".")
        if not sep or not dot or not name:
            sys.exit(
                f"mosquitto-init: MQTT_SERVICE_ACCOUNTS: {pair!r} is not USERNAME=PASSWORD_FILE"
                " with USERNAME {kind}.{instance}"
            )
        if username in seen:
            sys.exit(f"mosquitto-init: MQTT_SERVICE_ACCOUNTS: {username} is listed twice")
        seen.add(username)
        try:
            account = service_account(kind, instance)
        except HubError as exc:
            sys.exit(f"mosquitto-init: MQTT_SERVICE_ACCOUNTS: {pair!r}: {exc}")
        accounts.append((account, read_secret(username, name)))
    return accounts


password = read_secret("MQTT_ADMIN_PASSWORD_FILE", os.environ.get("MQTT_ADMIN_PASSWORD_FILE", ""))
services = service_accounts(os.environ.get("MQTT_SERVICE_ACCOUNTS", ""))
existing = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
document = base_document(
    existing,
    admin_username=ADMIN_USER,
    admin_password=password,
    dev_mode=False,
    services=services,
)
write(path, json.dumps(document, indent=1))
names = ", ".join(account.username for account, _ in services) or "none"
sys.stdout.write(
    f"mosquitto-init: {path} ready ({len(document.get('clients', []))} accounts;"
    f" service accounts: {names})\n"
)

conf_d = security / "conf.d"
conf_d.mkdir(exist_ok=True)
owned(conf_d, 0o755)
plain_conf = conf_d / "plain.conf"
if internal_address:
    write(
        plain_conf,
        "# written by mosquitto-init: plain MQTT on the compose stack's internal network only\n"
        f"listener {plain_port} {internal_address}\n",
        mode=0o644,
    )
    sys.stdout.write(f"mosquitto-init: plain MQTT on {internal_address}:{plain_port}\n")
else:
    plain_conf.unlink(missing_ok=True)
    sys.stdout.write("mosquitto-init: no MQTT_INTERNAL_ADDRESS: plain MQTT on loopback only\n")
tls_conf = conf_d / "tls.conf"
present = [name for name in PKI_FILES if (pki / name).is_file()]
if len(present) == len(PKI_FILES):
    tls_dir = security / "tls"
    tls_dir.mkdir(exist_ok=True)
    owned(tls_dir, 0o700)
    for name in PKI_FILES:
        shutil.copyfile(pki / name, tls_dir / name)
        owned(tls_dir / name, 0o600)
    crl_line = ""
    if crl.is_file():
        shutil.copyfile(crl, tls_dir / CRL_FILE)
        owned(tls_dir / CRL_FILE, 0o600)
        crl_line = f"crlfile {tls_dir / CRL_FILE}\n"
    else:
        (tls_dir / CRL_FILE).unlink(missing_ok=True)
        sys.stdout.write(f"mosquitto-init: no {crl}: client certificates are not revocable\n")
    write(
        tls_conf,
        "# written by mosquitto-init from the PKI directory; remove those files to turn TLS off\n"
        f"listener {tls_port}\n"
        f"cafile {tls_dir / 'ca.crt'}\n"
        f"certfile {tls_dir / 'server.crt'}\n"
        f"keyfile {tls_dir / 'server.key'}\n"
        "require_certificate true\n"
        # TLS 1.2 or 1.3; for 1.2 ECDHE with AEAD ciphers only (the embedded broker's).
        f"tls_version {TLS_MIN_VERSION}\n"
        f"ciphers {TLS12_CIPHERS}\n"
        f"{crl_line}",
        mode=0o644,
    )
    sys.stdout.write(f"mosquitto-init: TLS listener on {tls_port} (client certificates required)\n")
else:
    tls_conf.unlink(missing_ok=True)
    if present:
        sys.exit(
            f"mosquitto-init: {pki} holds {', '.join(present)} but TLS needs all of "
            f"{', '.join(PKI_FILES)} (cityhub pki init)"
        )
    sys.stdout.write("mosquitto-init: no certificates in the PKI directory: plain MQTT only\n")
