"""The `spotlight` CLI, in process through main([...]), on a tiny random Llama saved to a tmp folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_model
from spotlight_attn.cli.main import main
from spotlight_attn.config import HasherConfig
from spotlight_attn.hashing import MLPHasher, save_hasher
from spotlight_attn.models import ModelGeometry

PROMPT = "the cat sat on the mat and the dog ran to the red house " * 4  # 56 words
SUMMARY = re.compile(r"^\[spotlight\] prompt (\d+) tokens \| new (\d+) tokens .* read ([\d.]+)% of the cache", re.M)
SPARSE = ["--budget", "0.25", "--min-tokens", "4", "--sink", "1", "--window", "2", "--dense-layers", "0", "--page-size", "4"]


@pytest.fixture(scope="module")
def hasher_file(tiny_dir, tmp_path_factory) -> Path:
    geometry = ModelGeometry.from_config(tiny_model("llama", 4, 2, 16, 3).config)
    hasher = MLPHasher(geometry, HasherConfig(bits=32, width=8), layers=range(1, geometry.num_layers))
    return save_hasher(hasher, tmp_path_factory.mktemp("hasher") / "tiny.safetensors")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def generate(capsys, model_dir, *extra) -> tuple[int, str, str]:
    return run_cli(capsys, "generate", "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", 5, "--device", "cpu", *extra)


@pytest.mark.parametrize("method", ["dense", "oracle", "spotlight", "linear", "quest", "streaming"])
def test_generate_each_method_prints_text_and_one_summary(capsys, tiny_dir, hasher_file, method):
    extra = ["--hasher", hasher_file] if method == "spotlight" else []
    code, out, err = generate(capsys, tiny_dir, "--method", method, *SPARSE, *extra)
    assert code == 0, err
    assert out.strip()  # the completion
    summaries = SUMMARY.findall(err)
    assert len(summaries) == 1, err
    prompt_tokens, new_tokens, read = summaries[0]
    assert int(prompt_tokens) > 56 and int(new_tokens) == 5  # 56 words + chat markers
    assert f"method {method}" in err
    read = float(read)
    if method == "dense":
        assert read == 100.0
    else:  # layer 0 reads all, layers 1 and 2 about a quarter
        assert 20.0 < read < 80.0


def test_generate_no_chat_prompt_file_and_sampling(capsys, tiny_dir, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(PROMPT, encoding="utf-8")
    code, out, err = run_cli(
        capsys, "generate", "--model", tiny_dir, "--prompt-file", prompt, "--no-chat", "--method", "quest", *SPARSE,
        "--max-new-tokens", 3, "--sample", "--temperature", "1.0", "--gen-seed", 3,
    )
    assert code == 0, err
    prompt_tokens, new_tokens, _ = SUMMARY.findall(err)[0]
    assert int(prompt_tokens) == 56 and int(new_tokens) == 3  # no template: exactly the words
    again = run_cli(
        capsys, "generate", "--model", tiny_dir, "--prompt-file", prompt, "--no-chat", "--method", "quest", *SPARSE,
        "--max-new-tokens", 3, "--sample", "--temperature", "1.0", "--gen-seed", 3,
    )
    assert again[1] == out  # same seed, same sample


@pytest.mark.parametrize("budget", ["1.5", "abc", "-3"])
def test_bad_budget_is_one_line_naming_it(capsys, tiny_dir, budget):
    code, out, err = generate(capsys, tiny_dir, "--method", "oracle", "--budget", budget)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("spotlight: error: ") and budget in err
    assert "Traceback" not in err


def test_missing_prompt_file_names_it(capsys, tiny_dir, tmp_path):
    missing = tmp_path / "no-such-prompt.txt"
    code, out, err = run_cli(capsys, "generate", "--model", tiny_dir, "--method", "oracle", "--prompt-file", missing)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("spotlight: error: ") and str(missing) in err


def test_unknown_model_names_it(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    code, out, err = run_cli(capsys, "generate", "--model", missing, "--method", "oracle", "--prompt", "hi")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("spotlight: error: ") and str(missing) in err


def test_spotlight_without_hasher_is_refused(capsys, tiny_dir):
    code, out, err = generate(capsys, tiny_dir, "--method", "spotlight")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "spotlight: error: method 'spotlight' needs --hasher" in err


def test_hasher_for_a_method_that_takes_none_is_refused(capsys, tiny_dir, hasher_file):
    code, _, err = generate(capsys, tiny_dir, "--method", "quest", "--hasher", hasher_file)
    assert code == 2 and err.count("\n") == 1 and "takes no hasher" in err


def test_bad_dense_layers_is_one_line(capsys, tiny_dir):
    code, _, err = generate(capsys, tiny_dir, "--method", "oracle", "--dense-layers", "0,x")
    assert code == 2 and err.count("\n") == 1 and "--dense-layers" in err
    code, _, err = generate(capsys, tiny_dir, "--method", "oracle", "--dense-layers", "7")
    assert code == 2 and err.count("\n") == 1 and "[7]" in err


def test_verbose_error_adds_the_traceback(capsys, tiny_dir):
    code, _, err = generate(capsys, tiny_dir, "-v", "--method", "oracle", "--budget", "abc")
    assert code == 2 and "Traceback" in err and err.rstrip().endswith("spotlight: error: budget 'abc' is not a number: "
                                                                       "use a fraction like 0.02, '2%', or a count like 512")


def test_prompt_longer_than_the_model_context_is_refused(capsys, tiny_dir):
    code, _, err = run_cli(capsys, "generate", "--model", tiny_dir, "--method", "oracle", "--prompt", PROMPT * 20)
    assert code == 2 and err.count("\n") == 1 and "exceeds the model's context of 1024" in err


def test_demo_runs_on_the_tiny_model(capsys, tiny_dir):
    code, out, err = run_cli(capsys, "demo", "--model", tiny_dir, "--context-tokens", 300, "--max-new-tokens", 3,
                             "--method", "linear", *SPARSE)
    assert code == 0, err
    assert "Question: What is the secret passcode?" in out
    assert "linear (256 bits), budget 25% of the cache, dense layers 0" in out
    assert out.count("  answer: ") == 2 and out.count(" of the cache per decode step") == 2


def test_module_runs_as_a_program():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run([sys.executable, "-m", "spotlight_attn.cli.main", "--help"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "generate" in done.stdout and "demo" in done.stdout


@pytest.mark.slow
def test_real_model_oracle_answers_capital_of_france(capsys):
    pytest.importorskip("gguf")
    question = "What is the capital of France?"
    code, out, err = run_cli(capsys, "generate", "--model", "smollm2-135m", "--method", "oracle", "--budget", "0.1",
                             "--prompt", question, "--max-new-tokens", 24)
    assert code == 0, err
    assert "Paris" in out and len(SUMMARY.findall(err)) == 1


@pytest.mark.slow
def test_real_model_demo_dense_answers(capsys):
    pytest.importorskip("gguf")
    code, out, err = run_cli(capsys, "demo")
    assert code == 0, err
    dense_block = out.split("\ndense (the model's own attention)\n")[1]
    assert "-> correct" in dense_block.splitlines()[0], out  # the dense answer line


def test_printed_decode_time_leaves_the_warm_up_out(capsys, tiny_dir, monkeypatch):
    """A slow first decode step (as one-time kernel compilation makes it on a GPU) is shown apart and
    does not enter the printed ms/token."""
    import time

    from spotlight_attn import demo

    put = demo._StepClock.put

    def slow_first_step(self, value):
        if len(self.stamps) == 2:  # the first decode step: between the first and the second new token
            time.sleep(0.4)
        put(self, value)

    monkeypatch.setattr(demo._StepClock, "put", slow_first_step)
    code, out, err = generate(capsys, tiny_dir, "--method", "dense", "--max-new-tokens", 6)
    assert code == 0, err
    match = re.search(r"decode ([\d.]+) ms/token \(median of 5 steps; the first took ([\d.]+) ms, one-time warm-up included\)", err)
    assert match, err
    assert float(match[1]) < 200 and float(match[2]) >= 400
    assert "budget none (dense reads every key)" in err


def test_help_imports_neither_torch_nor_transformers():
    """`spotlight --help` stays fast (about 0.1 s here instead of 4 s): the heavy imports wait for a command."""
    code = ("import sys; from spotlight_attn.cli.main import build_parser; build_parser().format_help(); "
            "import spotlight_attn; heavy = {'torch', 'transformers'} & set(sys.modules); assert not heavy, heavy")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_device_this_machine_lacks_is_one_line(capsys, tiny_dir):
    for device, text in [("cuda", "CUDA is not available here"), ("cuda:3", "CUDA is not available here"),
                         ("tpu", "is not a torch device")]:
        code, out, err = generate(capsys, tiny_dir, "--method", "oracle", "--device", device)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert err.startswith(f"spotlight: error: device '{device}'") and text in err
