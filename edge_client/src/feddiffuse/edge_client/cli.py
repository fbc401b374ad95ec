"""The `feddiffuse-client` command line.

With no arguments it opens the terminal app; `join`, `sample`, `audit`, `status` and `version`
are the headless commands. Mistakes the user can fix end with one sentence and exit code 2.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from feddiffuse.shared.errors import UserError

from .errors import Cancelled, HubCallError

EXIT_USER_ERROR = 2
EXIT_HUB_ERROR = 1
EXIT_INTERRUPTED = 130

EXAMPLES = """Examples:

  feddiffuse-client                      open the terminal app

  feddiffuse-client join --hub https://hub.example.org:8000 --token T --data ~/Pictures/archive

  feddiffuse-client join                 rejoin the last hub with the saved token and folder

  feddiffuse-client sample --n 16 --out grid.png

  feddiffuse-client audit --n 64         does the model reproduce my own images?

  feddiffuse-client status --json
"""

app = typer.Typer(
    help="FedDiffuse edge client: train the shared diffusion model on your own images. "
         "Run it without a command to open the terminal app.",
    epilog=EXAMPLES,
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@contextmanager
def _friendly_errors() -> Iterator[None]:
    try:
        yield
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USER_ERROR) from None
    except HubCallError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_HUB_ERROR) from None
    except Cancelled as exc:
        typer.echo(f"stopped: {exc}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: the next `feddiffuse-client join` resumes from the last "
                   "finished epoch", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _print_version(value: bool) -> None:
    if value:
        version()
        raise typer.Exit()


@app.callback()
def _root(ctx: typer.Context,
          show_version: Annotated[bool, typer.Option(
              "--version", metavar="", help="Print the version and exit.",
              callback=_print_version, is_eager=True)] = False) -> None:
    """Without a command: open the terminal app."""
    if ctx.invoked_subcommand is None:
        from .tui.app import ClientApp

        ClientApp().run()


@app.command(epilog="Example: feddiffuse-client join --hub https://hub.example.org:8000 "
                    "--token T --data ~/Pictures/archive  (then plain `feddiffuse-client join` "
                    "rejoins with the saved settings)")
def join(
    hub: Annotated[str | None, typer.Option(help="The hub's URL, e.g. http://hub:8000 "
                                                 "(default: the last one used).")] = None,
    token: Annotated[str | None, typer.Option(help="Your token from the hub operator "
                                                   "(default: the one saved for this hub).",
                                              envvar="FEDDIFFUSE_TOKEN")] = None,
    data: Annotated[Path | None, typer.Option(help="The folder of your images "
                                                   "(default: the last one used).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cuda, mps or cpu "
                                                    "(default: the last one used, else auto).")
                      ] = None,
    ca_cert: Annotated[Path | None, typer.Option(
        "--ca-cert", help="A PEM file of the certificate authority that signed the hub's TLS "
                          "certificate, for a hub with a private or self-signed certificate "
                          "(remembered for this hub).")] = None,
    once: Annotated[bool, typer.Option(
        "--once", metavar="", help="Do a single round, then exit (after the last round: once "
                                   "the final model is fetched).")] = False,
    wait: Annotated[bool, typer.Option("--wait", metavar="",
                                       help="Keep trying when a hub never reached "
                                                      "before is down (a known hub is "
                                                      "always retried).")] = False,
    max_retries: Annotated[int | None, typer.Option(help="Give up after this many failed "
                                                         "tries of one network call (default: "
                                                         "never).", min=1)] = None,
    backoff_initial: Annotated[float, typer.Option(hidden=True, min=0.0)] = 1.0,
    backoff_max: Annotated[float, typer.Option(hidden=True, min=0.0)] = 60.0,
    poll: Annotated[float, typer.Option(hidden=True, min=0.01)] = 5.0,
) -> None:
    """Join a federation and take part in its rounds: download, train, upload, repeat."""
    with _friendly_errors():
        from .backoff import Backoff
        from .console import ConsoleReporter
        from .participant import Participant, ParticipantOptions
        from .session import JoinRequest, make_hub_client, resolve
        from .session import join as join_hub
        from .settings import Settings

        settings = Settings.load()
        request = resolve(JoinRequest(hub, token, str(data) if data else None, device or "",
                                      str(ca_cert) if ca_cert else None), settings)
        backoff = Backoff(initial=backoff_initial, maximum=max(backoff_max, backoff_initial),
                          max_attempts=max_retries)
        reporter = ConsoleReporter()

        def on_retry(what: str, attempt: int, delay: float, exc: Exception) -> None:
            reporter.line(f"retry: {what} failed ({exc}); attempt {attempt + 1} in "
                          f"{delay:.1f} s")

        joined = join_hub(request, wait=wait, backoff=backoff, on_retry=on_retry,
                          settings=settings)
        reporter.line(f"Hub {joined.url}; images: {joined.scan.path} ({joined.scan.summary()}).")
        stop = threading.Event()
        _stop_on_sigterm(stop)
        options = ParticipantOptions(data_dir=joined.data_dir, device=joined.device, once=once,
                                     backoff=backoff, poll_s=poll,
                                     poll_max_s=max(poll, backoff.maximum))
        with joined.store.lock(), make_hub_client(joined.url, joined.token,
                                                    ca_cert=joined.ca_cert) as client:
            outcome = Participant(client, joined.store, options, reporter, stop).run()
        if outcome.finished:
            reporter.line("The federation is finished; `feddiffuse-client sample` draws "
                          "images from your final model.")
        else:
            reporter.line(f"Done: round(s) {', '.join(map(str, outcome.rounds_done))}.")


def _stop_on_sigterm(stop: threading.Event) -> None:
    """SIGTERM (systemd, docker stop) stops like Ctrl-C: at the next step, state kept."""
    if threading.current_thread() is threading.main_thread():
        def handler(_signum, _frame) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, handler)


@app.command()
def sample(
    n: Annotated[int, typer.Option("--n", help="How many images.", min=1, max=1024)] = 64,
    steps: Annotated[int, typer.Option(
        help="Sampling steps (1000: the full ancestral chain with --sampler ddpm).",
        min=1, max=1000)] = 50,
    sampler: Annotated[str, typer.Option(
        help="ddim (fast, the default) or ddpm (ancestral, as the paper sampled, with "
             "--steps 1000; fewer steps respace the chain).")] = "ddim",
    clip_x0: Annotated[bool | None, typer.Option(
        "--clip-x0/--no-clip-x0", metavar="",
        help="Clip the predicted x0 to [-1, 1] at every step (default: yes for ddim, no "
             "for ddpm, as the paper).")] = None,
    out: Annotated[Path, typer.Option(help="Where to write the PNG grid.")] = Path("grid.png"),
    hub: Annotated[str | None, typer.Option(help="Which hub's model (default: the last "
                                                 "one used).")] = None,
    device: Annotated[str, typer.Option(help="auto, cuda, mps or cpu.")] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed of the samples.")] = 0,
) -> None:
    """Sample images from your current model (the global model plus your personal segments)."""
    with _friendly_errors():
        from .sampling import sample_grid
        from .status import newer_model_note

        store = _store_for(hub)
        result = sample_grid(store, n, steps, out, device=device, seed=seed, sampler=sampler,
                             clip_x0=clip_x0)
        typer.echo(f"{result.description}: wrote {result.path}")
        newer = newer_model_note(store)
        if newer:
            typer.echo(f"Note: {newer}")
        if result.note:
            typer.echo(f"Note: {result.note}")


@app.command(epilog="Example: feddiffuse-client audit --n 64 --out audit.png  (nothing is "
                    "sent anywhere: the model and your images stay on this computer)")
def audit(
    n: Annotated[int, typer.Option("--n", help="How many samples to draw and check.",
                                   min=1, max=4096)] = 64,
    steps: Annotated[int, typer.Option(help="DDIM sampling steps.", min=1, max=1000)] = 50,
    seed: Annotated[int, typer.Option(help="Random seed of the samples.")] = 0,
    data: Annotated[Path | None, typer.Option(help="The folder of your images (default: "
                                                   "the last one used).")] = None,
    out: Annotated[Path | None, typer.Option(help="Where to write the PNG of the closest "
                                                  "pairs (default: audits/ in the hub's "
                                                  "state folder).")] = None,
    hub: Annotated[str | None, typer.Option(help="Which hub's model (default: the last "
                                                 "one used).")] = None,
    device: Annotated[str, typer.Option(help="auto, cuda, mps or cpu.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print the result as one "
                                                                     "JSON object.")] = False,
) -> None:
    """Check whether your model reproduces your own images (memorisation audit, on this
    computer only): sample it, find each sample's nearest image of yours, and count the
    samples closer than your images are to each other."""
    with _friendly_errors():
        from .audit import run_audit
        from .settings import Settings

        store = _store_for(hub)
        saved = Settings.load().data_dir
        folder = data or (Path(saved) if saved else None)
        if folder is None:
            raise UserError("No image folder known; pass --data with the folder of your "
                            "images.")
        shown: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            quarter = int(4 * done / total) if total else 4
            if quarter > shown.get(stage, 0):
                shown[stage] = quarter
                typer.echo(f"  {stage}: {100 * done / total:.0f}%", err=True)

        result = run_audit(store, folder, n, steps=steps, seed=seed, device=device, out=out,
                           progress=progress)
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2))
            return
        for line in result.lines():
            typer.echo(line)


@app.command()
def status(
    hub: Annotated[str | None, typer.Option(help="Which hub (default: the last one used).")
                   ] = None,
    offline: Annotated[bool, typer.Option("--offline", metavar="",
                                          help="Do not ask the hub, show only "
                                                            "the local state.")] = False,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print it as one JSON object.")
                       ] = False,
) -> None:
    """Print the hub, its current round, and what this client holds locally."""
    with _friendly_errors():
        from .status import status_lines, status_report

        store = _store_for(hub)
        if as_json:
            typer.echo(json.dumps(status_report(store, ask_hub=not offline), indent=2))
            return
        for label, value in status_lines(store, ask_hub=not offline):
            typer.echo(f"{label:<13}{value}")


def _store_for(hub: str | None):
    from .inputs import normalize_hub_url
    from .settings import Settings
    from .state import HubFolder

    url_text = hub or Settings.load().hub_url
    if not url_text:
        raise UserError("No hub yet; join one first with feddiffuse-client join --hub URL "
                        "--token T --data DIR.")
    store = HubFolder(normalize_hub_url(url_text))
    if not store.exists():
        raise UserError(f"This client has not joined {store.url}; run feddiffuse-client join "
                        "first.")
    return store


@app.command()
def version() -> None:
    """Print the client's version and the core version it is pinned to."""
    from importlib.metadata import version as dist_version

    typer.echo(f"feddiffuse-client {dist_version('feddiffuse-client')} "
               f"(feddiffuse-core {dist_version('feddiffuse-core')})")


def main() -> None:
    app(prog_name="feddiffuse-client")


if __name__ == "__main__":  # pragma: no cover
    main()
