"""The setup screen: hub URL, token, CA certificate, image folder and device.

Join checks them all and opens the dashboard; Test connection only asks the hub, and says
which of URL, certificate and token failed. Tokens belong to a hub: changing the URL to a
hub this machine has joined fills in its saved token (and CA certificate); a token that was
filled in for another hub is cleared, while one the user typed stays.
"""

from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.suggester import SuggestFromList
from textual.timer import Timer
from textual.widgets import Button, Footer, Header, Input, Label, Select, Static

from feddiffuse.shared.errors import FedDiffuseError, UserError

from ...errors import CertificateUntrusted, HubUnreachable, SetupError, TokenRejected
from ...inputs import check_ca_cert, check_token, normalize_hub_url, scan_image_folder
from ...session import Joined, JoinRequest, first_contact, join
from ...state import HubFolder, known_hubs
from ..widgets.fields import TextField
from .folder_picker import FolderPicker

INTRO = ("Join a FedDiffuse federation. Your images stay on this computer: only updates of the "
         "shared model are sent to the hub.")
FIELDS = ("#hub-url", "#token", "#data-dir")  # focused first when empty, in this order


def saved_for_hub(url_text: str) -> tuple[str | None, str | None]:
    """(token, CA certificate) this machine saved for the hub at `url_text`, if any."""
    try:
        store = HubFolder(normalize_hub_url(url_text))
    except SetupError:
        return None, None
    if not store.exists():
        return None, None
    return store.read_token(), store.load_info().ca_cert


def _lower_first(sentence: str) -> str:
    return sentence[:1].lower() + sentence[1:] if sentence[1:2].islower() else sentence


def in_app_words(sentence: str) -> str:
    """A sentence of the command line's errors with the app's words for the same fix."""
    return sentence.replace("pass --ca-cert FILE with", "give, under CA certificate,")


def check_connection(url_text: str, token_text: str, ca_text: str, http_factory=None
                     ) -> tuple[bool, str]:
    """Ask the hub once; (worked, one sentence that names the check that failed)."""
    try:
        url = normalize_hub_url(url_text)
    except SetupError as exc:
        return False, f"URL failed: {_lower_first(str(exc))}"
    try:
        ca_cert = check_ca_cert(ca_text)
    except SetupError as exc:
        return False, f"Certificate failed: {_lower_first(str(exc))}"
    try:
        token = check_token(token_text)
    except SetupError as exc:
        return False, f"Token failed: {_lower_first(str(exc))}"
    try:
        info, manifest = first_contact(url, token, http_factory=http_factory, ca_cert=ca_cert)
    except CertificateUntrusted as exc:
        return False, f"Certificate failed: {_lower_first(in_app_words(str(exc)))}"
    except TokenRejected as exc:
        return False, f"Token failed: {_lower_first(str(exc))}"
    except HubUnreachable as exc:
        return False, f"URL failed: {_lower_first(str(exc))}"
    except UserError as exc:
        return False, str(exc)
    except FedDiffuseError as exc:
        return False, (f"URL failed: {url} answered, but not as a FedDiffuse hub does "
                       f"({str(exc).rstrip('.')}).")
    trust = "its certificate is trusted, " if url.startswith("https:") else ""
    return True, (f"Connection works: {url} answers, {trust}and it accepts the token as "
                  f"{manifest.client_id} in federation {info.name} (round {manifest.round} "
                  f"of {manifest.rounds}, {manifest.phase}).")


class SetupScreen(Screen):
    CSS_PATH = "setup.tcss"
    AUTO_FOCUS = "#hub-url"  # on_mount moves it to the first empty field
    BINDINGS = [
        Binding("ctrl+b", "browse", "Browse folders"),
        Binding("ctrl+t", "test_connection", "Test connection"),
        Binding("ctrl+j", "join", "Join"),
    ]
    HELP = ("Type the hub's URL and the token its operator gave you (a hub this machine has "
            "joined fills in its saved token), give a CA certificate only when the hub's "
            "certificate comes from a private authority, choose the folder of your images, "
            "then press Enter or Join. Test connection checks URL, certificate and token "
            "without joining.")

    class JoinSucceeded(Message):
        def __init__(self, joined: Joined) -> None:
            super().__init__()
            self.joined = joined

    class JoinFailed(Message):
        def __init__(self, sentence: str) -> None:
            super().__init__()
            self.sentence = sentence

    class ConnectionTested(Message):
        def __init__(self, worked: bool, sentence: str) -> None:
            super().__init__()
            self.worked = worked
            self.sentence = sentence

    class FolderScanned(Message):
        def __init__(self, path: str, summary: str, usable: bool) -> None:
            super().__init__()
            self.path = path
            self.summary = summary
            self.usable = usable

    def __init__(self, reopen: JoinRequest | None = None) -> None:
        super().__init__()
        self.reopen = reopen
        self._scan_timer: Timer | None = None
        # What was filled in from the hub's saved state, so it leaves with that hub.
        self._filled: tuple[str | None, str | None] = (None, None)

    def compose(self) -> ComposeResult:
        settings = self.app.settings  # type: ignore[attr-defined]
        devices = self.app.devices  # type: ignore[attr-defined]
        hubs = [info.url for info in known_hubs()]
        token, ca_cert = saved_for_hub(settings.hub_url or "")
        self._filled = (token, ca_cert)
        values = [v for _, v in devices]
        device = settings.device if settings.device in values else values[0]
        yield Header()
        with VerticalScroll(id="setup-form"):
            yield Static(INTRO, id="intro")
            with Horizontal(classes="field-row"):
                yield Label("Hub URL", classes="field-label")
                yield TextField(settings.hub_url or "", placeholder="http://hub.example.org:8000",
                                suggester=SuggestFromList(hubs) if hubs else None,
                                id="hub-url")
                if hubs:
                    yield Select([(url, url) for url in hubs], prompt="Joined before",
                                 id="known-hubs")
            with Horizontal(classes="field-row"):
                yield Label("Token", classes="field-label")
                yield TextField(token or "", placeholder="the token the hub operator gave you",
                                password=True, id="token")
            with Horizontal(classes="field-row"):
                yield Label("CA certificate", classes="field-label")
                yield TextField(ca_cert or "", id="ca-cert",
                                placeholder="optional: PEM file of a private CA that signed "
                                            "the hub's certificate")
            with Horizontal(classes="field-row"):
                yield Label("Image folder", classes="field-label")
                yield TextField(settings.data_dir or "", id="data-dir",
                                placeholder="a folder of your images")
                yield Button("Browse...", id="browse")
            yield Static("", id="folder-info")
            with Horizontal(classes="field-row"):
                yield Label("Training device", classes="field-label")
                yield Select(devices, value=device, allow_blank=False, id="device")
        yield Static("", id="setup-error")
        with Horizontal(id="setup-buttons"):
            yield Button("Test connection", id="test")
            yield Button("Join federation", variant="primary", id="join")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "Setup"
        for selector in FIELDS:
            field = self.query_one(selector, Input)
            if not field.value.strip():
                break
        else:
            field = self.query_one("#hub-url", Input)
        field.focus()
        data = self.query_one("#data-dir", Input).value
        if data:
            self._scan(data)
        if self.reopen is not None:
            self._say(f"Opening the dashboard of {self.reopen.hub_url}...")
            self._set_busy(True)
            self._join(self.reopen)

    def _say(self, sentence: str, bad: bool = False, good: bool = False) -> None:
        status = self.query_one("#setup-error", Static)
        status.update(sentence)
        status.set_class(bad, "-bad")
        status.set_class(good, "-good")

    def _set_busy(self, busy: bool) -> None:
        self.query_one("#join", Button).disabled = busy
        self.query_one("#test", Button).disabled = busy

    # -- the hub: URL, token and certificate go together ----------------------------------------

    @on(Input.Changed, "#hub-url")
    def _url_changed(self, event: Input.Changed) -> None:
        token, ca_cert = saved_for_hub(event.value)
        for selector, saved, filled in (("#token", token, self._filled[0]),
                                        ("#ca-cert", ca_cert, self._filled[1])):
            field = self.query_one(selector, Input)
            if saved:
                field.value = saved
            elif filled is not None and field.value == filled:
                field.value = ""  # it belonged to the hub that was there before
        self._filled = (token, ca_cert)

    @on(Select.Changed, "#known-hubs")
    def _known_hub_chosen(self, event: Select.Changed) -> None:
        if isinstance(event.value, str):
            self.query_one("#hub-url", Input).value = event.value
            self.query_one("#data-dir", Input).focus()

    @on(Button.Pressed, "#test")
    def action_test_connection(self) -> None:
        if self.query_one("#test", Button).disabled:
            return
        self._say("Testing the connection...")
        self._set_busy(True)
        self._test(self.query_one("#hub-url", Input).value,
                   self.query_one("#token", Input).value,
                   self.query_one("#ca-cert", Input).value)

    @work(thread=True, exclusive=True, group="join")
    def _test(self, url: str, token: str, ca_cert: str) -> None:
        worked, sentence = check_connection(url, token, ca_cert,
                                            self.app.http_factory)  # type: ignore[attr-defined]
        self.post_message(self.ConnectionTested(worked, sentence))

    def on_setup_screen_connection_tested(self, message: ConnectionTested) -> None:
        self._set_busy(False)
        self._say(message.sentence, bad=not message.worked, good=message.worked)

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
                field = self.query_one("#data-dir", Input)
                field.value = str(path)
                field.focus()

        self.app.push_screen(FolderPicker(start), chosen)

    # -- join ---------------------------------------------------------------------------------

    @on(Button.Pressed, "#join")
    @on(Input.Submitted)
    def action_join(self) -> None:
        if self.query_one("#join", Button).disabled:
            return  # a join or test is already under way
        device = self.query_one("#device", Select).value
        request = JoinRequest(
            hub_url=self.query_one("#hub-url", Input).value,
            token=self.query_one("#token", Input).value,
            data_dir=self.query_one("#data-dir", Input).value,
            device=device if isinstance(device, str) else "auto",
            ca_cert=self.query_one("#ca-cert", Input).value or None,
        )
        self._say("Checking the hub...")
        self._set_busy(True)
        self._join(request)

    @work(thread=True, exclusive=True, group="join")
    def _join(self, request: JoinRequest) -> None:
        try:
            joined = join(request, http_factory=self.app.http_factory,  # type: ignore[attr-defined]
                          settings=self.app.settings)  # type: ignore[attr-defined]
        except UserError as exc:
            self.post_message(self.JoinFailed(in_app_words(str(exc))))
        except FedDiffuseError as exc:
            self.post_message(self.JoinFailed(f"The hub could not be joined: {exc}."))
        else:
            self.post_message(self.JoinSucceeded(joined))

    def on_setup_screen_join_failed(self, message: JoinFailed) -> None:
        self._say(message.sentence, bad=True)
        self._set_busy(False)

    def on_setup_screen_join_succeeded(self, message: JoinSucceeded) -> None:
        self._say("")
        self._set_busy(False)
        self.app.open_dashboard(message.joined)  # type: ignore[attr-defined]
