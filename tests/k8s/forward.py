"""TCP forwarder between two network namespaces: `forward.py FD ADDRESS PORT`.

FD is a listening socket made in the host's namespace (on 127.0.0.1) and inherited; this process runs in
the cluster's namespace (`nsenter --net`), so every connection it accepts on FD is carried to
ADDRESS:PORT there. The host thus reaches the API server over loopback only, and nothing is routed
between the namespaces.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading


def pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def serve(listener: socket.socket, address: str, port: int) -> None:
    while True:
        client, _ = listener.accept()
        try:
            upstream = socket.create_connection((address, port), timeout=10)
            upstream.settimeout(None)
        except OSError:
            client.close()
            continue
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pipe, args=(a, b), daemon=True).start()


def main() -> None:
    fd, address, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    serve(socket.socket(fileno=fd), address, port)


if __name__ == "__main__":
    main()
