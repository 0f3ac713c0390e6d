"""export: the real stage on a cache of real sample photos and tiny models (ONNX, int8, timing probes)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from food101 import metrics
from food101.deploy_targets import recommend_targets
from food101.document import Para, Table
from food101.onnx_inference import INPUT_NAME, run_batches, session
from food101.tracking import client_for, experiment_id, tracking_uri
from tasks import export as ex
from tasks.preprocess import open_cache
from tests.conftest import make_config, single_torch_thread
from tests.test_evaluate import build_sample_cache, write_trained_model
from tests.test_train import mlmodel_flavours

MODELS = ["mobilenet_v3_small", "shufflenet_v2_x0_5"]
FAST = {
    "models": MODELS,
    "export__latency_warmup": 1,
    "export__latency_runs": 3,
    "export__throughput_batch": 4,
    "export__throughput_runs": 1,
    "export__calibration_size": 6,
    "export__calibration_batch": 4,
    "export__bootstrap_samples": 200,
    # untrained networks give near-equal logits, so near-ties may flip between runtimes
    "export__min_top1_agreement": 0.9,
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    config = make_config(root, **FAST)
    build_sample_cache(config, train_per_class=3)
    with single_torch_thread():
        for model in MODELS:
            write_trained_model(config, model)
        results = {m: ex.export.fn(config, m) for m in MODELS}
    return config, results


def test_export_writes_a_checked_onnx_with_dynamic_batch_and_parity(exported):
    config, results = exported
    for model in MODELS:
        folder = ex.export_dir(config, model)
        summary = ex.read_export(config, model)
        assert summary["status"] == "ok" and results[model]["opset"] == summary["opset"] >= 17
        graph = onnx.load(str(folder / ex.ONNX_FILE))
        onnx.checker.check_model(graph)
        assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis
        assert summary["parity"]["max_abs_logit_diff"] <= config.export.max_abs_logit_diff
        # the graph takes the cache's uint8 photos: any batch size, no Python preprocessing
        images = open_cache(config).images("test")
        sess = session(folder / ex.ONNX_FILE, 1)
        assert run_batches(sess, images[:3], 3).shape == (3, 5)
        assert run_batches(sess, images[:1], 1).shape == (1, 5)
        preprocess = ex.read_json(folder / ex.PREPROCESS_FILE)
        assert preprocess["crop"] == config.preprocess.crop and len(preprocess["classes"]) == 5
        assert len(summary["variants"]) == 3
        for variant in summary["variants"]:
            assert variant["latency_p95_ms"] >= variant["latency_p50_ms"] > 0
            assert variant["throughput_ips"] > 0 and variant["peak_rss_mb"] > 0 and variant["size_mb"] > 0


def test_a_probe_reports_its_own_peak_memory_not_the_process_that_started_it(exported):
    """The timing probe's peak memory is the runtime's own: a parent holding 1.5 GiB (as the flow
    process holds its data and models) used to be what every probe reported (ru_maxrss keeps the
    peak of the address space exec replaced)."""
    config, _ = exported
    held = np.ones(3 * 2**29, dtype=np.uint8)  # 1.5 GiB, every page touched
    timing = ex.probe_runtime("onnxruntime", ex.export_dir(config, MODELS[0]) / ex.INT8_FILE,
                              config.preprocess.crop, config.export)
    assert held[-1] == 1
    assert 0 < timing["peak_rss_mb"] < 1024  # a small int8 session, whatever its parent holds


def test_the_export_run_holds_the_fp32_graph_as_an_mlflow_onnx_model(exported, tmp_path, monkeypatch):
    """What the MLflow UI offers to load and serve is the ONNX graph (data), not a pickled model."""
    import mlflow.onnx

    config, _ = exported
    client = client_for(config)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(config))  # for runs:/ URIs, as a user would load it
    for model in MODELS:
        [run] = client.search_runs([experiment_id(config, client)],
                                   f"tags.stage = 'export' and tags.model = '{model}' and tags.export_status = 'ok'")
        models = mlmodel_flavours(client, run.info.run_id, tmp_path / model)
        assert set(models) == {"model"} and "onnx" in models["model"], models
        loaded = mlflow.onnx.load_model(f"runs:/{run.info.run_id}/model")
        written = onnx.load(str(ex.export_dir(config, model) / ex.ONNX_FILE))
        assert loaded.SerializeToString() == written.SerializeToString()


def test_int8_accuracy_and_mcnemar_come_from_the_real_test_predictions(exported):
    config, _ = exported
    model = MODELS[0]
    summary = ex.read_export(config, model)
    folder = ex.export_dir(config, model)
    cache = open_cache(config)
    images, labels = cache.images("test"), np.asarray(cache.labels("test"))
    fp32 = run_batches(session(folder / ex.ONNX_FILE, 1), images, 16).argmax(1) == labels
    int8 = run_batches(session(folder / ex.INT8_FILE, 1), images, 16).argmax(1) == labels
    expected = metrics.mcnemar_exact(fp32, int8)
    assert summary["int8"]["fp32_only"] == expected.n_a_only and summary["int8"]["int8_only"] == expected.n_b_only
    assert summary["int8"]["p_value"] == pytest.approx(expected.p_value)
    int8_row = next(v for v in summary["variants"] if v["precision"] == "int8")
    assert int8_row["top1"] == pytest.approx(int8.mean())
    assert summary["int8"]["top1_drop"] == pytest.approx(fp32.mean() - int8.mean())
    assert summary["n_test"] == len(labels) == 50
    # int8 is really quantized: QDQ nodes, and a smaller file than fp32
    ops = {node.op_type for node in onnx.load(str(folder / ex.INT8_FILE)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_calibration_reads_only_train_rows(exported):
    config, _ = exported
    index = open_cache(config).index
    test_paths = set(index.loc[index["split"] == "test", "path"])
    train_paths = set(index.loc[index["split"] == "train", "path"])
    for model in MODELS:
        used = ex.read_calibration_rows(config, model)
        assert len(used) == config.export.calibration_size
        assert set(used["path"]) <= train_paths
        assert not set(used["path"]) & test_paths


def test_calibration_reader_hands_out_exactly_the_chosen_rows():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1) * np.ones((1, 2, 2, 3), np.uint8)
    rows = ex.calibration_rows(10, 4, seed=0)
    reader = ex.CacheCalibration(images, rows, batch=3)
    seen = []
    while (batch := reader.get_next()) is not None:
        seen += batch[INPUT_NAME][:, 0, 0, 0].tolist()
    assert seen == rows.tolist() and len(set(seen)) == 4


def test_a_broken_export_fails_only_that_model_and_the_report_marks_it(exported, tmp_path, monkeypatch):
    config, _ = exported
    broken = MODELS[1]
    original = ex.with_preprocessing

    class Unsupported(torch.autograd.Function):
        """A Python autograd function: torch.export cannot trace it into the graph."""

        @staticmethod
        def forward(ctx, x):
            return x.numpy().copy() and x

    def sabotaged(network, *args):
        module = original(network, *args)
        inner = module.forward
        module.forward = lambda pixels: Unsupported.apply(inner(pixels))
        return module

    monkeypatch.setattr(ex, "with_preprocessing", sabotaged)
    with pytest.raises(ex.ExportError, match="ONNX export failed"), single_torch_thread():
        ex.export.fn(config, broken)
    summary = ex.read_export(config, broken)
    assert summary["status"] == "failed" and "ONNX export failed" in summary["error"]
    assert ex.read_export(config, MODELS[0])["status"] == "ok"
    section = ex.deployment_section(config, ex.load_exports(config, MODELS), None)
    table = next(b for b in section.blocks if isinstance(b, Table) and "Runtime" in b.headers)
    assert {row[0] for row in table.rows} == {MODELS[0]}
    assert any(isinstance(b, Para) and f"{broken}: export failed" in b.text for b in section.blocks)


def test_parity_below_the_threshold_fails_with_the_numbers():
    settings = make_config_settings(max_abs_logit_diff=1e-3, min_top1_agreement=0.99)
    with pytest.raises(ex.ExportError, match=r"max \|logit diff\| 0\.5 .*agreement 0\.5000"):
        ex.check_parity("resnet50", {"max_abs_logit_diff": 0.5, "top1_agreement": 0.5}, settings)


def make_config_settings(**changes):
    import dataclasses

    from food101.config import load_config
    from tests.conftest import REPO

    return dataclasses.replace(load_config(REPO / "params.yaml").export, **changes)


def _row(model, runtime, precision, top1, p95, size, ips, drop=False):
    return {"model": model, "runtime": runtime, "precision": precision, "top1": top1, "latency_p50_ms": p95 / 2,
            "latency_p95_ms": p95, "size_mb": size, "throughput_ips": ips, "significant_drop": drop}


def test_a_significant_int8_drop_is_never_recommended_and_the_reason_says_so():
    settings = make_config_settings()
    rows = [_row("resnet50", "onnxruntime", "fp32", 0.80, 40.0, 90.0, 50.0),
            _row("resnet50", "onnxruntime", "int8", 0.79, 12.0, 23.0, 150.0, drop=True),
            _row("mobilenet_v3_large", "onnxruntime", "fp32", 0.70, 8.0, 16.0, 120.0),
            _row("mobilenet_v3_large", "onnxruntime", "int8", 0.69, 4.0, 4.2, 260.0)]
    choices = {c.target: c for c in recommend_targets(rows, settings)}
    assert choices["cpu_server"].choice == "mobilenet_v3_large on onnxruntime fp32"
    assert choices["gpu_server"].choice == "mobilenet_v3_large on onnxruntime int8"
    assert "resnet50 in int8 would have won" in choices["cpu_server"].reason
    assert choices["edge"].choice == "mobilenet_v3_large on onnxruntime int8"
    for choice in choices.values():
        assert choice.reason[0].isupper() and choice.reason.endswith(".") and choice.reason.count(". ") == 0
    one = recommend_targets(rows[2:3], settings)[0].reason
    assert "Of the 1 variant under" in one


def test_timing_probes_hold_a_training_slot_and_the_timing_side_of_quiet(exported, monkeypatch):
    """export[m] runs beside robustness[m] and later trainings, which hold a training slot while they
    compute: its timing probes must hold one too (and time exclusively), or they time the others."""
    from food101.devices import training_slots
    from food101.timing import QUIET

    config, _ = exported
    slots = training_slots(config)
    held = []
    original = ex.probe_runtime

    def recording(*args, **kwargs):
        held.append((not slots._free, QUIET.state()))
        return original(*args, **kwargs)

    monkeypatch.setattr(ex, "probe_runtime", recording)
    with single_torch_thread():
        ex.export.fn(config, MODELS[0])
    assert held == [(True, (0, True, 0))] * len(ex.VARIANTS)
    assert slots._free and QUIET.state() == (0, False, 0)  # released afterwards


def test_export_converts_and_quantizes_only_while_nothing_is_timed(exported, monkeypatch):
    """Found: the demo timed resnet50's batch-1 latency at 20 ms (14.6 alone) and flagged the machine
    busy: evaluate[m] timed while export[earlier model] converted, scored and quantized on the same
    cores. Export's heavy work now waits for a running timing and never starts one's way."""
    from concurrent.futures import ThreadPoolExecutor

    from food101.timing import QUIET

    config, _ = exported
    heavy_calls = []
    for name in ("export_onnx", "torch_logits", "quantize"):
        original = getattr(ex, name)

        def recording(*args, _original=original, _name=name, **kwargs):
            heavy_calls.append((_name, QUIET.state()))
            return _original(*args, **kwargs)

        monkeypatch.setattr(ex, name, recording)

    def export_model():
        with single_torch_thread():
            return ex.export.fn(config, MODELS[1])

    with ThreadPoolExecutor(1) as pool:
        with QUIET.timing():  # as evaluate holds it while it times a model
            exported_model = pool.submit(export_model)
            with pytest.raises(TimeoutError):
                exported_model.result(timeout=3.0)  # export waits for the timing to end
            assert heavy_calls == []
        assert exported_model.result()["status"] == "ok"
    assert [name for name, _ in heavy_calls] == ["export_onnx", "torch_logits", "quantize"]
    assert all(state == (1, False, 0) for _, state in heavy_calls)  # heavy, nothing timed beside it


def test_exports_beside_models_loaded_from_state_on_other_threads_all_succeed(tmp_path):
    """The flow exports one model while it evaluates or corrupts photos with others, which load
    their weights on the meta device: without a shared lock torch.fx's tracing metadata breaks
    (KeyError 'custom')."""
    import threading

    from food101.models import build_model, model_from_state
    from food101.onnx_inference import with_preprocessing

    names = ("mobilenet_v3_large", "efficientnet_b0")
    states = {name: build_model(name, 5, pretrained=False).state_dict() for name in names}
    errors: list[BaseException] = []

    def guarded(work) -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    def export(i: int) -> None:
        module = with_preprocessing(model_from_state(names[i], 5, states[names[i]]).eval(), [0.5] * 3, [0.5] * 3,
                                    32, 32)
        ex.export_onnx(module, 32, tmp_path / f"m{i}.onnx", opset=20)

    def load_repeatedly() -> None:
        for _ in range(6):
            model_from_state("efficientnet_b0", 5, states["efficientnet_b0"])

    threads = [threading.Thread(target=guarded, args=(lambda i=i: export(i),)) for i in range(2)]
    threads.append(threading.Thread(target=guarded, args=(load_repeatedly,)))
    with single_torch_thread():
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
    assert errors == []
    assert all(onnx.load(str(tmp_path / f"m{i}.onnx")) for i in range(2))


def test_export_records_the_machine_state_and_the_report_flags_a_busy_one(exported):
    """Found: evaluate's timings waited for the machine to settle and recorded its state, so the
    report said when a latency was measured on a busy machine; export's runtime timings, behind
    the deployment targets' choices, did neither. Both now: the same settle wait (evaluate.settle_s,
    0 in the tests) and machine_state in export.json, and the deployment section names the models
    whose runtimes were timed while other processes held the CPU."""
    import subprocess
    import sys

    from food101.timing import machine_monitor

    config, _ = exported
    exports = ex.load_exports(config, MODELS)
    for model in MODELS:
        state = exports[model]["machine_state"]
        assert state["settle_wait_s"] == 0.0 and state["seconds"] > 0
        assert 0.0 <= state["other_cpu_share"] <= 1.0 and state["cores"] >= 1
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # one core busy all along
    try:
        with machine_monitor() as busy_state:
            pass
    finally:
        burner.kill()
        burner.wait()
    assert busy_state["other_cpu_share"] > config.alerts.max_other_cpu_share
    flagged = {**exports, MODELS[1]: {**exports[MODELS[1]], "machine_state": busy_state}}
    assert MODELS[1] in ex.busy_exports(config, flagged)
    section = ex.deployment_section(config, flagged, None)
    note = next(b.text for b in section.blocks if isinstance(b, Para) and "busy machine" in b.text)
    assert f"{MODELS[1]}'s runtimes (" in note and "other processes used" in note
    older = {m: {k: v for k, v in s.items() if k != "machine_state"} for m, s in exports.items()}
    assert ex.busy_exports(config, older) == {}  # an export.json from before states were recorded
