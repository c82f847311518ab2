"""A FastAPI app run by uvicorn with proxy headers on, for tests/fastapi.rs.

Run as `python3 tests/apps/fastapi_app.py`: binds 127.0.0.1:0 itself, prints `PORT <n>` on
stdout, then serves like `uvicorn --proxy-headers --forwarded-allow-ips='*'` would. The socket
is listening before the port is printed, so a connection made right after it is queued, not
refused. The process exits when its stdin reaches end of file, so it never outlives the test
that started it, even if that test process is killed.
"""

import os
import socket
import sys
import threading

import uvicorn
from fastapi import FastAPI, Request

app = FastAPI()


@app.get("/info")
async def info(request: Request) -> dict:
    return {
        "client_host": request.client.host if request.client else None,
        "scheme": request.url.scheme,
        "host": request.headers["host"],
        "url": str(request.url),
        "url_for": str(request.url_for("info")),
        "forwarded_prefix": request.headers.get("x-forwarded-prefix"),
        "x_forwarded_for": request.headers.get("x-forwarded-for"),
    }


# Only the slash form exists: `GET /items` gets FastAPI's automatic 307 to `/items/`.
@app.get("/items/")
async def items() -> dict:
    return {"items": []}


def _exit_when_stdin_closes() -> None:
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        os._exit(0)


def main() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    print(f"PORT {sock.getsockname()[1]}", flush=True)

    threading.Thread(target=_exit_when_stdin_closes, daemon=True).start()

    config = uvicorn.Config(
        app,
        proxy_headers=True,
        forwarded_allow_ips="*",
        log_level="warning",
    )
    server = uvicorn.Server(config)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
