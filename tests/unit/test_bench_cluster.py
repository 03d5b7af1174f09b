"""`python -m bench --cluster` reads the nodes' logs: where node-b forwarded, and what each
node warned about (the log format of gateway.logs)."""

from __future__ import annotations

from pathlib import Path

from bench.cluster import forwarded_homes, warnings_logged
from bench.servers import Gateway

LOG = """\
2026-12-07T19:00:00.001Z INFO gateway.app event=listening address=127.0.0.1:40001
2026-12-07T19:00:01.002Z INFO gateway.ssh event=git_forwarded service=git-upload-pack \
app=bench user=bench home=node-a rc=0 bytes_in=10 bytes_out=20
2026-12-07T19:00:02.003Z WARNING gateway.forward event=peer_unreachable address=x error=y
2026-12-07T19:00:02.004Z WARNING gateway.homes event=home_unreachable app=bench home=node-a
2026-12-07T19:00:02.005Z WARNING gateway.forward event=peer_unreachable address=x error=y
2026-12-07T19:00:03.006Z ERROR gateway.app something without an event
Traceback (most recent call last):
2026-12-07T19:00:04.007Z INFO gateway.ssh event=git_forwarded service=git-receive-pack \
app=bench user=bench home=node-b rc=0 bytes_in=1 bytes_out=2
"""


def test_the_nodes_logs_say_where_operations_went_and_what_went_wrong(tmp_path: Path) -> None:
    node = Gateway(tmp_path / "node-b")
    (node.state / "gateway.log").write_text(LOG)
    assert forwarded_homes(node) == ["node-a", "node-b"]
    assert warnings_logged(node) == {
        "WARNING peer_unreachable": 2,
        "WARNING home_unreachable": 1,
        "ERROR something without an event": 1,
        "Traceback": 1,
    }
