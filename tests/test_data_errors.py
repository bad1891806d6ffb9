"""Bad inputs a user can hand the data and tokenizer code: each fails before any training work
with a ValueError (main.py prints it as one `Error: ...` line, exit 2) whose message names the
file or directory and says what to do.

Most cases call what the jobs call (data.prepare, prompt_set.build, pipeline.sft_loader,
tokenizer.load); two go through `python -m score_jax.main` to check the one line and the exit
code end to end.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import conftest
from score_jax import chat, data, tokenizer
from score_jax.data import pipeline, prompt_set

ROOT = pathlib.Path(__file__).resolve().parents[1]

GSM8K_ROWS = [{"question": "Tom has 2 apples and buys 3. How many now?", "answer": "2+3=5\n#### 5"},
              {"question": "What is 7 - 4?", "answer": "7-4=3\n#### 3"}]


def _mbpp_row(task_id):
    return {"task_id": task_id, "text": f"Write f returning {task_id}.", "code": f"def f():\n    return {task_id}",
            "test_list": [f"assert f() == {task_id}"], "test_setup_code": "", "challenge_test_list": []}


# One task of each MBPP split (prompt 1-10, test 11-510, validation 511-600, train 601+).
MBPP_ROWS = [_mbpp_row(i) for i in (1, 11, 511, 601)]


def _write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def _gsm8k_dir(root, train=GSM8K_ROWS, test=GSM8K_ROWS):
    _write_jsonl(root / "train.jsonl", train)
    _write_jsonl(root / "test.jsonl", test)
    return root


def _error(name, tmp_path, manual_dir, **kwargs):
    """The ValueError that building `name` from `manual_dir` raises; nothing built."""
    with pytest.raises(ValueError) as e:
        data.prepare(name, tmp_path / "tfds", manual_dir=manual_dir, **kwargs)
    assert not list((tmp_path / "tfds").glob("*/*/dataset_info.json"))  # no build left behind
    return str(e.value)


# --------------------------------------------------------------------- missing or empty manual_dir

@pytest.mark.parametrize("name, files", [("math", "math500.jsonl"), ("mbpp", "mbpp.jsonl"),
                                         ("gsm8k", "train.jsonl, test.jsonl")])
@pytest.mark.parametrize("state", ["missing", "empty", "a file"])
def test_missing_or_empty_manual_dir_is_one_value_error(tmp_path, name, files, state):
    manual_dir = tmp_path / "manual"
    if state == "empty":
        manual_dir.mkdir()
    elif state == "a file":
        manual_dir.write_text("not a directory")
    message = _error(name, tmp_path, manual_dir)
    assert f"manual_dir {manual_dir}" in message and files in message
    assert {"missing": "(which does not exist)", "empty": "(which is empty)",
            "a file": "(which is a file, not a directory)"}[state] in message
    assert "data.manual_dir" in message and "\n" not in message


def test_the_error_is_still_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError):  # what callers caught before
        data.prepare("mbpp", tmp_path / "tfds", manual_dir=tmp_path / "nowhere")


# -------------------------------------------------------------------- empty or partial files

def test_empty_gsm8k_train_file_names_it(tmp_path):
    manual_dir = _gsm8k_dir(tmp_path / "gsm", train=[])
    message = _error("gsm8k", tmp_path, manual_dir)
    assert message == (f"{manual_dir}/train.jsonl has no records, so split 'train' would be empty; put the "
                       "complete official GSM8K train.jsonl (7,473 problems) there.")
    (manual_dir / "train.jsonl").write_text("\n  \n")  # blank lines only: the same
    assert "train.jsonl has no records" in _error("gsm8k", tmp_path, manual_dir)


def test_partial_mbpp_file_names_the_file_and_the_empty_split(tmp_path):
    _write_jsonl(tmp_path / "m" / "mbpp.jsonl", MBPP_ROWS[:2])  # cut after task 11: no validation, train
    message = _error("mbpp", tmp_path, tmp_path / "m")
    assert message == (f"{tmp_path}/m/mbpp.jsonl has no tasks of split 'validation' (task ids 511-600), so "
                       "the file looks cut short (2 tasks, the last task_id 11; the original has 974): replace "
                       "it with the complete mbpp.jsonl.")
    _write_jsonl(tmp_path / "m" / "mbpp.jsonl", MBPP_ROWS[:3])
    assert "no tasks of split 'train' (task ids 601 and up)" in _error("mbpp", tmp_path, tmp_path / "m")
    (tmp_path / "m" / "mbpp.jsonl").write_text("")
    assert _error("mbpp", tmp_path, tmp_path / "m") == (
        f"{tmp_path}/m/mbpp.jsonl has no records; replace it with the complete mbpp.jsonl "
        "(google-research/google-research, mbpp/mbpp.jsonl).")


def test_mbpp_cut_off_mid_record_names_the_line(tmp_path):
    path = tmp_path / "m" / "mbpp.jsonl"
    _write_jsonl(path, MBPP_ROWS)
    path.write_text(path.read_text()[:-40])  # the last record loses its end (and newline)
    message = _error("mbpp", tmp_path, tmp_path / "m")
    assert message.startswith(f"{path} line 4 is not valid JSON (")
    assert message.endswith("); the file looks cut off in the middle of that record: replace it with a "
                            "complete copy.")
    assert "char" not in message  # json's offsets within the line are not the file's


def test_mbpp_record_missing_a_field_names_the_line(tmp_path):
    rows = [MBPP_ROWS[0], {k: v for k, v in MBPP_ROWS[1].items() if k != "code"}, *MBPP_ROWS[2:]]
    _write_jsonl(tmp_path / "m" / "mbpp.jsonl", rows)
    message = _error("mbpp", tmp_path, tmp_path / "m")
    assert message.startswith(f"{tmp_path}/m/mbpp.jsonl line 2 has no 'code' field")


def test_math_empty_splits(tmp_path):
    def problem(i):
        return {"problem": f"What is {i}+1?", "solution": f"It is $\\boxed{{{i + 1}}}$.", "unique_id":
                f"test/algebra/{i}.json"}
    manual_dir = tmp_path / "math"
    _write_jsonl(manual_dir / "train.jsonl", [])
    _write_jsonl(manual_dir / "test.jsonl", [problem(1), problem(2)])
    _write_jsonl(manual_dir / "math500.jsonl", [{"unique_id": "test/algebra/1.json"}])
    assert _error("math", tmp_path, manual_dir) == (
        f"{manual_dir}/train.jsonl has no records with a boxed answer, so split 'train' would be empty; "
        f"put the complete MATH train set in {manual_dir}.")
    _write_jsonl(manual_dir / "train.jsonl", [problem(3)])
    _write_jsonl(manual_dir / "math500.jsonl", [{"unique_id": "test/algebra/1.json"},
                                                {"unique_id": "test/algebra/2.json"}])
    assert _error("math", tmp_path, manual_dir) == (
        f"Every test record is listed in {manual_dir}/math500.jsonl, so split 'test_minus_math500' would be "
        f"empty; put the complete MATH test set (5,000 problems) in {manual_dir}.")
    _write_jsonl(manual_dir / "math500.jsonl", [])
    assert _error("math", tmp_path, manual_dir) == (
        f"{manual_dir}/math500.jsonl has no records, so split 'math500' would be empty; put PRM800K's "
        "MATH500 list (500 lines) there.")


# ------------------------------------------------------------------------------ non-UTF-8 files

def test_non_utf8_jsonl_names_file_and_line(tmp_path):
    manual_dir = _gsm8k_dir(tmp_path / "gsm")
    with open(manual_dir / "train.jsonl", "ab") as f:
        f.write(b'{"question": "Caf\xe9 au lait?", "answer": "#### 1"}\n')  # Latin-1, line 3
    message = _error("gsm8k", tmp_path, manual_dir)
    assert message == (f"{manual_dir}/train.jsonl line 3 is not UTF-8 text (byte 0xe9 at column 18); "
                       "re-save the file as UTF-8.")


def test_utf8_bom_and_crlf_lines_are_read(tmp_path):
    manual_dir = _gsm8k_dir(tmp_path / "gsm")
    text = "".join(json.dumps(r) + "\r\n" for r in GSM8K_ROWS)
    (manual_dir / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    builder = data.prepare("gsm8k", tmp_path / "tfds", manual_dir=manual_dir)
    assert builder.info.splits["train"].num_examples == 2


def test_non_utf8_math_release_file_names_file_and_line(tmp_path):
    manual_dir = tmp_path / "math"
    for split in ("train", "test"):
        path = manual_dir / split / "algebra" / "1.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"problem": "1+1?", "solution": "$\\boxed{2}$"}))
    _write_jsonl(manual_dir / "math500.jsonl", [{"unique_id": "test/algebra/1.json"}])
    bad = manual_dir / "test" / "algebra" / "2.json"
    bad.write_bytes(b'{"problem": "1+2?",\n "solution": "\xa3 $\\\\boxed{3}$"}')
    assert _error("math", tmp_path, manual_dir) == (
        f"{bad} line 2 is not UTF-8 text (byte 0xa3 at column 15); re-save the file as UTF-8.")


def test_non_utf8_tokenizer_config_names_the_file(tmp_path):
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token="a")).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_bytes(b'{\n"eos_token": "\xff"}')
    with pytest.raises(ValueError) as e:
        tokenizer.load(tmp_path)
    assert str(e.value) == (f"{tmp_path}/tokenizer_config.json line 2 is not UTF-8 text (byte 0xff at "
                            "column 15); restore the checkpoint's original file.")


# ------------------------------------------------------------------------ over-long records

@pytest.fixture(scope="module")
def gsm8k_source(tmp_path_factory):
    """A gsm8k build whose train.jsonl line 2 holds the one long question."""
    root = tmp_path_factory.mktemp("gsm_long")
    rows = [GSM8K_ROWS[0], {"question": "Sum the digits " + "12345" * 20 + "\nthen add 1.", "answer": "#### 1"},
            GSM8K_ROWS[1]]
    builder = data.prepare("gsm8k", root / "tfds", manual_dir=_gsm8k_dir(root / "gsm", train=rows))
    return builder.as_data_source("train")


def _index_of(source, record_id):
    return next(i for i in range(len(source)) if source[i]["id"] == record_id.encode())


def test_too_long_prompt_names_the_record_id_and_its_start(gsm8k_source, tok):
    with pytest.raises(ValueError) as e:
        prompt_set.build(gsm8k_source, tok, chat.TOY, "{prompt}", max_prompt_len=64, too_long="error")
    i = _index_of(gsm8k_source, "train/2")  # TFDS's order is not the file's
    assert str(e.value) == (
        f"1 of 3 prompts are longer than max_prompt_len=64; the first is record {i} of gsm8k_manual[train] "
        "(id 'train/2', prompt 'Sum the digits 1234512345123451234512345...'), 123 tokens; raise "
        "sampling.max_prompt_len (rl.sampling or eval.sampling) or set data.too_long to 'skip' or 'truncate'.")


def test_too_long_sft_example_names_the_record_id(gsm8k_source, tok):
    batches = pipeline.sft_loader(gsm8k_source, tok, seq_len=64, global_batch_size=3, seed=0, shard_index=0,
                                  shard_count=1, integer_answer=False, template=chat.TOY)
    with pytest.raises(ValueError) as e:
        next(batches)
    assert str(e.value).startswith(
        f"Record {_index_of(gsm8k_source, 'train/2')} of gsm8k_manual[train] (id 'train/2', prompt 'Sum the "
        "digits 1234512345123451234512345...') is ")
    assert str(e.value).endswith("tokens, longer than seq_len=64; raise seq_len or set too_long='skip' or "
                                 "'truncate'.")


def test_record_label_without_id_or_source_name():
    assert pipeline.record_label({"prompt": b"What is 65 - 54?", "answer": b"11"}, 7) == \
        "record 7 (prompt 'What is 65 - 54?')"
    assert pipeline.record_label({"question": "x"}, 0, "toy_arithmetic[test]") == "record 0 of toy_arithmetic[test]"


# ------------------------------------------------------------------ a directory with no tokenizer

def test_directory_without_a_tokenizer_is_one_value_error(tmp_path):
    with pytest.raises(ValueError) as e:
        tokenizer.load(tmp_path)
    assert str(e.value) == (f"Directory {tmp_path} has neither tokenizer.model nor tokenizer.json (it is empty); "
                            "point config.tokenizer at the model's checkpoint directory or its tokenizer file.")
    assert isinstance(e.value, FileNotFoundError)  # what callers caught before

    for name in ("config.json", "model.safetensors", "README.md", "a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_text("")
    with pytest.raises(ValueError, match=r"\(it holds README\.md, a\.txt, b\.txt, c\.txt, config\.json and 1 "
                                         r"more\); point config\.tokenizer"):
        tokenizer.load(tmp_path)

    # A parent of checkpoint directories: say which one holds a tokenizer.
    (tmp_path / "gemma-2b").mkdir()
    (tmp_path / "gemma-2b" / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"; {tmp_path}/gemma-2b has tokenizer\.json: point config\.tokenizer "
                                         "there"):
        tokenizer.load(tmp_path)


def test_missing_tokenizer_path_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match=f"Tokenizer {tmp_path}/nope does not exist"):
        tokenizer.load(tmp_path / "nope")


# ------------------------------------------------------------------- through python -m score_jax.main

def _main(tmp_path, *overrides):
    env = dict(os.environ, XLA_FLAGS=conftest.FAST_COMPILE_FLAGS, PYTHONPATH=str(ROOT))
    env.pop("SCORE_JAX_DEBUG", None)
    cmd = [sys.executable, "-m", "score_jax.main", "--config=configs/sft.py:tiny", f"--workdir={tmp_path}/run",
           f"--config.data.data_dir={tmp_path}/tfds", "--config.total_steps=2", "--config.batch_size=4",
           "--config.data.num_train=64", "--config.data.num_test=8", *overrides]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in p.stderr.splitlines() if line.startswith(("Error:", "Traceback"))]
    return p.returncode, errors


def test_main_missing_manual_dir_is_one_line(tmp_path):
    rc, errors = _main(tmp_path, "--config.data.name=gsm8k", f"--config.data.manual_dir={tmp_path}/nope")
    assert rc == 2 and errors == [
        f"Error: The GSM8K dataset is built from files you provide: put train.jsonl and test.jsonl (the official "
        f"GSM8K files) in manual_dir {tmp_path}/nope (which does not exist), or set data.manual_dir (manual_dir= "
        "in Python) to where they are; missing: train.jsonl, test.jsonl. (SCORE_JAX_DEBUG=1 shows the traceback)"]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_main_tokenizer_dir_without_tokenizer_is_one_line(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    rc, errors = _main(tmp_path, f"--config.tokenizer={tmp_path}/ckpt")
    assert rc == 2 and errors == [
        f"Error: Directory {tmp_path}/ckpt has neither tokenizer.model nor tokenizer.json (it holds config.json); "
        "point config.tokenizer at the model's checkpoint directory or its tokenizer file. (SCORE_JAX_DEBUG=1 "
        "shows the traceback)"]
    assert not (tmp_path / "run" / "checkpoints").exists()
