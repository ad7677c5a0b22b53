"""The paper's benchmarks as presets: each preset reads a file in its dataset's schema (generated
here from the dataset card: column names, HF feature types, answer formats), keeps the rows the
paper keeps, builds the prompt with the image and the evaluation instruction, and yields golds
the math grader accepts; a wrong schema, answer type or value is one clear error."""

import pytest

import benchmark_rows
from megatron_papo.data.benchmarks import (
    EVAL_INSTRUCTION,
    BenchmarkError,
    available_presets,
    load_benchmark,
    load_preset,
    summary_table,
)
from megatron_papo.reward import score

PRESETS = ["geometry3k", "mathvista", "wemath", "mmk12", "mathverse", "mathverse_v",
           "logicvista", "clevr_count", "mmmu_pro"]


def test_every_benchmark_of_the_paper_has_a_preset_in_its_group():
    assert available_presets() == sorted(PRESETS)
    groups = {name: load_preset(name).group for name in PRESETS}
    assert [n for n in PRESETS if groups[n] == "general"] == PRESETS[:5]
    assert [n for n in PRESETS if groups[n] == "vision"] == PRESETS[5:]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_reads_its_schema(name, tmp_path):
    path = benchmark_rows.write(name, str(tmp_path))
    _, rows, kept, answers = benchmark_rows.schemas()[name]
    examples, summary = load_benchmark(name, path)
    assert len(examples) == kept == summary.kept and not summary.bad
    assert [e.answer for e in examples] == [tuple(a) if isinstance(a, tuple) else a
                                            for a in answers]
    for example in examples:
        content = example.messages[0]["content"]
        assert [c["type"] for c in content] == ["image", "text"]
        assert content[0]["image"].size == (56, 56)
        text = content[1]["text"]
        assert text.endswith(EVAL_INSTRUCTION) and "<image>" not in text
    first = examples[0].messages[0]["content"][1]["text"]
    expected = {"geometry3k": "Find x. Case 0.", "mathvista": "(C) 12\n(D) 20",
                "wemath": "Choices: A. 200.96;B. 3215.36", "mmk12": "\nA. -8\nB. -23",
                "mathverse": "Choices:\nA:35°", "logicvista": "A) 10 B) 12",
                "clevr_count": "How many items are there in the image?"}
    if name == "mmmu_pro":  # the vision setting: the question is in the image
        assert first == EVAL_INSTRUCTION
    elif name == "mathverse_v":  # its first kept row is the Vision Only version
        assert first == EVAL_INSTRUCTION
    else:
        assert expected[name] in first


@pytest.mark.parametrize("response,gold,correct", [
    ("<think> </think> \\boxed{C}", ("12", "C"), True),     # MathVista: the option's letter
    ("<think> </think> \\boxed{12}", ("12", "C"), True),    # ... or its text
    ("<think> </think> \\boxed{B}", ("12", "C"), False),
    ("<think> </think> \\boxed{B}", "B", True),             # a letter gold
    ("<think> </think> \\boxed{4.50}", "4.5", True),        # a number
    ("<think> </think> \\boxed{2\\sqrt{3}}", "2\\sqrt{3}", True),  # an expression
    ("<think> </think> \\boxed{A, C}", "A, C", True),       # LogicVista's several letters
])
def test_benchmark_golds_are_graded_by_the_math_reward(response, gold, correct):
    assert score(response, gold).accuracy == float(correct)


def test_a_file_of_another_schema_names_the_missing_column(tmp_path):
    path = benchmark_rows.write("clevr_count", str(tmp_path))
    with pytest.raises(BenchmarkError) as err:
        load_benchmark("mathvista", path)
    message = str(err.value)
    assert "benchmark mathvista (configs/benchmark/mathvista.yaml): column 'decoded_image' is " \
           "not in" in message and "AI4Math/MathVista testmini schema" in message
    assert "\n" not in message


def test_unknown_answer_types_and_values_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntitle: X\ngroup: general\ndataset: d\nsplit: test\nimage: image\n"
                   "question: '{q}'\nanswer: answer\nanswer_type: fraction\n")
    with pytest.raises(BenchmarkError, match="answer type 'fraction' is not one of"):
        load_preset(str(bad))
    bad.write_text(bad.read_text().replace("group: general", "group: science")
                   .replace("fraction", "letter"))
    with pytest.raises(BenchmarkError, match="group='science': choose one of"):
        load_preset(str(bad))
    with pytest.raises(BenchmarkError, match="unknown benchmark 'mathvision': choose one of"):
        load_preset("mathvision")
    rows = benchmark_rows.schemas()["mathvista"][1]
    path = benchmark_rows.write("mathvista", str(tmp_path),
                                [rows[0], {**rows[1], "answer_type": "fraction"}])
    with pytest.raises(BenchmarkError, match="row 1 of .* has answer_type='fraction', which "
                                             "answer_type.map does not name"):
        load_benchmark("mathvista", path)


def test_rows_whose_gold_does_not_fit_their_type_are_counted(tmp_path):
    rows = benchmark_rows.schemas()["mmk12"][1]
    bad = [{**rows[0], "answer": "the third one"}] + rows * 10
    path = benchmark_rows.write("mmk12", str(tmp_path), bad)
    examples, summary = load_benchmark("mmk12", path)
    assert len(examples) == 30 and summary.bad == {"answer not a valid letter": [0]}
    with pytest.raises(BenchmarkError, match="1 of 4 rows are bad"):
        load_benchmark("mmk12", benchmark_rows.write("mmk12", str(tmp_path), bad[:4]))


@pytest.mark.parametrize("name", ["geometry3k", "mmk12"])  # Sequence(Image()) and Image()
def test_corrupt_and_tiny_images_in_a_benchmark_file_are_counted(name, tmp_path):
    """A benchmark file written by HF datasets with a corrupt image and one below the
    processor's 28 px side among good rows: both counted and skipped with their reasons (HF's
    own decoding would have raised while iterating)."""
    column = "images" if name == "geometry3k" else "image"
    rows = benchmark_rows.schemas()[name][1]

    def with_image(row, data):
        value = {"bytes": data, "path": "x.png"}
        return {**row, column: [value] if name == "geometry3k" else value}
    bad = [with_image(rows[0], b"GIF89a not really"),
           with_image(rows[1], benchmark_rows.png(size=20))]
    path = benchmark_rows.write(name, str(tmp_path), rows * 20 + bad)
    examples, summary = load_benchmark(name, path)
    assert len(examples) == 60
    assert summary.bad == {"corrupt image": [60], "image smaller than 28 px": [61]}


def test_summary_table_averages_each_group_as_the_paper():
    presets = {n: load_preset(n) for n in ("geometry3k", "mathvista", "clevr_count")}
    table = summary_table({"geometry3k": {"accuracy": 0.2872}, "mathvista": {"accuracy": 0.5934},
                           "clevr_count": {"accuracy": 0.5581}}, presets)
    assert "General multimodal reasoning:\n  Geo3k           28.72\n  MathVista       59.34\n" \
           "  average         44.03" in table
    assert "Vision-dependent multimodal reasoning:\n  Counting        55.81" in table
    assert table.endswith("Overall (3 benchmarks): 47.96")
