"""The web dashboard: the queue at a glance and the hand that steers it, for a person on call.

Starlette serves server-rendered Jinja2 pages (autoescaped: whatever a task holds is shown as
text, never run) with a little JavaScript that refreshes the live parts of a page; the
templates, the stylesheet and the script ship inside the package (it works offline). Every
reading and every action goes through the operations API (``beanflow.ops``); the web layer
holds no SQL of its own.

Safe by default: it binds 127.0.0.1, and refuses another address unless a token is set
(``BEANFLOW_DASHBOARD_TOKEN``, or ``dashboard: token:`` in the YAML), which a browser gives as
the password of HTTP basic authentication and a script as ``Authorization: Bearer``. Every
action is a POST that carries the CSRF token of its page (a double-submit cookie, SameSite
strict); ``read_only`` hides the actions and refuses them.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import TYPE_CHECKING

from ..errors import BeanflowError

if TYPE_CHECKING:
    from ..ops import Operations
    from ..workflows import Workflows

logger = logging.getLogger(__name__)

TOKEN_ENV = "BEANFLOW_DASHBOARD_TOKEN"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclasses.dataclass(frozen=True)
class DashboardSettings:
    """Where the dashboard listens and what it lets a visitor do."""

    host: str = "127.0.0.1"
    port: int = 8787
    read_only: bool = False
    token: str | None = None  # required to listen on an address other than the loopback

    def check(self) -> None:
        """Raise BeanflowError when the settings would expose the queue to the network
        without authentication."""
        if self.host not in LOCAL_HOSTS and not self.token:
            raise BeanflowError(
                f"refusing to serve the dashboard on {self.host} without authentication: set "
                f"{TOKEN_ENV} (or dashboard: token: in beanflow.yaml), or bind 127.0.0.1"
            )


class DashboardServer:
    """The dashboard served by uvicorn on a thread of its own (``beanflow run`` with a
    ``dashboard:`` section)."""

    def __init__(
        self, ops: Operations, settings: DashboardSettings, workflows: Workflows | None = None
    ) -> None:
        import uvicorn

        from .web import create_app

        settings.check()
        self.settings = settings
        config = uvicorn.Config(
            create_app(ops, settings, workflows),
            host=settings.host,
            port=settings.port,
            log_level="warning",
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="beanflow-dashboard")

    def start(self) -> None:
        self.thread.start()
        logger.info("dashboard on http://%s:%d/", self.settings.host, self.settings.port)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve(ops: Operations, settings: DashboardSettings, workflows: Workflows | None = None) -> None:
    """Serve the dashboard in the foreground until interrupted (``beanflow dashboard``)."""
    import uvicorn

    from .web import create_app

    settings.check()
    logger.info("dashboard on http://%s:%d/", settings.host, settings.port)
    uvicorn.run(
        create_app(ops, settings, workflows),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        lifespan="off",
    )


__all__ = ["TOKEN_ENV", "DashboardServer", "DashboardSettings", "serve"]
