"""The FedDiffuse client terminal app: `feddiffuse-client` with no arguments."""

from __future__ import annotations

from textual.app import App
from textual.binding import Binding

from ..backoff import Backoff
from ..devices import detected_devices
from ..errors import SetupError
from ..inputs import normalize_hub_url
from ..session import HttpFactory, Joined, JoinRequest
from ..settings import Settings
from ..state import HubFolder
from .screens.audit import AuditScreen
from .screens.confirm_quit import ConfirmQuit
from .screens.dashboard import Dashboard
from .screens.help import HelpScreen, key_lines
from .screens.samples import SamplesScreen
from .screens.setup import SetupScreen


def rejoin_request(settings: Settings) -> JoinRequest | None:
    """The hub this machine last joined, when its token and image folder are still known:
    the app then opens its dashboard instead of Setup."""
    if not settings.hub_url or not settings.data_dir:
        return None
    try:
        url = normalize_hub_url(settings.hub_url)
    except SetupError:
        return None
    store = HubFolder(url)
    token = store.read_token()
    if not store.exists() or not token:
        return None
    return JoinRequest(url, token, settings.data_dir, settings.device,
                       store.load_info().ca_cert)


class ClientApp(App):
    """Setup -> dashboard (-> samples, audit). State and settings live outside the UI."""

    CSS_PATH = "app.tcss"
    TITLE = "FedDiffuse client"
    BINDINGS = [
        # The footer shows `q`; text fields hide it (they type the letter) and show Ctrl+Q,
        # which works everywhere.
        Binding("q", "quit", "Quit"),
        Binding("ctrl+q", "quit", "Quit", priority=True, show=False),
        Binding("question_mark", "help", "Help"),
        Binding("f1", "help", "Help"),
    ]

    def __init__(self, *, http_factory: HttpFactory | None = None,
                 devices: list[tuple[str, str]] | None = None,
                 backoff: Backoff | None = None, poll_s: float = 5.0,
                 once: bool = False, autostart: bool = True, reopen: bool = True) -> None:
        super().__init__()
        self.http_factory = http_factory
        self.devices = devices if devices is not None else detected_devices()
        self.settings = Settings.load()
        self.backoff = backoff
        self.poll_s = poll_s
        self.once = once
        self.autostart = autostart
        self.reopen = reopen

    def on_mount(self) -> None:
        request = rejoin_request(self.settings) if self.reopen else None
        self.push_screen(SetupScreen(reopen=request))

    def open_dashboard(self, joined: Joined) -> None:
        self.settings = Settings.load()
        self.switch_screen(Dashboard(joined, once=self.once, backoff=self.backoff,
                                     poll_s=self.poll_s, autostart=self.autostart))

    def open_setup(self) -> None:
        self.settings = Settings.load()
        self.switch_screen(SetupScreen())

    def open_samples(self, joined: Joined) -> None:
        self.push_screen(SamplesScreen(joined))

    def open_audit(self, joined: Joined) -> None:
        self.push_screen(AuditScreen(joined))

    # -- quitting -------------------------------------------------------------------------------

    def work_in_progress(self) -> str | None:
        """A sentence on the work that quitting would stop, or None when nothing runs."""
        for screen in reversed(self.screen_stack):
            describe = getattr(screen, "work_in_progress", None)
            sentence = describe() if describe is not None else None
            if sentence:
                return sentence
        return None

    async def action_quit(self) -> None:
        if isinstance(self.screen, ConfirmQuit):  # Ctrl+Q again on the question: quit
            self.screen.dismiss(True)
            return
        sentence = self.work_in_progress()
        if sentence is None:
            self.quit_now()
            return

        def answered(quit_now: bool | None) -> None:
            if quit_now:
                self.quit_now()

        self.push_screen(ConfirmQuit(sentence), answered)

    def quit_now(self) -> None:
        for screen in self.screen_stack:
            stop = getattr(screen, "stop_event", None)
            if stop is not None:
                stop.set()
        self.exit()

    # -- help -----------------------------------------------------------------------------------

    def action_help(self) -> None:
        screen = self.screen
        if isinstance(screen, HelpScreen | ConfirmQuit):
            return
        self.push_screen(HelpScreen(screen.sub_title or self.TITLE,
                                    getattr(screen, "HELP", ""), key_lines(screen)))
