"""Write the broker's dynamic-security file with the cityhub-admin account, once.

Run by docker-compose's mosquitto-init service (the cityhub image, as the
broker's uid) before the broker starts. An existing file keeps every account
`cityhub gateways` and `cityhub devices` added; only the admin account is made
current (its password from MQTT_ADMIN_PASSWORD), as the embedded broker does.
"""

import json
import os
import sys
from pathlib import Path

from cityhub.localstack.mosquitto import ADMIN_USER
from devices.dynsec import base_document

path = Path(sys.argv[1] if len(sys.argv) > 1 else "/mosquitto/security/dynamic-security.json")
password = os.environ.get("MQTT_ADMIN_PASSWORD", "")
if len(password) < 16:
    sys.exit("mosquitto-init: MQTT_ADMIN_PASSWORD must be set (16 characters or more)")
existing = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
document = base_document(
    existing, admin_username=ADMIN_USER, admin_password=password, dev_mode=False
)
tmp = path.with_suffix(".tmp")
tmp.write_text(json.dumps(document, indent=1), encoding="utf-8")
tmp.chmod(0o600)
tmp.replace(path)
sys.stdout.write(f"mosquitto-init: {path} ready ({len(document.get('clients', []))} accounts)\n")
