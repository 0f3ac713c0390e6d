"""Tell someone when a benchmark regressed or failed, through a Prefect notification block.

Off unless params.yaml sets `alerts.notify_url` (any webhook: Slack, Teams, an e-mail gateway;
sent with Prefect's CustomWebhookNotificationBlock as JSON with a `text` field and the findings)
or `alerts.notify_block` (the name of a notification block saved in the Prefect server, of any
type: Slack, Teams, e-mail...). A regressed benchmark sends one message naming each model,
metric, change and test, and where the report is; a failed one sends one naming the error.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx

from food101.config import Config
from food101.errors import Food101Error

log = logging.getLogger(__name__)

SENDER = "food101"


class NotificationError(Food101Error):
    """The notification block named in alerts.notify_block cannot be loaded."""


def report_location(config: Config) -> str:
    """Where the published report is (the HTML, self-contained)."""
    return str(Path(config.paths.reports) / "report.html")


def regression_message(comparison: dict[str, Any], report: str, profile: str) -> tuple[str, str, dict[str, Any]]:
    """(subject, body, JSON payload) for a comparison with regressions."""
    regressions = comparison.get("regressions") or []
    current = (comparison.get("current") or {}).get("run_id", "?")
    previous = (comparison.get("previous") or {}).get("run_id", "?")
    subject = (f"food101 benchmark ({profile}): {len(regressions)} regression"
               f"{'s' if len(regressions) != 1 else ''} since run {previous}")
    findings = [{
        "model": r["model"], "metric": r["metric"], "previous": r.get("previous"), "current": r.get("current"),
        "change": _change(r), "test": r.get("test"), "p_value": r.get("p_value"),
        "recipe_change": r.get("recipe_change"),
    } for r in regressions]
    lines = [f"- {f['model']} {f['metric']}: {f['change']} ({f['test']})"
             + (f"; recipe changed: {f['recipe_change']}" if f["recipe_change"] else "") for f in findings]
    body = "\n".join([*lines, f"Benchmark run {current}; report: {report}"])
    payload = {"text": f"{subject}\n{body}", "event": "regression", "profile": profile, "run_id": current,
               "previous_run_id": previous, "report": report, "findings": findings}
    return subject, body, payload


def failure_message(error: BaseException, report: str, profile: str) -> tuple[str, str, dict[str, Any]]:
    """(subject, body, JSON payload) for a benchmark that failed."""
    subject = f"food101 benchmark ({profile}) failed"
    body = f"{type(error).__name__}: {error}\nReport (if one was written): {report}"
    payload = {"text": f"{subject}\n{body}", "event": "failure", "profile": profile, "report": report,
               "error": f"{type(error).__name__}: {error}"}
    return subject, body, payload


def notify_regressions(config: Config, comparison: dict[str, Any]) -> bool:
    """One message when the comparison found regressions; nothing otherwise. True when sent."""
    if not comparison.get("regressions"):
        return False
    return send(config, *regression_message(comparison, report_location(config), config.profile))


def notify_failure(config: Config, error: BaseException) -> bool:
    """One message for a failed benchmark; a RegressionDetected was already notified. True when sent."""
    from food101.history import RegressionDetected

    if isinstance(error, RegressionDetected):
        return False
    return send(config, *failure_message(error, report_location(config), config.profile))


def send(config: Config, subject: str, body: str, payload: dict[str, Any]) -> bool:
    """Send through alerts.notify_block or alerts.notify_url; False when neither is set.

    A webhook that is down is logged as an error, not raised: the benchmark's results are
    already recorded and must not be lost to a chat server's outage.
    """
    alerts = config.alerts
    if not alerts.notify_block and not alerts.notify_url:
        return False
    block = _load_block(alerts.notify_block) if alerts.notify_block else _webhook(alerts.notify_url, payload)
    try:
        block.notify(body=body, subject=subject)
    except (httpx.HTTPError, OSError) as exc:
        log.error("could not notify %s: %s; check alerts.notify_url / alerts.notify_block", _target(config), exc)
        return False
    log.info("notified %s: %s", _target(config), subject)
    return True


def failure_hook(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect on_failure hook of the benchmark flow: notify with the flow run's own parameters."""
    from food101.config import load_config

    params = flow_run.parameters or {}
    config = load_config(Path(params["params_file"]) if params.get("params_file") else None,
                         params.get("profile"), params.get("overrides"))
    error = state.result(raise_on_failure=False)
    if isinstance(error, BaseException):
        notify_failure(config, error)
    else:
        notify_failure(config, RuntimeError(state.message or state.name))


def _webhook(url: str, payload: dict[str, Any]) -> Any:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    return CustomWebhookNotificationBlock(name=SENDER, url=url, method="POST", json_data=_escape(payload))


def _load_block(name: str) -> Any:
    from prefect.blocks.core import Block

    try:
        return Block.load(name)
    except ValueError as exc:
        raise NotificationError(f"alerts.notify_block {name!r} cannot be loaded ({exc}); save it in the Prefect "
                                "server first (as 'type/name', e.g. 'slack-webhook/food101') or set it to null"
                                ) from exc


def _escape(value: Any) -> Any:
    """The webhook block substitutes {{placeholders}} in its JSON: braces in our text stay literal."""
    if isinstance(value, str):
        return value.replace("{{", "{ {").replace("}}", "} }")
    if isinstance(value, dict):
        return {k: _escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape(v) for v in value]
    return value


def _change(regression: dict[str, Any]) -> str:
    before, after, relative = regression.get("previous"), regression.get("current"), regression.get("relative")
    if isinstance(before, float) and isinstance(after, float):
        text = f"{before:.4g} -> {after:.4g}"
        return text + (f" ({relative:+.1%})" if isinstance(relative, float) else "")
    return str(regression.get("reason", ""))


def _target(config: Config) -> str:
    return f"block {config.alerts.notify_block}" if config.alerts.notify_block else "the webhook"
