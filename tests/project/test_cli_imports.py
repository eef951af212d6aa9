"""The `cityhub` command loads on a gateway-only install: no database or numeric library.

A gateway machine installs the `gateway` extra (no psycopg, numpy, grafana
libraries) and still runs `cityhub gateway run`; every command module the
root app registers must therefore import those libraries only where a
command needs them. A fresh interpreter shows what importing the app loads.
"""

from __future__ import annotations

import subprocess
import sys

CENTRAL_ONLY = ("psycopg", "numpy", "grafana_client", "grafana_foundation_sdk", "aiomqtt")


def test_importing_the_cli_loads_no_central_library() -> None:
    code = (
        "import sys, cityhub.cli.main\n"
        f"print(','.join(m for m in {CENTRAL_ONLY!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "", f"loaded at import: {done.stdout.strip()}"
