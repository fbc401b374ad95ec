"""`feddiffuse-client status`: the hub, its round, and the local state, read without writing."""

from __future__ import annotations

from feddiffuse.shared.methods import personal_segments
from feddiffuse.shared.wire import load_weights, read_metadata_value

from .errors import HubError
from .hub_client import HubClient
from .settings import Settings
from .state import HubStore


def status_lines(store: HubStore, ask_hub: bool = True, http=None) -> list[tuple[str, str]]:
    info = store.load_info()
    lines: list[tuple[str, str]] = [("hub", store.url)]
    if ask_hub:
        token = store.read_token()
        try:
            with HubClient(store.url, token, http=http, timeout=5.0,
                           ca_cert=info.ca_cert) as hub:
                m = hub.manifest()
            uploads = ", ".join(m.upload_segments) or "-"
            lines.append(("hub round", f"{m.round} of {m.rounds}, {m.phase}"
                          + (f" (upload {uploads})" if m.phase == "open" else "")))
            if m.deadline is not None:
                lines.append(("deadline", m.deadline.isoformat(timespec="seconds")))
        except HubError as exc:
            lines.append(("hub round", f"unknown: {exc}"))
    if info.federation:
        lines.append(("federation", f"{info.federation} (method {info.method}, preset "
                      f"{info.preset}, {info.rounds} round(s))"))
    if info.client_id:
        lines.append(("client", info.client_id))
    held = store.load_global()
    if held.version:
        lines.append(("global model", f"{held.version[:12]} (from round {info.global_round})"))
    else:
        lines.append(("global model", "none downloaded yet"))
    personal = personal_segments(info.method) if info.method else ()
    if personal:
        have = "kept locally" if store.personal_path.is_file() else "not trained yet"
        lines.append(("personal", f"{', '.join(personal)} ({have}; never uploaded)"))
    lines.append(("last report", f"round {info.last_reported_round}"
                  if info.last_reported_round else "none yet"))
    for round_dir in store.rounds_in_progress():
        latest = store.latest_checkpoint(round_dir)
        epoch = "no epoch finished yet"
        if latest is not None:
            _, meta = load_weights(latest[1])
            epoch = f"epoch {read_metadata_value(meta, 'epoch')} saved"
        if (round_dir / "upload.safetensors").is_file():
            epoch = "trained, upload pending"
        lines.append(("in progress", f"{round_dir.name}: {epoch}"))
    if info.finished:
        lines.append(("finished", "yes: the federation is over"))
    settings = Settings.load()
    if settings.data_dir and settings.hub_url == store.url:
        lines.append(("images", settings.data_dir))
    lines.append(("state", str(store.root)))
    return lines
