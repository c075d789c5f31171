"""`vistune serve`: many tasks on one frozen backbone over HTTP, with dynamic batching across tasks.

:func:`create_app` builds the ASGI app (FastAPI) over a :class:`~vistune.multitask.MultiTask`; :func:`serve` runs
it with uvicorn. Needs the ``serve`` extra: ``pip install 'vistune[serve]'``."""
from __future__ import annotations

from ..errors import VistuneError


def require_serving():
    """Import the serving stack (FastAPI, uvicorn, python-multipart, prometheus_client), or say how to get it."""
    missing = []
    for module in ("fastapi", "uvicorn", "multipart", "prometheus_client"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise VistuneError(f"`vistune serve` needs {', '.join(missing)}, which is not installed",
                           "pip install 'vistune[serve]'")


def create_app(model, config):
    require_serving()
    from .app import create_app as create

    return create(model, config)


def serve(model, config, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          graceful_timeout: float = 30.0) -> None:
    """Run the server until Ctrl-C / SIGTERM; then it stops accepting, answers every request in flight (at most
    ``graceful_timeout`` seconds) and returns."""
    app = create_app(model, config)
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                  timeout_graceful_shutdown=graceful_timeout)).run()


__all__ = ["create_app", "serve", "require_serving"]
