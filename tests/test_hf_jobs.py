"""Hugging Face checkpoints through the jobs: init_from / reference a HF directory, and
score_jax.hf_export writing a run's export back as a checkpoint transformers loads."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

import test_train_sft as sft_e2e
from configs import models
from numerics import assert_close_f32, decoder_terms
from score_jax import checkpoints, hf, model, sharding
from score_jax.jobs import inputs

ROOT = sft_e2e.ROOT
TINY = model.ModelConfig(**models.get("tiny").to_dict())


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """A random transformers Llama with exactly the `tiny` preset's shape, saved with a tokenizer file."""
    cfg = transformers.LlamaConfig(vocab_size=TINY.vocab_size, hidden_size=TINY.d_model, intermediate_size=TINY.mlp_dim,
                                   num_hidden_layers=TINY.num_layers, num_attention_heads=TINY.num_heads,
                                   num_key_value_heads=TINY.num_kv_heads, head_dim=TINY.head_dim,
                                   rms_norm_eps=TINY.norm_eps, tie_word_embeddings=True, hidden_act="silu",
                                   rope_parameters={"rope_type": "default", "rope_theta": TINY.rope_theta})
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    path = tmp_path_factory.mktemp("hf_tiny")
    ref.save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    return path, ref


def test_preset_config_is_the_checkpoints(hf_tiny):
    path, _ = hf_tiny
    # Equal in every architecture field; how it runs (layer scan, dtypes, remat) is ours to choose.
    import dataclasses
    assert dataclasses.replace(hf.config_from_hf(str(path)), scan_layers=TINY.scan_layers) == TINY


def test_inputs_params_reads_hf_directories_and_exports(hf_tiny, tmp_path):
    path, _ = hf_tiny
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    from_hf = inputs.params(str(path), TINY, mesh)
    checkpoints.export_params(str(tmp_path / "export"), from_hf)
    from_export = inputs.params(str(tmp_path / "export"), TINY, mesh)
    for a, b in zip(jax.tree.leaves(from_hf), jax.tree.leaves(from_export)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding == b.sharding
    inputs.require_params(str(path), "x", "y")
    with pytest.raises(checkpoints.MissingExportError, match="No base export .* found at .*nowhere; create it with: z"):
        inputs.require_params(str(tmp_path / "nowhere"), "base", "z")


def test_hf_export_cli_round_trip_into_transformers(hf_tiny, tmp_path):
    path, ref = hf_tiny
    params = jax.tree.map(lambda x: x * 1.5, hf.load_params(str(path), TINY))  # "trained": differs from ref
    checkpoints.export_params(str(tmp_path / "export"), params)
    out = tmp_path / "hf_out"
    p = subprocess.run([sys.executable, "-m", "score_jax.hf_export", f"--params={tmp_path / 'export'}",
                        f"--like={path}", f"--out={out}"], cwd=ROOT, env=sft_e2e._env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "copied tokenizer_config.json" in p.stdout and (out / "tokenizer_config.json").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                            dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 9))
    with torch.no_grad():
        got = back(input_ids=torch.tensor(tokens)).logits.numpy()
    ours, _ = model.forward(TINY, params, tokens, np.broadcast_to(np.arange(9), tokens.shape))
    assert_close_f32(got, ours, decoder_terms(TINY, 9))  # torch's kernels vs XLA's, both float32
    bad = subprocess.run([sys.executable, "-m", "score_jax.hf_export", f"--params={tmp_path / 'export'}",
                          f"--like={tmp_path}", f"--out={out}"], cwd=ROOT, env=sft_e2e._env(), capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "is not a Hugging Face checkpoint directory" in bad.stderr


@pytest.mark.slow
def test_stage1_from_a_hugging_face_checkpoint(hf_tiny, tmp_path):
    """The reference and the initial policy straight from a HF directory (the toy tokenizer)."""
    path, _ = hf_tiny
    wd = tmp_path / "s1"
    cmd = [sys.executable, "-m", "score_jax.main", "--config=configs/stage1.py:tiny", f"--workdir={wd}",
           f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.data.num_train=500", "--config.data.num_test=50",
           f"--config.rl.reference={path}", f"--config.init_from={path}", "--config.total_steps=2",
           "--config.batch_size=2", "--config.rl.sampling.samples_per_prompt=2", "--config.rl.sampling.max_new_tokens=8",
           "--config.checkpoint.every_steps=0", "--config.log_every=1"]
    p = subprocess.run(cmd, cwd=ROOT, env=sft_e2e._env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((wd / "summary.json").read_text())
    # Policy = reference at the start: the first step's KL is zero up to float rounding.
    first = json.loads((wd / "metrics.jsonl").read_text().splitlines()[0])
    assert s["step"] == 2 and first["kl1"] < 1e-9 and first["logp_gap"] < 1e-4


def test_hf_export_refuses_to_write_over_its_source(hf_tiny, tmp_path):
    path, _ = hf_tiny
    checkpoints.export_params(str(tmp_path / "export"), hf.load_params(str(path), TINY))
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    for out in (path, path / "hf", path.parent, tmp_path / "export", tmp_path / "export" / "hf"):
        p = subprocess.run([sys.executable, "-m", "score_jax.hf_export", f"--params={tmp_path / 'export'}",
                            f"--like={path}", f"--out={out}"], cwd=ROOT, env=sft_e2e._env(), capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 2, (out, p.stderr[-2000:])
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: --out=") and "overlaps" in last and "Traceback" not in p.stderr, last
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()} == before


def test_a_failed_hf_export_leaves_the_older_one_whole(hf_tiny, tmp_path, monkeypatch):
    from score_jax import hf_export
    path, _ = hf_tiny
    params = hf.load_params(str(path), TINY)
    checkpoints.export_params(str(tmp_path / "export"), params)
    out = tmp_path / "hf_out"
    hf_export.export(str(tmp_path / "export"), str(path), str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(hf.safetensors.numpy, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        hf_export.export(str(tmp_path / "export"), str(path), str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_hf_export_refuses_an_unknown_dtype_before_work(hf_tiny, tmp_path):
    from score_jax import hf_export
    path, _ = hf_tiny
    with pytest.raises(ValueError, match=r"--dtype='float9'; choose float32, bfloat16 or float16"):
        hf_export.export(str(tmp_path / "export"), str(path), str(tmp_path / "out"), dtype="float9")
    assert not (tmp_path / "out").exists()
