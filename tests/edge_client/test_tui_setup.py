"""Issue 11, items 2, 4, 10 and 11 in the terminal app: a folder browser that goes anywhere,
tokens (and CA certificates) that belong to their hub, Test connection, and a restart that
opens the dashboard of the hub joined last."""

from __future__ import annotations

import pytest
from edge_fakehub import FakeHub
from edge_images import make_images
from edge_sync import on_screen, wait_until
from textual.widgets import Input, Select, Static

from feddiffuse.edge_client.settings import Settings, client_home
from feddiffuse.edge_client.state import HubFolder
from feddiffuse.edge_client.tui.app import ClientApp
from feddiffuse.edge_client.tui.screens.dashboard import Dashboard
from feddiffuse.edge_client.tui.screens.folder_picker import FolderPicker, FolderTree
from feddiffuse.edge_client.tui.screens.setup import SetupScreen

pytestmark = pytest.mark.anyio

DEVICES = [("CPU", "cpu")]
SIZE = (120, 40)


async def setup_shown(pilot) -> SetupScreen:
    await wait_until(pilot, lambda: on_screen(pilot.app, SetupScreen), what="Setup")
    return pilot.app.screen


def joined_before(url: str, token: str, ca_cert: str | None = None,
                  when: str = "2026-01-01T00:00:00+00:00") -> None:
    store = HubFolder(url)
    store.write_token(token)
    info = store.update_info(url=url, ca_cert=ca_cert).model_copy(update={"updated_at": when})
    store.info_path.write_text(info.model_dump_json())  # a chosen time: no clock in the test


# -- the folder browser -------------------------------------------------------------------------


async def test_folder_browser_goes_up_home_and_to_a_typed_path(tmp_path, monkeypatch):
    make_images(tmp_path / "photos" / "cats", n=3)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "a-file.txt").write_text("x")
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    app = ClientApp(devices=DEVICES)
    async with app.run_test(size=SIZE) as pilot:
        screen = await setup_shown(pilot)
        screen.query_one("#data-dir", Input).value = str(tmp_path / "photos" / "cats")
        await pilot.press("ctrl+b")
        await wait_until(pilot, lambda: on_screen(app, FolderPicker), what="the browser")
        picker = app.screen
        tree = picker.query_one(FolderTree)
        path_field = picker.query_one("#picker-path", Input)
        scan = picker.query_one("#picker-scan", Static)

        await pilot.press("backspace")  # up from cats to photos
        await wait_until(pilot, lambda: tree.root_path == tmp_path / "photos")
        assert path_field.value == str(tmp_path / "photos")
        await wait_until(pilot, lambda: "photos: 3 usable images" in str(scan.render()),
                         what="the count of photos")

        # The ".." entry is listed first under the top folder: Enter on it goes up.
        await wait_until(pilot, lambda: len(tree.root.children) >= 2, what="the listing")
        assert str(tree.root.children[0].label) == ".."
        tree.move_cursor(tree.root.children[0])
        await pilot.press("enter")
        await wait_until(pilot, lambda: tree.root_path == tmp_path)

        await pilot.press("left")  # Left on the top folder goes up too
        await wait_until(pilot, lambda: tree.root_path == tmp_path.parent)

        await pilot.press("tilde")
        await wait_until(pilot, lambda: tree.root_path == tmp_path / "elsewhere")

        # A typed path that is not a folder: one sentence, and the tree stays where it is.
        await pilot.press("ctrl+l")
        assert app.focused is path_field
        await pilot.press("ctrl+u")  # clears the field (it does not choose the folder)
        assert path_field.value == "" and on_screen(app, FolderPicker)
        path_field.value = str(tmp_path / "a-file.txt")
        await pilot.press("enter")
        assert scan.has_class("-bad") and "is a file, not a folder" in str(scan.render())
        assert tree.root_path == tmp_path / "elsewhere"

        path_field.value = str(tmp_path / "photos" / "cats")
        await pilot.press("enter")
        await wait_until(pilot, lambda: tree.root_path == tmp_path / "photos" / "cats")
        await wait_until(pilot, lambda: "cats: 3 usable images" in str(scan.render()))
        await pilot.press("ctrl+o")  # use this folder
        await wait_until(pilot, lambda: on_screen(app, SetupScreen), what="Setup")
        assert app.screen.query_one("#data-dir", Input).value == str(tmp_path / "photos" /
                                                                      "cats")


# -- tokens per hub -----------------------------------------------------------------------------


async def test_the_token_and_certificate_follow_the_hub_url(tmp_path):
    ca = tmp_path / "ca.pem"
    joined_before("http://hub-a.test", "token-of-a", str(ca))
    joined_before("http://hub-b.test", "token-of-b")
    app = ClientApp(devices=DEVICES, reopen=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = await setup_shown(pilot)
        url = screen.query_one("#hub-url", Input)
        token = screen.query_one("#token", Input)
        ca_field = screen.query_one("#ca-cert", Input)

        url.value = "http://hub-a.test"
        await wait_until(pilot, lambda: token.value == "token-of-a", what="a's token")
        assert ca_field.value == str(ca)
        url.value = "http://hub-b.test/"  # the same hub as saved, written another way
        await wait_until(pilot, lambda: token.value == "token-of-b", what="b's token")
        assert ca_field.value == ""  # a's certificate left with a
        url.value = "http://new-hub.test"
        await wait_until(pilot, lambda: token.value == "", what="no token")

        # A token the user typed is theirs: editing the URL keeps it...
        token.value = "typed-by-hand"
        url.value = "http://new-hub.test:8000"
        await pilot.pause()
        assert token.value == "typed-by-hand"
        # ...until a hub with a saved token comes up.
        url.value = "http://hub-a.test"
        await wait_until(pilot, lambda: token.value == "token-of-a", what="a's token")


async def test_setup_offers_the_hubs_joined_before():
    joined_before("http://hub-a.test", "token-of-a", when="2026-01-01T00:00:00+00:00")
    joined_before("http://hub-b.test", "token-of-b", when="2026-02-01T00:00:00+00:00")
    app = ClientApp(devices=DEVICES, reopen=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = await setup_shown(pilot)
        known = screen.query_one("#known-hubs", Select)
        assert [value for _, value in known._options if isinstance(value, str)] == [
            "http://hub-b.test", "http://hub-a.test"]
        known.value = "http://hub-a.test"
        await wait_until(pilot, lambda: screen.query_one("#token", Input).value
                         == "token-of-a", what="the chosen hub's token")
        assert screen.query_one("#hub-url", Input).value == "http://hub-a.test"


# -- Test connection ----------------------------------------------------------------------------


@pytest.mark.parametrize("url, token, ca_cert, expected", [
    ("http://hub.test", "token-client-a", "", "Connection works: http://hub.test answers"),
    ("http://hub.test", "wrong", "", "Token failed: the hub at http://hub.test rejected"),
    ("http://hub.test", "", "", "Token failed: no token given"),
    ("hub.test", "token-client-a", "", "URL failed: 'hub.test' is not a valid hub URL"),
    ("http://hub.test", "token-client-a", "MISSING", "Certificate failed: the CA certificate"),
    ("http://hub.test", "token-client-a", "NOT-PEM", "Certificate failed:"),
])
async def test_test_connection_names_what_failed_and_writes_nothing(tmp_path, url, token,
                                                                    ca_cert, expected):
    hub = FakeHub(clients=("client-a",))
    (tmp_path / "not.pem").write_text("not a certificate")
    ca_cert = {"MISSING": str(tmp_path / "missing.pem"),
               "NOT-PEM": str(tmp_path / "not.pem")}.get(ca_cert, ca_cert)
    app = ClientApp(http_factory=hub.http_factory(), devices=DEVICES)
    async with app.run_test(size=SIZE) as pilot:
        screen = await setup_shown(pilot)
        screen.query_one("#hub-url", Input).value = url
        screen.query_one("#token", Input).value = token
        screen.query_one("#ca-cert", Input).value = ca_cert
        await pilot.press("ctrl+t")
        status = screen.query_one("#setup-error", Static)
        await wait_until(pilot, lambda: status.has_class("-bad") or status.has_class("-good"),
                         what="the test's answer")
        sentence = str(status.render())
        assert sentence.startswith(expected), sentence
        assert sentence.endswith(".") and "\n" not in sentence
        assert status.has_class("-good") == expected.startswith("Connection works")
        assert on_screen(app, SetupScreen)
    assert not client_home().exists()  # testing never saves anything


async def test_test_connection_says_the_hub_is_unreachable():
    from edge_realhub import free_port

    url = f"http://127.0.0.1:{free_port()}"
    app = ClientApp(devices=DEVICES)
    async with app.run_test(size=SIZE) as pilot:
        screen = await setup_shown(pilot)
        screen.query_one("#hub-url", Input).value = url
        screen.query_one("#token", Input).value = "t"
        await pilot.click("#test")
        status = screen.query_one("#setup-error", Static)
        await wait_until(pilot, lambda: status.has_class("-bad"), what="the answer")
        assert str(status.render()).startswith(f"URL failed: cannot reach a hub at {url}")


# -- restart --------------------------------------------------------------------------------------


async def test_a_restart_opens_the_dashboard_of_the_hub_joined_last(tmp_path):
    images = make_images(tmp_path / "images", n=4)
    joined_before("http://hub.test", "token-client-a")
    Settings(hub_url="http://hub.test", data_dir=str(images), device="cpu").save()
    app = ClientApp(devices=DEVICES, autostart=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: on_screen(app, Dashboard), what="the dashboard")
        assert app.screen.joined.url == "http://hub.test"
        assert app.screen.joined.token == "token-client-a"


async def test_a_restart_whose_folder_is_gone_stays_on_setup_with_a_sentence(tmp_path):
    joined_before("http://hub.test", "token-client-a")
    Settings(hub_url="http://hub.test", data_dir=str(tmp_path / "gone")).save()
    app = ClientApp(devices=DEVICES, autostart=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = await setup_shown(pilot)
        status = screen.query_one("#setup-error", Static)
        await wait_until(pilot, lambda: status.has_class("-bad"), what="the sentence")
        assert "does not exist" in str(status.render())
        assert on_screen(app, SetupScreen)
        assert not screen.query_one("#join").disabled  # the user can fix it and join
