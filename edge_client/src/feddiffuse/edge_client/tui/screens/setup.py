"""The setup screen: hub URL, token, image folder and device; Join checks them all."""

from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Button, Footer, Header, Input, Label, Select, Static

from feddiffuse.shared.errors import FedDiffuseError, UserError

from ...inputs import normalize_hub_url, scan_image_folder
from ...session import Joined, JoinRequest, join
from ...state import HubStore
from .folder_picker import FolderPicker

INTRO = ("Join a FedDiffuse federation. Your images stay on this computer: only updates of the "
         "shared model are sent to the hub.")


class SetupScreen(Screen):
    CSS_PATH = "setup.tcss"
    BINDINGS = [("ctrl+b", "browse", "Browse folders"), ("ctrl+j", "join", "Join")]

    class JoinSucceeded(Message):
        def __init__(self, joined: Joined) -> None:
            super().__init__()
            self.joined = joined

    class JoinFailed(Message):
        def __init__(self, sentence: str) -> None:
            super().__init__()
            self.sentence = sentence

    class FolderScanned(Message):
        def __init__(self, path: str, summary: str, usable: bool) -> None:
            super().__init__()
            self.path = path
            self.summary = summary
            self.usable = usable

    def __init__(self) -> None:
        super().__init__()
        self._scan_timer: Timer | None = None

    def compose(self) -> ComposeResult:
        settings = self.app.settings  # type: ignore[attr-defined]
        devices = self.app.devices  # type: ignore[attr-defined]
        token = ""
        if settings.hub_url:
            try:
                token = HubStore(normalize_hub_url(settings.hub_url)).read_token() or ""
            except UserError:
                token = ""
        values = [v for _, v in devices]
        device = settings.device if settings.device in values else values[0]
        yield Header()
        with VerticalScroll(id="setup-form"):
            yield Static(INTRO, id="intro")
            yield Label("Hub URL", classes="field-label")
            yield Input(settings.hub_url or "", placeholder="http://hub.example.org:8000",
                        id="hub-url")
            yield Label("Token", classes="field-label")
            yield Input(token, placeholder="the token the hub operator gave you", password=True,
                        id="token")
            yield Label("Image folder", classes="field-label")
            with Horizontal(id="data-row"):
                yield Input(settings.data_dir or "", placeholder="a folder of PNG or JPEG images",
                            id="data-dir")
                yield Button("Browse...", id="browse")
            yield Static("", id="folder-info")
            yield Label("Training device", classes="field-label")
            yield Select(devices, value=device, allow_blank=False, id="device")
            yield Static("", id="setup-error")
            yield Button("Join federation", variant="primary", id="join")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "Setup"
        data = self.query_one("#data-dir", Input).value
        if data:
            self._scan(data)

    # -- image folder -------------------------------------------------------------------------

    @on(Input.Changed, "#data-dir")
    def _data_changed(self, event: Input.Changed) -> None:
        if self._scan_timer is not None:
            self._scan_timer.stop()
        value = event.value
        self._scan_timer = self.set_timer(0.3, lambda: self._scan(value))

    @work(thread=True, exclusive=True, group="scan")
    def _scan(self, path: str) -> None:
        if not path.strip():
            self.post_message(self.FolderScanned(path, "", False))
            return
        try:
            scan = scan_image_folder(path)
            self.post_message(self.FolderScanned(path, f"Found {scan.summary()}.",
                                                 scan.usable > 0))
        except (UserError, OSError) as exc:
            self.post_message(self.FolderScanned(path, str(exc), False))

    def on_setup_screen_folder_scanned(self, message: FolderScanned) -> None:
        if message.path != self.query_one("#data-dir", Input).value:
            return
        info = self.query_one("#folder-info", Static)
        info.update(message.summary)
        info.set_class(not message.usable and bool(message.summary), "-bad")

    @on(Button.Pressed, "#browse")
    def action_browse(self) -> None:
        current = self.query_one("#data-dir", Input).value.strip()
        start = Path(current).expanduser() if current else Path.home()
        if not start.is_dir():
            start = Path.home()

        def chosen(path: Path | None) -> None:
            if path is not None:
                self.query_one("#data-dir", Input).value = str(path)

        self.app.push_screen(FolderPicker(start), chosen)

    # -- join ---------------------------------------------------------------------------------

    @on(Button.Pressed, "#join")
    @on(Input.Submitted)
    def action_join(self) -> None:
        device = self.query_one("#device", Select).value
        request = JoinRequest(
            hub_url=self.query_one("#hub-url", Input).value,
            token=self.query_one("#token", Input).value,
            data_dir=self.query_one("#data-dir", Input).value,
            device=device if isinstance(device, str) else "auto",
        )
        self.query_one("#setup-error", Static).update("Checking the hub...")
        self.query_one("#setup-error", Static).remove_class("-bad")
        self.query_one("#join", Button).disabled = True
        self._join(request)

    @work(thread=True, exclusive=True, group="join")
    def _join(self, request: JoinRequest) -> None:
        try:
            joined = join(request, http_factory=self.app.http_factory,  # type: ignore[attr-defined]
                          settings=self.app.settings)  # type: ignore[attr-defined]
        except UserError as exc:
            self.post_message(self.JoinFailed(str(exc)))
        except FedDiffuseError as exc:
            self.post_message(self.JoinFailed(f"The hub could not be joined: {exc}."))
        else:
            self.post_message(self.JoinSucceeded(joined))

    def on_setup_screen_join_failed(self, message: JoinFailed) -> None:
        error = self.query_one("#setup-error", Static)
        error.update(message.sentence)
        error.add_class("-bad")
        self.query_one("#join", Button).disabled = False

    def on_setup_screen_join_succeeded(self, message: JoinSucceeded) -> None:
        self.query_one("#setup-error", Static).update("")
        self.query_one("#join", Button).disabled = False
        self.app.open_dashboard(message.joined)  # type: ignore[attr-defined]
