"""The `feddiffuse-hub` Typer application."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from feddiffuse.shared.privacy.options import (
    DP_BUDGET_HELP,
    DP_CLIP_HELP,
    DP_DELTA_HELP,
    DP_HELP,
    DP_NOISE_HELP,
    check_budget,
)
from feddiffuse.shared.recipes import DEFAULT_RECIPE, RECIPE_HELP

from ..limits import ServeLimits
from ._common import HubDir, fail, user_errors
from .rounds import round_app
from .tokens import token_app

app = typer.Typer(
    help="FedDiffuse hub: run federated rounds of diffusion-model training over HTTP(S).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.add_typer(token_app, name="token")
app.add_typer(round_app, name="round")


StoreOption = Annotated[str | None, typer.Option(
    "--store", help="State in PostgreSQL: postgresql://USER@HOST:PORT/DATABASE, no password "
    "(PGPASSWORD, ~/.pgpass or a libpq service file). Default: SQLite in the hub directory.",
    show_default=False)]
BlobsOption = Annotated[str | None, typer.Option(
    "--blobs", help="Blobs in S3: s3://BUCKET/PREFIX (keys from AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY). Default: the blob folder in the hub directory.",
    show_default=False)]
EndpointOption = Annotated[str | None, typer.Option(
    "--s3-endpoint", help="URL of an S3-compatible service (default: AWS's).",
    show_default=False)]


@app.command()
def version() -> None:
    """Print the hub's version and the core version it is pinned to."""
    from importlib.metadata import version as dist_version

    typer.echo(f"feddiffuse-hub {dist_version('feddiffuse-hub')} "
               f"(feddiffuse-core {dist_version('feddiffuse-core')})")


@app.command()
def init(
    hub_dir: Annotated[Path, typer.Argument(help="A new (or empty) folder for the hub.",
                                            show_default=False)],
    preset: Annotated[str, typer.Option(help="UNet preset: paper-fmnist, paper-celeba, tiny.",
                                        show_default=False)],
    method: Annotated[str, typer.Option(help="full, usplit, ulatdec or udec.",
                                        show_default=False)],
    rounds: Annotated[int, typer.Option(help="Number of federated rounds.",
                                        show_default=False)],
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.",
                                              show_default=False)],
    min_clients: Annotated[int, typer.Option(
        help="Quorum: reports needed to close a round at its deadline; also the number of "
             "enrolled clients a round needs to open.")] = 1,
    round_timeout: Annotated[float | None, typer.Option(
        help="Seconds a round stays open before it closes with the quorum (default: no "
             "deadline; a round waits for every participant).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights, USplit pairs and "
                                           "training seeds.")] = 0,
    batch_size: Annotated[int | None, typer.Option(help="Clients' batch size (default: the "
                                                        "preset's).")] = None,
    lr: Annotated[float | None, typer.Option(
        help="Clients' peak learning rate (default: the recipe's).")] = None,
    recipe: Annotated[str, typer.Option(help=RECIPE_HELP)] = DEFAULT_RECIPE,
    name: Annotated[str | None, typer.Option(help="Federation name (default: the folder's "
                                                  "name).")] = None,
    uplink_codec: Annotated[str, typer.Option(
        help="How clients encode their updates: fp32, bf16, int8, topk:F or topk:F+int8 "
             "(lossy ones with error feedback).")] = "fp32",
    downlink_codec: Annotated[str, typer.Option(
        help="How the hub sends models: fp32 (the weights), or a lossy codec (the initial "
             "model in its dense form, then each round's update).")] = "fp32",
    dp: Annotated[str | None, typer.Option(help=DP_HELP)] = None,
    dp_clip: Annotated[float | None, typer.Option(help=DP_CLIP_HELP)] = None,
    dp_noise_multiplier: Annotated[float | None, typer.Option(help=DP_NOISE_HELP)] = None,
    dp_delta: Annotated[float | None, typer.Option(help=DP_DELTA_HELP)] = None,
    dp_epsilon_budget: Annotated[float | None, typer.Option(help=DP_BUDGET_HELP)] = None,
    store: StoreOption = None,
    blobs: BlobsOption = None,
    s3_endpoint: EndpointOption = None,
) -> None:
    """Create a hub: a SQLite database, a blob folder and the initial global model (or, with
    --store and --blobs, a directory whose hub.json names the database and the bucket)."""
    from feddiffuse.shared.privacy import privacy_from_options

    from ..backends import Backends
    from ..create import init_hub
    from ..settings import FederationSettings

    with user_errors():
        privacy = privacy_from_options(dp, dp_clip, dp_noise_multiplier, dp_delta,
                                       dp_epsilon_budget)
        allowed = check_budget(privacy, rounds)
        backends = Backends(store, blobs, s3_endpoint).validated()
        settings = FederationSettings(
            name=name or hub_dir.resolve().name or "feddiffuse", preset=preset, method=method,
            rounds=rounds, local_epochs=local_epochs, min_clients=min_clients,
            round_timeout_s=round_timeout, seed=seed, batch_size=batch_size, lr=lr,
            recipe=recipe, uplink_codec=uplink_codec, downlink_codec=downlink_codec,
            privacy=None if privacy is None else privacy.model_dump())
        token, version_ = init_hub(hub_dir, settings, backends=backends)
    typer.echo(f"Created hub {settings.name!r} in {hub_dir}: {method} on {preset}, {rounds} "
               f"round(s) x {local_epochs} local epoch(s), quorum {min_clients}, recipe "
               f"{recipe}, codecs up {uplink_codec} / down {downlink_codec}; initial "
               f"global version {version_[:16]}...", err=True)
    if privacy is not None:
        typer.echo(f"Privacy: {privacy.describe()}"
                   + (f"; the budget allows {allowed} of the {rounds} rounds, after which the "
                      "federation finishes" if allowed < rounds else ""), err=True)
    typer.echo("Admin token (shown once; keep it safe):", err=True)
    typer.echo(token)


@app.command()
def serve(
    hub_dir: Annotated[Path | None, typer.Argument(
        help="The hub directory (optional with --store and --blobs).", show_default=False)
    ] = None,
    store: StoreOption = None,
    blobs: BlobsOption = None,
    s3_endpoint: EndpointOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info or warning.")] = "info",
    header_timeout: Annotated[float, typer.Option(
        help="Seconds a connection may take to send a request's headers.")
    ] = ServeLimits.header_timeout_s,
    body_idle_timeout: Annotated[float, typer.Option(
        help="Longest silence (seconds) within a request body before it is cut off (408).")
    ] = ServeLimits.body_idle_timeout_s,
    max_uploads: Annotated[int, typer.Option(
        help="Uploads received at once; one more is answered 503 with Retry-After.")
    ] = ServeLimits.max_uploads_in_progress,
) -> None:
    """Serve the hub's API with uvicorn (one log line per request and per round event). A
    hub in PostgreSQL can be served by any number of these processes at once."""
    import uvicorn

    from ..app import create_app
    from ..backends import Backends
    from ..coordinator import Hub
    from ..paths import HubPaths
    from ..server import uvicorn_config

    with user_errors():
        given = Backends(store, blobs, s3_endpoint)
        if hub_dir is None and (store is None or blobs is None):
            fail("Give the hub directory, or both --store and --blobs.")
        if hub_dir is not None and not given.embedded:
            if given != Backends.of(HubPaths(hub_dir)):
                fail(f"--store, --blobs and --s3-endpoint differ from {hub_dir}'s hub.json; "
                     "give the directory alone, or the options alone.")
        backends = given.validated() if hub_dir is None else None
        if (tls_cert is None) != (tls_key is None):
            fail("Give both --tls-cert and --tls-key, or neither.")
        for f in (tls_cert, tls_key):
            if f is not None and not f.is_file():
                fail(f"{f} is not a file; give the path of a PEM file.")
        if not 0 < port < 65536:
            fail("--port must be between 1 and 65535.")
        if log_level not in ("debug", "info", "warning"):
            fail("--log-level must be debug, info or warning.")
        limits = ServeLimits(header_timeout_s=header_timeout,
                             body_idle_timeout_s=body_idle_timeout,
                             max_uploads_in_progress=max_uploads).validated()
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s "
                            "%(name)s: %(message)s", force=True)
        hub = Hub.open(hub_dir, serve=True, backends=backends)
    scheme = "https" if tls_cert else "http"
    try:
        logging.getLogger("feddiffuse.hub").info(
            "serving %r on %s://%s:%d/api/v1 (docs at /api/v1/docs)%s", hub.settings.name,
            scheme, host, port, " as a replica (the one holding the lease runs the rounds)"
            if hub.replicated else "")
        config = uvicorn_config(create_app(hub, limits=limits), limits, host=host, port=port,
                                ssl_certfile=str(tls_cert) if tls_cert else None,
                                ssl_keyfile=str(tls_key) if tls_key else None,
                                log_config=None, access_log=False, log_level=log_level,
                                timeout_graceful_shutdown=10)
        uvicorn.Server(config).run()
    finally:
        hub.close()


@app.command()
def status(
    hub_dir: HubDir,
    as_json: Annotated[bool, typer.Option("--json", help="Print the HubStatus JSON.")] = False,
) -> None:
    """The federation, the current round, who reported, the deadline, and the history."""
    from ..coordinator import Hub
    from .render import render_status

    with user_errors(), Hub.open(hub_dir) as hub:
        report = hub.status()
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        typer.echo(render_status(report, datetime.now(tz=UTC)))


@app.command()
def export(
    hub_dir: HubDir,
    out: Annotated[Path, typer.Argument(help="Where to write the .safetensors file.",
                                        show_default=False)],
    model: Annotated[str, typer.Option(
        help="'sample': the model to sample from (the recipe's EMA of the global model, when "
             "it keeps one); 'global': the last aggregate, which training continues from.")
    ] = "sample",
) -> None:
    """Write the current model (a safetensors file whose sha256 is its version)."""
    from ..coordinator import Hub

    with user_errors():
        if out.is_dir():
            fail(f"{out} is a folder; give a file name such as {out / 'global.safetensors'}.")
        if not out.parent.is_dir():
            fail(f"The folder {out.parent} does not exist; create it first.")
        if model not in ("sample", "global"):
            fail(f"Unknown --model {model!r}; choose 'sample' or 'global'.")
        with Hub.open(hub_dir) as hub:
            version_, size = hub.export(out, model)
            fed = hub.store.federation()
    state = "final" if fed.finished else "current"
    what = ("EMA of the global model (the one to sample from)"
            if version_ == fed.sample_version else "global model")
    typer.echo(f"Wrote the {state} {what} (version {version_[:16]}..., "
               f"{size / 1e6:.2f} MB) to {out}.")


@app.command()
def migrate(
    src_dir: Annotated[Path, typer.Argument(help="An embedded hub (SQLite) to move.",
                                            show_default=False)],
    store: Annotated[str, typer.Option("--store", help="The empty PostgreSQL database to "
                                       "move it into: postgresql://USER@HOST:PORT/DATABASE.",
                                       show_default=False)],
    blobs: BlobsOption = None,
    s3_endpoint: EndpointOption = None,
) -> None:
    """Move an embedded hub's state into PostgreSQL (and its blobs into S3 with --blobs);
    the directory then names them in hub.json. Stop `serve` first."""
    from ..migrate import migrate_hub

    with user_errors():
        report = migrate_hub(src_dir, store, blobs=blobs, s3_endpoint=s3_endpoint)
    typer.echo(report)


def main() -> None:
    app()
