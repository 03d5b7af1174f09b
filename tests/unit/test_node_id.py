"""A gateway process's node id: the machine's configured name, else its host name."""

from __future__ import annotations

import os
import re
import socket

from gateway.deploys.runner import node_id


def test_the_node_id_starts_with_the_configured_node_name():
    assert re.fullmatch(rf"edge-1-{os.getpid()}-[0-9a-f]{{8}}", node_id("edge-1"))
    assert node_id("edge-1") != node_id("edge-1")  # unique per start


def test_without_a_node_name_it_is_the_host_name():
    host = socket.gethostname().split(".")[0]
    assert node_id("").startswith(f"{host[:63]}-{os.getpid()}-")
