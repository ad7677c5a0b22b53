"""Datasets: the synthetic counting task really shows the counted shapes; HF datasets files
(parquet, JSON with image paths) load into chat prompts; bad rows are skipped and counted, too
many of them or a wrong column name stop with an error naming the file/key."""

import io
import json
from collections import deque

import datasets
import numpy as np
import pytest
from PIL import Image

from benchmark_rows import bad_rows_file, png_of
from megatron_papo.data import DataConfig, DataError, counting_rows, load_examples, load_split
from megatron_papo.data.synthetic import QUESTION


def _blobs(image: Image.Image) -> int:
    """Connected components of non-white pixels (4-neighbourhood)."""
    ink = (np.asarray(image.convert("RGB")).astype(int).sum(-1) < 700)
    seen = np.zeros_like(ink)
    count = 0
    for y, x in zip(*np.nonzero(ink)):
        if seen[y, x]:
            continue
        count += 1
        queue = deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < ink.shape[0] and 0 <= nx < ink.shape[1] and ink[ny, nx] \
                        and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return count


def test_counting_images_show_the_answer():
    rows = counting_rows(40, seed=3)
    answers = [int(r["answer"]) for r in rows]
    assert set(answers) == {1, 2, 3, 4} and all(r["problem"] == QUESTION for r in rows)
    for row in rows:
        image = Image.open(io.BytesIO(row["image"]))
        assert image.size == (56, 56)
        assert _blobs(image) == int(row["answer"])
    assert counting_rows(5, seed=3) == rows[:5]  # deterministic


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_hint_task_hints_are_right_at_the_set_rate_and_answers_grade(tmp_path, p):
    """data=counting_hint: the same images and answers as the plain task, each question prefixed
    with a hint that is right with probability p (column "hint"; a wrong hint names another
    count in range); the true answer grades 1 and the hinted count of a wrong hint 0; the loader
    keeps the column as each example's group (data.group_key) for the per-group accuracy."""
    from megatron_papo.reward import score_all

    plain = counting_rows(400, seed=4)
    rows = counting_rows(400, seed=4, hint=p)
    assert [(r["image"], r["answer"]) for r in rows] == [(r["image"], r["answer"]) for r in plain]
    said = [int(r["problem"].split()[4]) for r in rows]
    right = [r["hint"] == "right" for r in rows]
    assert all(r["problem"] == f"I think there are {h} shapes. {QUESTION}"
               for r, h in zip(rows, said))
    assert all((h == int(r["answer"])) == ok for r, h, ok in zip(rows, said, right))
    assert set(said) <= {1, 2, 3, 4}
    rate = sum(right) / len(rows)
    assert abs(rate - p) <= 0.08  # 400 rows: 3.3 standard deviations at p = 0.5
    wrong = [(r, h) for r, h, ok in zip(rows, said, right) if not ok]
    responses = [f"\\boxed{{{r['answer']}}}" for r in rows] + [f"\\boxed{{{h}}}" for _, h in wrong]
    scored = score_all(responses, [r["answer"] for r in rows] + [r["answer"] for r, _ in wrong])
    assert [s.accuracy for s in scored] == [1.0] * len(rows) + [0.0] * len(wrong)
    path = _write(tmp_path, rows[:20])
    examples, _ = load_examples(path, DataConfig(group_key="hint", prompt_template="{problem}"))
    assert [e.group for e in examples] == [r["hint"] for r in rows[:20]]
    with pytest.raises(DataError, match="data.group_key='source'"):
        load_examples(path, DataConfig(group_key="source"))
    with pytest.raises(ValueError, match="synthetic_hint=1.5"):
        counting_rows(2, hint=1.5)


def _write(tmp_path, rows, name="train.parquet"):
    path = str(tmp_path / name)
    datasets.Dataset.from_list(rows).to_parquet(path)
    return path


def test_parquet_rows_become_prompts_and_bad_rows_are_counted(tmp_path):
    good = counting_rows(8, seed=1)
    bad = [dict(good[0], image=None), dict(good[1], image=b"not a png"),
           dict(good[2], problem="  "), dict(good[3], answer=None)]
    path = _write(tmp_path, good + bad)
    examples, summary = load_examples(path, DataConfig(max_bad_fraction=0.4))
    assert summary.rows == 12 and summary.kept == 8 and len(examples) == 8
    assert summary.bad == {"missing image": [8], "corrupt image": [9], "empty problem": [10],
                           "missing answer": [11]}
    assert "8/12 rows kept, 4 skipped" in summary.line()
    first = examples[0]
    content = first.messages[0]["content"]
    assert isinstance(content[0]["image"], Image.Image) and content[0]["type"] == "image"
    assert content[1]["text"].startswith(QUESTION) and "\\boxed{}" in content[1]["text"]
    assert first.answer == good[0]["answer"] and first.source == f"{path}:0"
    with pytest.raises(DataError, match=r"4 of 12 rows are bad .*data.max_bad_fraction=0.1; "
                                        r"first bad rows: \[8, 9, 10, 11\]"):
        load_examples(path, DataConfig(max_bad_fraction=0.1))


def test_json_with_image_paths_and_custom_columns(tmp_path):
    rows = counting_rows(3, seed=2)
    records = []
    for i, row in enumerate(rows):
        image_path = tmp_path / f"{i}.png"
        image_path.write_bytes(row["image"])
        records.append({"images": [str(image_path)], "question": "count", "solution": row["answer"]})
    path = tmp_path / "val.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    config = DataConfig(image_key="images", problem_key="question", answer_key="solution",
                        prompt_template="{problem}?")
    lines = []
    examples = load_split([str(path)], config, log=lines.append)
    assert [e.answer for e in examples] == [r["answer"] for r in rows]
    assert examples[0].messages[0]["content"][-1]["text"] == "count?"
    assert lines == [f"[data] {path}: 3/3 rows kept"]


def test_wrong_column_or_file_is_a_clear_error(tmp_path):
    path = _write(tmp_path, counting_rows(2))
    with pytest.raises(DataError, match=r"data.image_key='images' is not a column of .*"
                                        r"columns: \['image', 'problem', 'answer'\]"):
        load_examples(path, DataConfig(image_key="images"))
    with pytest.raises(DataError, match="does not exist"):
        load_examples(str(tmp_path / "missing.parquet"), DataConfig())
    with pytest.raises(DataError, match="data.prompt_template must contain"):
        DataConfig(prompt_template="no placeholder")


@pytest.mark.parametrize("form,with_paths", [("single", False), ("single", True),
                                             ("sequence", False), ("sequence", True)])
def test_hf_image_features_with_bad_rows_are_counted_not_fatal(tmp_path, form, with_paths):
    """Image columns stored with HF ``Image`` features (single and ``Sequence``, with and
    without ``path`` fields): a corrupt image, an image smaller than the processor's minimum
    side, an empty problem and a missing answer are each a counted, skipped row with its reason
    (datasets' own decoding would have raised on the corrupt one); the good rows load; above
    data.max_bad_fraction it is one error naming the file and the rows."""
    path = bad_rows_file(str(tmp_path), form, with_paths)
    lines = []
    config = DataConfig(image_key="images", max_bad_fraction=0.5)
    examples = load_split([path], config, log=lines.append)
    assert len(examples) == 6
    assert all(isinstance(e.messages[0]["content"][0]["image"], Image.Image) for e in examples)
    assert lines == [f"[data] {path}: 6/10 rows kept, 4 skipped (1 corrupt image, 1 image "
                     "smaller than 28 px, 1 empty problem, 1 missing answer)"]
    with pytest.raises(DataError, match=r"4 of 10 rows are bad .* first bad rows: "
                                        r"\[6, 7, 8, 9\]") as err:
        load_examples(path, DataConfig(image_key="images", max_bad_fraction=0.1))
    assert "\n" not in str(err.value)


def test_images_above_the_pixel_limit_are_refused_before_decoding():
    from megatron_papo.data.images import check_image

    big = io.BytesIO()
    Image.new("1", (12_000, 8_000)).save(big, format="PNG")  # 96 MP: a small file
    assert check_image(big.getvalue()) == "image larger than 89478485 pixels"
    assert check_image(png_of((56, 27))) == "image smaller than 28 px"
    assert check_image(png_of((56, 56))) is None and check_image(None) == "missing image"


def test_image_placeholders_place_several_images_in_order(tmp_path):
    """ViRL39K / MMMU style rows: a list of images and one '<image>' per image in the problem:
    each image takes its placeholder's place, in order; no placeholder: the images come first;
    a count that differs is a one-line error naming the file and the row."""
    rows = counting_rows(3, seed=4)
    first, second = rows[0]["image"], rows[1]["image"]
    good = [{"image": [first, second], "problem": "<image> left, <image> right: how many?",
             "answer": "3"},
            {"image": [first, second], "problem": "how many in both?", "answer": "4"},
            {"image": [first], "problem": "<image>count", "answer": "1"}]
    config = DataConfig(prompt_template="{problem}")
    examples, _ = load_examples(_write(tmp_path, good), config)
    kinds = [[c["type"] for c in e.messages[0]["content"]] for e in examples]
    assert kinds == [["image", "text", "image", "text"], ["image", "image", "text"],
                     ["image", "text"]]
    content = examples[0].messages[0]["content"]
    assert content[1]["text"] == " left, " and content[3]["text"] == " right: how many?"
    assert np.array_equal(np.asarray(content[0]["image"]),
                          np.asarray(Image.open(io.BytesIO(first))))
    assert np.array_equal(np.asarray(content[2]["image"]),
                          np.asarray(Image.open(io.BytesIO(second))))
    assert [e.image_count for e in examples] == [2, 2, 1]
    bad = good + [{"image": [first], "problem": "<image> and <image>", "answer": "2"}]
    with pytest.raises(DataError) as err:
        load_examples(_write(tmp_path, bad, "bad.parquet"), config)
    assert "bad.parquet' row 3: 2 '<image>' placeholder(s) in the prompt but 1 image(s)" \
        in str(err.value) and "\n" not in str(err.value)
