"""Notifications: a real HTTP receiver on 127.0.0.1 hears of each regressed benchmark exactly once.

The comparisons come from the history functions on real MLflow (SQLite in tmp), the message goes
out through Prefect's CustomWebhookNotificationBlock, as the flow sends it.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from food101 import history, notify
from food101.tracking import client_for
from tests.test_history import BASE_CORRECT, benchmark, isolated_config, metrics


class Receiver:
    """An HTTP server in a thread that keeps every POST body it gets."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        received = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append({"path": self.path, "json": json.loads(body)})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:  # keep pytest's output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def tracking_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tracking-notify")


@pytest.fixture
def receiver():
    with Receiver() as running:
        yield running


def compared(config, top1_now: float, correct_now: list[bool]) -> dict:
    """Two benchmarks in a row, compared as the flow compares them."""
    benchmark(config, {"resnet50": metrics(0.80), "efficientnet_b0": metrics(0.75)},
              {"resnet50": BASE_CORRECT, "efficientnet_b0": BASE_CORRECT})
    run, current = benchmark(config, {"resnet50": metrics(top1_now), "efficientnet_b0": metrics(0.75)},
                             {"resnet50": correct_now, "efficientnet_b0": BASE_CORRECT}, finish=False)
    previous = history.find_previous(config, client_for(config), run.run_id, current.key)
    return history.compare(current, previous, config.alerts)


def test_a_regressed_benchmark_notifies_once_with_the_facts(tmp_path, tracking_root, receiver):
    config = isolated_config(tmp_path, tracking_root, "regressed", alerts__notify_url=receiver.url)
    worse = [ok and i >= 19 for i, ok in enumerate(BASE_CORRECT)]  # 15 photos lost, none gained
    comparison = compared(config, 0.50, worse)
    assert [r["metric"] for r in comparison["regressions"]] == ["top1"]

    assert notify.notify_regressions(config, comparison) is True
    assert len(receiver.posts) == 1
    message = receiver.posts[0]["json"]
    assert receiver.posts[0]["path"] == "/hook" and message["event"] == "regression"
    [finding] = message["findings"]
    assert finding["model"] == "resnet50" and finding["metric"] == "top1"
    assert finding["change"] == "0.8 -> 0.5 (-37.5%)"
    assert finding["test"].startswith("mcnemar p=") and finding["p_value"] == pytest.approx(2 * 0.5**15)
    assert message["report"] == str(config.paths.reports / "report.html")
    assert message["run_id"] == comparison["current"]["run_id"]
    assert "resnet50 top1: 0.8 -> 0.5" in message["text"] and "report.html" in message["text"]

    # The regression then fails the run (alerts.fail_on_regression): no second message for that.
    error = history.RegressionDetected(comparison["regressions"])
    assert notify.notify_failure(config, error) is False
    assert len(receiver.posts) == 1


def test_a_benchmark_without_regression_sends_nothing(tmp_path, tracking_root, receiver):
    config = isolated_config(tmp_path, tracking_root, "steady", alerts__notify_url=receiver.url)
    comparison = compared(config, 0.80, BASE_CORRECT)
    assert comparison["regressions"] == []
    assert notify.notify_regressions(config, comparison) is False
    assert receiver.posts == []


def test_a_failed_benchmark_notifies_and_notification_is_off_by_default(tmp_path, tracking_root, receiver):
    config = isolated_config(tmp_path, tracking_root, "failed", alerts__notify_url=receiver.url)
    assert notify.notify_failure(config, RuntimeError("every model failed")) is True
    [post] = receiver.posts
    assert post["json"]["event"] == "failure" and "RuntimeError: every model failed" in post["json"]["error"]

    off = isolated_config(tmp_path, tracking_root, "off")
    assert off.alerts.notify_url is None and off.alerts.notify_block is None
    regressed = {"regressions": [{"model": "resnet50", "metric": "top1", "reason": "fell", "test": "mcnemar"}]}
    assert notify.notify_regressions(off, regressed) is False
    assert len(receiver.posts) == 1


def test_the_flow_failure_hook_notifies_with_the_runs_own_parameters(prefect_harness, tmp_path, receiver):
    """The hook the benchmark flow carries, run by Prefect on a flow that fails the same way."""
    from prefect import flow

    from tests.conftest import REPO, generated_overrides

    @flow(on_failure=[notify.failure_hook])
    def failing(profile: str | None = None, overrides: dict | None = None, params_file: str | None = None) -> None:
        raise RuntimeError("every model failed")

    overrides = generated_overrides(tmp_path) | {"alerts.notify_url": receiver.url}
    state = failing(profile="demo", overrides=overrides, params_file=str(REPO / "params.yaml"), return_state=True)
    assert state.is_failed()
    [post] = receiver.posts
    assert post["json"]["event"] == "failure" and post["json"]["profile"] == "demo"
    assert "RuntimeError: every model failed" in post["json"]["text"]


def test_a_notify_url_that_is_not_http_is_refused_before_anything_runs(tmp_path):
    from food101.config import ConfigError

    with pytest.raises(ConfigError, match="alerts.notify_url must start with http:// or https://"):
        isolated_config(tmp_path, tmp_path, "bad-url", alerts__notify_url="hooks.slack.com/services/x")
