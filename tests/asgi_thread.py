"""An ASGI app served by uvicorn on a free 127.0.0.1 port, in a daemon thread of the test
process (the benchmark client's tests talk to known stub servers this way)."""
import contextlib
import socket
import threading
import time


@contextlib.contextmanager
def serve_in_thread(app, **config):
    """Start ``app`` (uvicorn.Config keywords in ``config``), yield its base URL, stop it."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, timeout_graceful_shutdown=1, **config))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    for _ in range(250):
        if server.started:
            break
        time.sleep(0.02)
    assert server.started, "the stub server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(timeout=5)
        sock.close()
