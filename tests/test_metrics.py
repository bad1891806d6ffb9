"""score_jax.metrics: TensorBoard event files read back record by record, metrics.jsonl rows
(and their trimming on resume), the console progress line, and the JSON helpers."""

import contextlib
import io
import json
import math
import os
import re
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from score_jax import metrics


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bit by bit: independent of the writer's own table."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(directory):
    """Every Event of the one event file in ``directory``, with TFRecord framing and CRCs checked."""
    files = [f for f in os.listdir(directory) if f.startswith("events.out.tfevents.")]
    assert len(files) == 1, files
    data = open(os.path.join(directory, files[0]), "rb").read()
    events, pos = [], 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (n,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        assert header_crc == _masked(_crc32c(header))
        body = data[pos + 12:pos + 12 + n]
        (body_crc,) = struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])
        assert body_crc == _masked(_crc32c(body))
        events.append(event_pb2.Event.FromString(body))
        pos += 16 + n
    assert pos == len(data)  # no torn record at the end
    return events


def _scalars(events):
    return [(e.step, v.tag, v.simple_value) for e in events if e.HasField("summary") for v in e.summary.value]


# ----------------------------------------------------------------------------- Writer.scalars


def test_scalars_go_to_tensorboard_and_metrics_jsonl(tmp_path):
    w = metrics.Writer(str(tmp_path), total_steps=10)
    w.scalars(1, {"loss": 0.5, "acc": np.float32(0.25)})
    w.scalars(2, {"loss": jnp.asarray(0.125), "reward/mean": np.asarray(1.0)})
    w.close()

    events = _read_events(tmp_path / "tensorboard")
    assert events[0].file_version == "brain.Event:2"
    assert _scalars(events) == [(1, "loss", 0.5), (1, "acc", 0.25), (2, "loss", 0.125), (2, "reward/mean", 1.0)]

    lines = (tmp_path / metrics.METRICS_FILE).read_text().splitlines()
    assert lines == ['{"acc": 0.25, "loss": 0.5, "step": 1}',  # sorted keys, one line per call
                     '{"loss": 0.125, "reward/mean": 1.0, "step": 2}']
    assert metrics.read_jsonl(str(tmp_path / metrics.METRICS_FILE)) == [
        {"acc": 0.25, "loss": 0.5, "step": 1}, {"loss": 0.125, "reward/mean": 1.0, "step": 2}]


def test_non_finite_values_are_left_out_of_both(tmp_path):
    w = metrics.Writer(str(tmp_path), total_steps=3)
    w.scalars(1, {"loss": float("nan"), "kl": np.inf, "acc": 0.75, "grad": -np.inf})
    w.scalars(2, {"loss": jnp.nan})
    w.close()
    assert _scalars(_read_events(tmp_path / "tensorboard")) == [(1, "acc", 0.75)]
    assert metrics.read_jsonl(str(tmp_path / metrics.METRICS_FILE)) == [{"acc": 0.75, "step": 1}, {"step": 2}]


def test_resume_drops_the_rows_it_will_run_again_and_appends(tmp_path):
    path = tmp_path / metrics.METRICS_FILE
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6)))
    w = metrics.Writer(str(tmp_path), total_steps=10, first_step=3)
    assert [r["step"] for r in metrics.read_jsonl(str(path))] == [1, 2, 3]  # steps <= first_step kept
    w.scalars(4, {"loss": 0.0})
    w.close()
    assert metrics.read_jsonl(str(path)) == [
        {"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.2}, {"step": 3, "loss": 0.3}, {"step": 4, "loss": 0.0}]


def test_fresh_run_keeps_only_step_zero_rows(tmp_path):
    path = tmp_path / metrics.METRICS_FILE
    path.write_text('{"step": 0, "x": 1.0}\n\n{"step": 7, "x": 2.0}\n')  # blank line tolerated
    metrics.Writer(str(tmp_path), total_steps=10).close()
    assert path.read_text() == '{"step": 0, "x": 1.0}\n'


def test_only_process_zero_writes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(jax, "process_index", lambda: 1)  # what the other hosts of a pod see
    w = metrics.Writer(str(tmp_path), total_steps=10)
    w.scalars(1, {"loss": 0.5})
    w.progress(1, {"loss": 0.5})
    w.close()
    metrics.write_json(str(tmp_path / "summary.json"), {"a": 1})
    assert os.listdir(tmp_path) == []
    assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------- Writer.progress


def test_progress_line_before_any_step_has_no_rate(tmp_path):
    out = io.StringIO()
    w = metrics.Writer(str(tmp_path), total_steps=200, first_step=50, stream=out)
    w.progress(50, {"loss": 1.23456789, "acc": np.float32(0.5), "kl": jnp.asarray(1e-5), "n": 123456})
    w.close()
    # done = 0 steps: the rate is 0 and the ETA unknown, whatever the clock says.
    assert out.getvalue() == "step 50/200 | loss 1.235 | acc 0.5 | kl 1e-05 | n 1.235e+05 | 0.00 steps/s | ETA ?\n"


def test_progress_line_after_steps(tmp_path):
    out = io.StringIO()
    w = metrics.Writer(str(tmp_path), total_steps=8, stream=out)
    w.progress(3, {"loss": 2.0})
    w.progress(8, {"loss": 0.25})
    w.close()
    first, last = out.getvalue().splitlines()
    assert re.fullmatch(r"step 3/8 \| loss 2 \| \d+\.\d\d steps/s \| ETA (\d+h)?\d+m\d\ds", first), first
    assert re.fullmatch(r"step 8/8 \| loss 0\.25 \| \d+\.\d\d steps/s \| ETA 0m00s", last), last  # 0 steps left


def test_progress_goes_to_stdout_at_the_time_of_the_line(tmp_path, capsys):
    w = metrics.Writer(str(tmp_path), total_steps=4)
    w.progress(0, {"loss": 3.0})
    redirected = io.StringIO()
    with contextlib.redirect_stdout(redirected):  # after the Writer was made
        w.progress(0, {"loss": 2.0})
    w.close()
    assert capsys.readouterr().out == "step 0/4 | loss 3 | 0.00 steps/s | ETA ?\n"
    assert redirected.getvalue() == "step 0/4 | loss 2 | 0.00 steps/s | ETA ?\n"


@pytest.mark.parametrize("seconds, text", [
    (0, "0m00s"), (59.9, "0m59s"), (65, "1m05s"), (3599, "59m59s"), (3600, "1h00m00s"),
    (3725, "1h02m05s"), (100 * 3600 + 1, "100h00m01s"), (math.nan, "?"), (math.inf, "?"),
])
def test_eta_format(seconds, text):
    assert metrics._fmt_duration(seconds) == text


# ----------------------------------------------------------------------------- JSON files


def test_write_json_text_and_read_back(tmp_path):
    path = tmp_path / "summary.json"
    obj = {"b": np.float32(0.5), "a": [np.int64(3), jnp.arange(3)], "c": {"z": np.zeros((2, 1)), "y": "s"}}
    metrics.write_json(str(path), obj)
    assert path.read_text() == (
        '{\n  "a": [\n    3,\n    [\n      0,\n      1,\n      2\n    ]\n  ],\n  "b": 0.5,\n'
        '  "c": {\n    "y": "s",\n    "z": [\n      [\n        0.0\n      ],\n      [\n        0.0\n'
        '      ]\n    ]\n  }\n}')
    assert metrics.read_json(str(path)) == {"a": [3, [0, 1, 2]], "b": 0.5, "c": {"y": "s", "z": [[0.0], [0.0]]}}
    assert os.listdir(tmp_path) == ["summary.json"]  # the temporary file was renamed, not left behind


def test_write_json_replaces_the_file_whole(tmp_path):
    path = tmp_path / "eval.json"
    metrics.write_json(str(path), {"old": list(range(100))})
    reader = open(path)  # a reader that opened the old file keeps reading all of it
    metrics.write_json(str(path), {"new": 1})
    assert json.loads(reader.read()) == {"old": list(range(100))}
    reader.close()
    assert metrics.read_json(str(path)) == {"new": 1}


def test_write_json_failure_leaves_the_old_file(tmp_path):
    path = tmp_path / "summary.json"
    metrics.write_json(str(path), {"a": 1})
    with pytest.raises(TypeError, match="Not JSON serialisable: <class 'object'>"):
        metrics.write_json(str(path), {"a": 2, "b": object()})
    assert metrics.read_json(str(path)) == {"a": 1}
    assert os.listdir(tmp_path) == ["summary.json"]
    (tmp_path / "summary.json.tmp").mkdir()  # the temporary file cannot be written
    with pytest.raises(IsADirectoryError):
        metrics.write_json(str(path), {"a": 3})
    assert metrics.read_json(str(path)) == {"a": 1}


def test_read_jsonl_missing_file_and_blank_lines(tmp_path):
    assert metrics.read_jsonl(str(tmp_path / "samples.jsonl")) == []
    (tmp_path / "samples.jsonl").write_text('{"a": 1}\n\n  \n{"b": [2, "x"]}\n')
    assert metrics.read_jsonl(str(tmp_path / "samples.jsonl")) == [{"a": 1}, {"b": [2, "x"]}]
