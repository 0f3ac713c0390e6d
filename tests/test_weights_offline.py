"""Missing pretrained weights, whether or not this machine has internet.

torch.hub downloads through urllib, which honours the standard proxy variables: pointing them at a
local port that refuses connections makes every download fail at once, online and offline alike.
"""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from food101.models import WeightsUnavailable, build_model, expected_weights_path, pretrained_weights

# The smallest of the three models: the least work if the error path ever builds it.
SMALL = "mobilenet_v3_large"


@pytest.fixture
def no_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread) -> Iterator[Path]:
    """An empty TORCH_HOME, and every http(s) request sent to a bound, non-listening local port."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused
        proxy = f"http://127.0.0.1:{closed.getsockname()[1]}"
        for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.setenv(name, proxy)
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        # urlopen keeps the opener (and the proxies it read) of its first call: start a fresh one.
        monkeypatch.setattr(urllib.request, "_opener", None)
        yield home


def test_missing_weights_are_a_clear_error_online_or_offline(no_download: Path) -> None:
    expected = expected_weights_path(pretrained_weights(SMALL))
    assert expected == no_download / "hub" / "checkpoints" / "mobilenet_v3_large-5c1a4163.pth"
    with pytest.raises(WeightsUnavailable) as caught:
        build_model(SMALL, 5, pretrained=True)
    message = str(caught.value)
    assert str(expected) in message and f"TORCH_HOME={no_download}" in message
    assert "could not be downloaded" in message and "train.pretrained=false" in message
    # The download went to the refusing local port (offline, DNS would fail instead): no network used.
    assert "Connection refused" in message
    assert not expected.exists()  # nothing half-downloaded left behind
