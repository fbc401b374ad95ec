"""The FedDiffuse client terminal app: `feddiffuse-client` with no arguments."""

from __future__ import annotations

from textual.app import App

from ..backoff import Backoff
from ..devices import detected_devices
from ..session import HttpFactory, Joined
from ..settings import Settings
from .screens.dashboard import Dashboard
from .screens.samples import SamplesScreen
from .screens.setup import SetupScreen


class ClientApp(App):
    """Setup -> dashboard (-> samples). State and settings live outside the UI."""

    CSS_PATH = "app.tcss"
    TITLE = "FedDiffuse client"
    BINDINGS = [("ctrl+q", "quit", "Quit")]

    def __init__(self, *, http_factory: HttpFactory | None = None,
                 devices: list[tuple[str, str]] | None = None,
                 backoff: Backoff | None = None, poll_s: float = 5.0,
                 once: bool = False, autostart: bool = True) -> None:
        super().__init__()
        self.http_factory = http_factory
        self.devices = devices if devices is not None else detected_devices()
        self.settings = Settings.load()
        self.backoff = backoff
        self.poll_s = poll_s
        self.once = once
        self.autostart = autostart

    def on_mount(self) -> None:
        self.push_screen(SetupScreen())

    def open_dashboard(self, joined: Joined) -> None:
        self.settings = Settings.load()
        self.switch_screen(Dashboard(joined, once=self.once, backoff=self.backoff,
                                     poll_s=self.poll_s, autostart=self.autostart))

    def open_setup(self) -> None:
        self.settings = Settings.load()
        self.switch_screen(SetupScreen())

    def open_samples(self, joined: Joined) -> None:
        self.push_screen(SamplesScreen(joined))

    async def action_quit(self) -> None:
        for screen in self.screen_stack:
            stop = getattr(screen, "stop_event", None)
            if stop is not None:
                stop.set()
        self.exit()
