"""Addresses of this machine for tests of listeners that bind a configured host.

``other_address`` is an IPv4 address of this machine that is not 127.0.0.1:
its own non-loopback address (``hostname -I``) when it has one, else
127.0.0.2, which Linux routes to the loopback interface (all of 127/8 is
local) while a server bound to it is still not on 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess

import pytest

FALLBACK = "127.0.0.2"


def own_ipv4_addresses() -> list[str]:
    """This machine's IPv4 addresses outside 127/8, as ``hostname -I`` lists them."""
    hostname = shutil.which("hostname")
    if hostname is None:
        return []
    done = subprocess.run([hostname, "-I"], capture_output=True, text=True, check=False, timeout=10)
    if done.returncode != 0:
        return []
    found = []
    for word in done.stdout.split():
        try:
            address = ipaddress.ip_address(word)
        except ValueError:
            continue
        if address.version == 4 and not address.is_loopback:
            found.append(word)
    return found


@pytest.fixture(scope="session")
def other_address() -> str:
    return next(iter(own_ipv4_addresses()), FALLBACK)
