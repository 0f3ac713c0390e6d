"""`food101`: run the benchmark, one stage of it, the weekly deployment, or a prediction.

Errors a user can fix (a bad parameter, a missing file, unreachable data) are printed as one
clear message with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from food101 import env, runlock
from food101.config import Config, ConfigError, dump_params, find_params_file, load_config
from food101.errors import Food101Error

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Benchmark image classifiers on Food-101 and publish a report that says which to deploy.",
)
log = logging.getLogger("food101")
T = TypeVar("T")

ProfileOpt = Annotated[
    str | None,
    typer.Option("--profile", "-p", help="Named overrides from profiles/: demo, quick or full."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override one parameter, e.g. train.epochs=3 (repeatable)."),
]
ParamsOpt = Annotated[
    Path | None,
    typer.Option("--params", help="The params.yaml to use (default: $FOOD101_PARAMS, else the nearest one above)."),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]
WaitOpt = Annotated[
    bool, typer.Option("--wait", help="If another run holds these outputs, wait for it instead of exiting.")
]


def _setup(params: Path | None, verbose: bool) -> Path:
    """Find params.yaml, point the stack's state at the project, configure logging."""
    params_file = (params.resolve() if params else find_params_file())
    if not params_file.is_file():
        raise ConfigError(f"{params_file} does not exist; pass --params PATH to an existing params.yaml")
    env.configure(params_file.parent)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("alembic", "mlflow.store", "httpx", "urllib3", "great_expectations"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return params_file


def _load(params_file: Path, profile: str | None, overrides: list[str] | None) -> Config:
    return load_config(params_file, profile=profile, overrides=overrides or [])


@app.command()
def run(
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    params: ParamsOpt = None,
    wait: WaitOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run the whole benchmark flow in this process (embedded Prefect API, local MLflow)."""
    params_file = _setup(params, verbose)
    config = _load(params_file, profile, set_)  # fail fast on bad parameters, before Prefect starts
    from food101.processes import start_reaper

    overrides = dict(_pairs(set_))
    with runlock.run_lock(config, wait=wait):  # before Prefect starts; the flow takes it again
        start_reaper()

        def work() -> dict:
            from flows.benchmark import benchmark, flow_for

            flow = flow_for(config, benchmark)
            return flow(profile=profile, overrides=overrides or None, params_file=str(params_file))

        result = _until_signalled(config, work)
    report = result["report"]
    typer.echo("")
    typer.echo(f"Benchmark finished ({config.profile}). Recommended model: {report.get('recommended')}")
    for model, reason in result["failures"].items():
        typer.echo(f"  failed: {model}: {reason}")
    typer.echo(f"Report:  {report['report_html']}")
    typer.echo(f"         {report['report_md']}")
    typer.echo(f"MLflow:  {_mlflow_hint(config)} (parent run {result['parent_run_id']})")


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="A stage of the DAG: download, validate, preprocess, train, evaluate, "
                                             "export, robustness, ensemble, confusion or report.")],
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="The model, for the per-model stages (train, evaluate, export, robustness).")] = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    params: ParamsOpt = None,
    wait: WaitOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run one stage without Prefect's engine: what `dvc repro` calls."""
    params_file = _setup(params, verbose)
    config = _load(params_file, profile, set_)
    from flows.benchmark import PER_MODEL_STAGES, STAGES

    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    entry = STAGES[name].fn
    if name in PER_MODEL_STAGES:
        if model not in config.models:
            raise ConfigError(f"stage {name} needs --model, one of {config.models}")
        args: tuple = (config, model)
    else:
        if model:
            raise ConfigError(f"stage {name} runs over all models; drop --model")
        args = (config,)
    with runlock.run_lock(config, wait=wait):
        result = _until_signalled(config, lambda: entry(*args))
    log.info("stage %s done: %s", name, result)


def _until_signalled(config: Config, work: Callable[[], T]) -> T:
    """Run `work`; on SIGTERM/SIGINT stop children, mark MLflow runs KILLED, remove temporary
    files, say so in one line and exit 128+signal at once (the work's threads are not waited for)."""
    try:
        return runlock.run_until_signalled(work)
    except runlock.Interrupted as exc:
        try:
            typer.secho(f"error: {exc}: {runlock.shut_down(config)}", fg=typer.colors.RED, err=True)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(exc.exit_code)


@app.command()
def serve(
    profile: ProfileOpt = None, set_: SetOpt = None, params: ParamsOpt = None, verbose: VerboseOpt = False
) -> None:
    """Register deployment food101/benchmark (weekly schedule from params) and run its flow runs.

    Needs a Prefect server (PREFECT_API_URL). Trigger a run with
    `prefect deployment run food101/benchmark`. --params, --profile and --set (paths included)
    hold for every run; a run started through the API may pick a profile and override other
    parameters, never paths.*, orchestration.*, data.local_path or data.url (food101.serving).
    """
    params_file = _setup(params, verbose)
    config = _load(params_file, profile, set_)
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError(
            "food101 serve needs a Prefect server: start one with `make prefect-server`, then "
            'eval "$(make -s server-env)" (sets PREFECT_API_URL and its PREFECT_API_AUTH_STRING)'
        )
    from flows.benchmark import serve_deployment

    serve_deployment(config, params_file, profile=profile, overrides=dict(_pairs(set_)))


@app.command("params")
def params_cmd(
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    params: ParamsOpt = None,
    write: Annotated[Path | None, typer.Option("--write", help="Write to this file instead of printing.")] = None,
) -> None:
    """Print the effective parameters (a profile merged into params.yaml), e.g. for `dvc repro`."""
    params_file = params.resolve() if params else find_params_file()
    text = dump_params(_load(params_file, profile, set_))
    if write:
        from food101.io import write_text

        write_text(write, text)
        typer.echo(f"wrote {write}")
    else:
        typer.echo(text, nl=False)


# More rows than this from `food101 models --filter` are counted, not listed.
MODELS_LISTED = 200


@app.command("models")
def models_cmd(
    filter_: Annotated[str, typer.Option("--filter", "-f", help="Only names containing this text; lists timm's "
                                         "matching models too (timm:NAME).")] = "",
) -> None:
    """List what can be named in `models:`: torchvision's classifiers (and timm's, under --filter),
    with parameter count, default weights and their input size. In-house models are named
    package.module:function (README, "Adding a model")."""
    from food101.models import available_models, describe_model

    names, timm_count = available_models(filter_)
    typer.echo(f"{'name':<44} {'params':>9}  {'input':>5}  default weights")
    for name in names[:MODELS_LISTED]:
        row = describe_model(name)
        typer.echo(f"{name:<44} {row['parameters'] / 1e6:8.1f}M  {row['input_size'] or '':>5}  {row['weights']}")
    if len(names) > MODELS_LISTED:
        typer.echo(f"... and {len(names) - MODELS_LISTED} more: narrow --filter")
    if timm_count is None:
        typer.echo("timm is not installed (pip install 'food101-benchmark[timm]'): no timm:NAME models")
    elif not filter_:
        typer.echo(f"and {timm_count} timm models, named timm:NAME: list them with --filter TEXT")


RuntimeOpt = Annotated[
    str,
    typer.Option("--runtime", "-r", help="torch (default): the registered state dict in PyTorch, exactly as "
                 "evaluated; onnx: the registered ONNX graph in ONNX Runtime, as serve-model runs it."),
]
PrecisionOpt = Annotated[
    str | None,
    typer.Option("--precision", help="With --runtime onnx: fp32 or int8 (default: the precision the champion's "
                 "serving tags recommend, fp32 when they recommend PyTorch)."),
]


@app.command()
def predict(
    photos: Annotated[list[Path], typer.Argument(help="JPEG photos of dishes.")],
    top: Annotated[int, typer.Option("--top", "-k", help="How many dishes to list per photo.")] = 5,
    runtime: RuntimeOpt = "torch",
    precision: PrecisionOpt = None,
    profile: ProfileOpt = None,
    params: ParamsOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Classify photos with the champion model a benchmark registered.

    Without --profile, the champion registered most recently (of any profile) answers, and the
    output names its profile. The default runtime is torch, the reference the report's accuracy
    was measured with; --runtime onnx checks the artefact serve-model ships.
    """
    params_file = _setup(params, verbose)
    config = _load(params_file, profile, None)
    if precision is not None and runtime != "onnx":
        raise ConfigError(f"--precision {precision} applies to --runtime onnx only (PyTorch runs fp32); "
                          "add --runtime onnx or drop --precision")
    from food101.registry import latest_champion_profile
    from food101.registry import predict as predict_photos

    chosen = profile or latest_champion_profile(config)
    results = predict_photos(config, photos, top_k=top, profile=chosen, runtime=runtime, precision=precision)
    how = "" if profile else ", the most recent champion; --profile NAME picks another"
    first = results[0]
    typer.echo(f"model {first['model']} (version {first['version']} of {first['registered_model']}, "
               f"{first['runtime']}, profile {chosen}{how})")
    for photo, ranked in zip(photos, results, strict=True):
        typer.echo(f"{photo}:")
        for item in ranked["top"]:
            typer.echo(f"  {item['probability']:6.1%}  {item['dish']}")


LOOPBACK_NAMES = ("localhost",)


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() in LOOPBACK_NAMES


@app.command("serve-model")
def serve_model(
    profile: ProfileOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback unless --allow-remote).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8080,
    precision: Annotated[str | None, typer.Option("--precision", help="fp32 or int8 (default: the precision the "
                                                  "champion's serving tags recommend).")] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="ONNX Runtime intra-op threads "
                                                "(default: export.threads, what the report timed).")] = None,
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Listen on a non-loopback address: the "
                                               "server has no authentication or TLS, so put a proxy in front.")]
    = False,
    params: ParamsOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve the champion's ONNX model over HTTP until Ctrl-C or SIGTERM.

    POST /predict with a JPEG or PNG body (or multipart field `file`) returns the top-5 dishes as
    JSON; GET /health names the model. Without --profile, the most recent champion (as predict).
    The precision is the one the champion's serving tags recommend (fp32 when they recommend
    PyTorch: the fp32 graph matches it within export.max_abs_logit_diff).
    """
    params_file = _setup(params, verbose)
    config = _load(params_file, profile, None)
    if not _is_loopback(host) and not allow_remote:
        raise ConfigError(
            f"serve-model would listen on {host}, reachable from other machines, and the server has no "
            "authentication or TLS: use --host 127.0.0.1, or pass --allow-remote behind a proxy that adds them")
    from food101.model_server import serve
    from food101.registry import latest_champion_profile, load_champion_onnx

    chosen = profile or latest_champion_profile(config)
    served = load_champion_onnx(config, precision, profile=chosen, threads=threads or config.export.threads)
    typer.echo(f"serving {served.name}, profile {chosen}, on http://{host}:{port} (POST /predict, GET /health)")
    sys.stdout.flush()
    serve(served, host, port)


def _pairs(items: list[str] | None) -> list[tuple[str, object]]:
    from food101.config import parse_override

    return [parse_override(item) for item in items or []]


def _mlflow_hint(config: Config) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"mlflow ui --backend-store-uri sqlite:///{config.paths.tracking_db}"


def main() -> None:
    try:
        app()
    except (ConfigError, Food101Error) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
