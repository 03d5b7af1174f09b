"""The gateway's local control socket: repository hooks and the operator CLI talk to the
running server through it (JSON lines; the socket is reachable by the service user only)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .deploys import DeployService, Peer
from .errors import ConfigError, GatewayError, NotFound
from .logs import q

log = logging.getLogger("gateway.control")

MAX_REQUEST = 1024 * 1024
# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107


class ControlServer:
    def __init__(self, path: Path, deploys: DeployService) -> None:
        self.path = path
        self.deploys = deploys
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise ConfigError(
                f"config: [storage] control_socket: path too long for a Unix socket: {self.path}"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.path.exists() or self.path.is_symlink():
            if _is_live(self.path):
                raise GatewayError(
                    f"another gateway is running with this state (control socket {self.path})"
                )
            self.path.unlink()  # left behind by a gateway that did not stop cleanly
        old_umask = os.umask(0o177)  # the socket is created 0600: service user only
        try:
            self._server = await asyncio.start_unix_server(
                self._handle, path=str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old_umask)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        for task in list(self._handlers):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)

        async def send(message: dict[str, Any]) -> None:
            writer.write(json.dumps(message).encode() + b"\n")
            await writer.drain()

        async def say(text: str) -> None:
            await send({"out": text})

        peer = _peer(writer)
        try:
            if peer is None or peer.uid not in (os.geteuid(), 0):
                # The socket file is private already; this also holds if its mode is widened.
                log.warning(
                    "event=control_refused reason=foreign_peer uid=%s", peer.uid if peer else "-"
                )
                return
            line = await reader.readline()
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("request must be an object")
            try:
                code = await self._dispatch(request, say, peer)
            except ControlError as exc:
                await send({"err": str(exc), "exit": exc.code})
                return
            await send({"exit": code})
        except GatewayError as exc:  # e.g. the registry is unavailable: one line for the pusher
            log.warning("event=control_refused reason=%s", q(exc))
            with contextlib.suppress(Exception):
                await send({"out": f"gateway: {exc}\n", "exit": 1})
        except (ValueError, asyncio.LimitOverrunError) as exc:
            log.warning("event=control_bad_request reason=%s", q(exc))
            with contextlib.suppress(Exception):
                await send({"out": "error: bad request\n", "exit": 2})
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("event=control_error")
            with contextlib.suppress(Exception):
                await send({"out": "error: internal error\n", "exit": 1})
        finally:
            if task is not None:
                self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dispatch(
        self, request: dict[str, Any], say: Callable[[str], Any], peer: Peer | None
    ) -> int:
        if "hook" in request:
            return await self.deploys.handle_hook(request, say, peer)
        op = request.get("op")
        if op == "ssh_port":
            # The port the SSH listener was given (`[ssh] listen` on port 0): the CLI shows
            # clone URLs as the running gateway does.
            await say(f"{self.deploys.config.ssh.listen[1]}\n")
            return 0
        if op == "cancel_app":
            app = request.get("app")
            if not isinstance(app, str):
                raise ValueError("cancel_app needs an app name")
            count = await self.deploys.cancel_app(app, str(request.get("by") or "operator"))
            await say(f"{count} deploy(s) of {app} cancelled\n" if count else "")
            return 0
        deploy_id = request.get("deploy")
        if op not in ("follow", "cancel") or not isinstance(deploy_id, int):
            raise ValueError(f"unknown operation {op!r}")
        try:
            if op == "follow":
                final = await self.deploys.follow(deploy_id, say)
                return 0 if final.status.ok else 1
            final = await self.deploys.cancel(deploy_id, str(request.get("by") or "operator"))
            await say(f"deploy #{final.id}: {final.status.value} ({final.reason})\n")
            return 0
        except GatewayError as exc:
            raise ControlError(str(exc), exc.exit_code) from None


class ControlError(Exception):
    """A refused control request: one line for the operator and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _peer(writer: asyncio.StreamWriter) -> Peer | None:
    """The connecting process as the kernel reports it (SO_PEERCRED: pid, uid, gid)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


def _is_live(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


# -- client side, for the operator CLI --


class NotRunning(Exception):
    """No gateway listens on the control socket."""


def request(
    path: Path, message: dict[str, Any], timeout: float | None = None
) -> Iterator[dict[str, Any]]:
    """Send one request to the running gateway and yield its replies."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            conn.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NotRunning(str(exc)) from None
        conn.settimeout(timeout)
        conn.sendall(json.dumps(message).encode() + b"\n")
        with conn.makefile("rb") as replies:
            for line in replies:
                reply = json.loads(line)
                if "err" in reply:
                    raise ControlError(reply["err"], int(reply.get("exit", 1)))
                yield reply
    finally:
        conn.close()


__all__ = ["ControlError", "ControlServer", "NotFound", "NotRunning", "request"]
