"""The public port's sockets, shared by the front-end processes with SO_REUSEPORT."""

from __future__ import annotations

import socket


def port_socket(host: str, port: int, listen: bool, shared: bool = True) -> socket.socket:
    """A socket on the public address with SO_REUSEPORT. The server process binds one and does not listen:
    it holds the port (a port in use fails at start, port 0 picks one); each front-end binds and listens on
    its own, and the kernel spreads new connections over them by address hash. (One shared listening socket
    let a front-end take connections in bursts: 8 keep-alive clients all landed on one of 2 front-ends.)
    `shared=False`: the one-process layout's socket, without SO_REUSEPORT (nothing else may listen there);
    uvicorn listens on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if shared and not listen:  # first as any server binds: fails if something listens there already
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
            port = probe.getsockname()[1]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart despite TIME_WAIT
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock
