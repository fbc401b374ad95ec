"""`feddiffuse-client status`: the hub, its round, and the local state, read without writing.

`status_report` gathers everything as plain data (what `status --json` prints); `status_lines`
words it for people.
"""

from __future__ import annotations

from feddiffuse.shared.methods import personal_segments
from feddiffuse.shared.wire import load_weights, read_metadata_value

from .errors import HubCallError
from .hub_client import HubClient
from .sampling import rounds_completed
from .settings import Settings
from .state import HubFolder, HubInfo


def hub_round(store: HubFolder, info: HubInfo, http=None) -> tuple[dict | None, str | None]:
    """The hub's current round as plain data, or None and why it could not be asked."""
    try:
        with HubClient(store.url, store.read_token(), http=http, timeout=5.0,
                       ca_cert=info.ca_cert) as hub:
            m = hub.manifest()
    except HubCallError as exc:
        return None, str(exc)
    return {"round": m.round, "rounds": m.rounds, "phase": str(m.phase),
            "upload_segments": list(m.upload_segments), "global_version": m.global_version,
            "sample_version": m.sample_version,
            "deadline": m.deadline.isoformat(timespec="seconds") if m.deadline else None}, None


def status_report(store: HubFolder, ask_hub: bool = True, http=None) -> dict:
    info = store.load_info()
    report: dict = {"hub": store.url, "hub_round": None, "hub_error": None}
    if ask_hub:
        report["hub_round"], report["hub_error"] = hub_round(store, info, http)
    report["federation"] = ({"name": info.federation, "method": info.method,
                             "preset": info.preset, "rounds": info.rounds}
                            if info.federation else None)
    report["client_id"] = info.client_id
    held = store.load_global()
    report["global_model"] = ({"version": held.version, "round": info.global_round,
                               "rounds_completed": rounds_completed(info)}
                              if held.version else None)
    report["sample_model"] = ({"version": info.sample_version,
                               "rounds_completed": info.sample_round}
                              if info.sample_version and store.sample_path.is_file() else None)
    personal = personal_segments(info.method) if info.method else ()
    report["personal_segments"] = ({"segments": list(personal),
                                    "kept": store.personal_path.is_file()}
                                   if personal else None)
    report["last_reported_round"] = info.last_reported_round
    progress = []
    for round_dir in store.rounds_in_progress():
        latest = store.latest_checkpoint(round_dir)
        entry: dict = {"round": round_dir.name, "epochs_saved": 0, "upload_pending": False}
        if latest is not None:
            _, meta = load_weights(latest[1])
            epoch = read_metadata_value(meta, "epoch")
            entry["epochs_saved"] = int(epoch) if epoch is not None else 0
        entry["upload_pending"] = (round_dir / "upload.safetensors").is_file()
        progress.append(entry)
    report["in_progress"] = progress
    report["finished"] = info.finished
    report["newer_on_hub"] = newer_on_hub(report["hub_round"], held.version)
    settings = Settings.load()
    report["images"] = (settings.data_dir if settings.data_dir and settings.hub_url == store.url
                        else None)
    report["ca_cert"] = info.ca_cert
    report["state"] = str(store.root)
    report["log"] = str(store.log_path)
    return report


def newer_on_hub(hub: dict | None, held_version: str | None) -> str | None:
    """The hub's global version when it is newer than the one this client holds."""
    if not hub or not hub.get("global_version") or hub["global_version"] == held_version:
        return None
    return hub["global_version"]


def newer_model_note(store: HubFolder, http=None) -> str | None:
    """A sentence when the hub has a newer global model than this client holds; None when it
    has not, or when the hub cannot be asked (sampling works offline). Reads hub.json, not
    the weights (`sample` has just loaded them)."""
    info = store.load_info()
    m, _error = hub_round(store, info, http)
    newer = newer_on_hub(m, info.global_version if store.global_path.is_file() else None)
    if m is None or newer is None:
        return None
    when = ("its final model" if m["phase"] == "finished"
            else f"the global model of round {m['round']}")
    return (f"the hub has a newer model than the one sampled here ({when}, {newer[:12]}); "
            "`feddiffuse-client join` fetches it.")


def status_lines(store: HubFolder, ask_hub: bool = True, http=None) -> list[tuple[str, str]]:
    r = status_report(store, ask_hub, http)
    lines: list[tuple[str, str]] = [("hub", r["hub"])]
    if r["hub_round"]:
        m = r["hub_round"]
        uploads = ", ".join(m["upload_segments"]) or "-"
        lines.append(("hub round", f"{m['round']} of {m['rounds']}, {m['phase']}"
                      + (f" (upload {uploads})" if m["phase"] == "open" else "")))
        if m["deadline"]:
            lines.append(("deadline", m["deadline"]))
    elif r["hub_error"]:
        lines.append(("hub round", f"unknown: {r['hub_error']}"))
    f = r["federation"]
    if f:
        lines.append(("federation", f"{f['name']} (method {f['method']}, preset "
                      f"{f['preset']}, {f['rounds']} round(s))"))
    if r["client_id"]:
        lines.append(("client", r["client_id"]))
    g = r["global_model"]
    if g:
        done = g["rounds_completed"]
        after = f", after {done} round(s)" if done is not None else ""
        lines.append(("global model", f"{g['version'][:12]} (from round {g['round']}{after})"))
    else:
        lines.append(("global model", "none downloaded yet"))
    if r["newer_on_hub"]:
        lines.append(("newer on hub", f"{r['newer_on_hub'][:12]}: `feddiffuse-client join` "
                      "fetches it"))
    if r["sample_model"]:
        s = r["sample_model"]
        lines.append(("sample model", f"{s['version'][:12]} (EMA after "
                      f"{s['rounds_completed']} round(s))"))
    p = r["personal_segments"]
    if p:
        have = "kept locally" if p["kept"] else "not trained yet"
        lines.append(("personal", f"{', '.join(p['segments'])} ({have}; never uploaded)"))
    lines.append(("last report", f"round {r['last_reported_round']}"
                  if r["last_reported_round"] else "none yet"))
    for entry in r["in_progress"]:
        epoch = (f"epoch {entry['epochs_saved']} saved" if entry["epochs_saved"]
                 else "no epoch finished yet")
        if entry["upload_pending"]:
            epoch = "trained, upload pending"
        lines.append(("in progress", f"{entry['round']}: {epoch}"))
    if r["finished"]:
        lines.append(("finished", "yes: the federation is over"))
    if r["images"]:
        lines.append(("images", r["images"]))
    if r["ca_cert"]:
        lines.append(("CA cert", r["ca_cert"]))
    lines.append(("state", r["state"]))
    lines.append(("log", r["log"]))
    return lines
