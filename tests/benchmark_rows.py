"""Small files in the schemas of the paper's benchmarks (from their dataset cards: column names,
HF feature types, answer formats), written with HF ``datasets`` as the hub's parquet files are,
for the benchmark presets' tests. Images are tiny drawings (no download)."""

from __future__ import annotations

import io
import os

from PIL import Image, ImageDraw


def png(seed: int = 0, size: int = 56) -> bytes:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((8 + seed, 8, 30 + seed, 30), fill=(200, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _image(seed):
    return {"bytes": png(seed), "path": None}


# name -> (features spec, rows, number of rows the preset keeps, answers it yields)
def schemas() -> dict:
    from datasets import Image as HFImage
    from datasets import Sequence, Value

    s, i64, f64 = Value("string"), Value("int64"), Value("float64")
    return {
        "geometry3k": (
            {"images": Sequence(HFImage()), "problem": s, "answer": s, "id": i64,
             "choices": Sequence(s), "ground_truth": s},
            [{"images": [_image(k)], "problem": f"<image>Find x. Case {k}.", "answer": a,
              "id": k, "choices": c, "ground_truth": g}
             for k, (a, c, g) in enumerate([("48", ["48", "24", "12", "6"], "A"),
                                            ("2\\sqrt{3}", ["1", "2\\sqrt{3}", "3", "4"], "B"),
                                            ("25", ["7", "24", "25", "31"], "C")])],
            3, ["48", "2\\sqrt{3}", "25"]),
        "mathvista": (
            {"pid": s, "question": s, "image": s, "decoded_image": HFImage(),
             "choices": Sequence(s), "unit": s, "precision": f64, "answer": s,
             "question_type": s, "answer_type": s, "query": s,
             "metadata": {"category": s, "context": s, "grade": s, "img_height": i64,
                          "img_width": i64, "language": s, "skills": Sequence(s),
                          "source": s, "split": s, "task": s}},
            [{"pid": "1", "question": "How many snowmen are there?", "image": "images/1.jpg",
              "decoded_image": _image(0), "choices": ["10", "15", "12", "20"], "unit": None,
              "precision": None, "answer": "12", "question_type": "multi_choice",
              "answer_type": "text",
              "query": "Hint: Please answer the question and provide the correct option letter, "
                       "e.g., A, B, C, D, at the end.\nQuestion: How many snowmen are there?\n"
                       "Choices:\n(A) 10\n(B) 15\n(C) 12\n(D) 20"},
             {"pid": "2", "question": "What is the length?", "image": "images/2.jpg",
              "decoded_image": _image(1), "choices": None, "unit": "cm", "precision": 1.0,
              "answer": "4.5", "question_type": "free_form", "answer_type": "float",
              "query": "Hint: Please answer the question requiring a floating-point number with "
                       "one decimal place and provide the final value, e.g., 1.2, 1.3, 1.4, at "
                       "the end.\nQuestion: What is the length? (Unit: cm)"},
             {"pid": "3", "question": "How many people?", "image": "images/3.jpg",
              "decoded_image": _image(2), "choices": None, "unit": "", "precision": None,
              "answer": "7", "question_type": "free_form", "answer_type": "integer",
              "query": "Hint: Please answer the question requiring an integer answer and provide "
                       "the final value, e.g., 1, 2, 3, at the end.\nQuestion: How many people?"}],
            3, [("12", "C"), "4.5", "7"]),
        "wemath": (
            {"ID": s, "split": s, "knowledge concept": s, "question": s, "option": s,
             "answer": s, "image_path": HFImage(), "key": s, "question number": i64,
             "knowledge concept description": s},
            [{"ID": f"3steps_{k}", "split": "testmini", "knowledge concept": "Area of circles",
              "question": f"What is the area? Case {k}.",
              "option": "A. 200.96;B. 3215.36;C. 6280;D. 32; E. No correct answer",
              "answer": a, "image_path": _image(k), "key": "3steps_3", "question number": k,
              "knowledge concept description": "..."} for k, a in enumerate("BAE")],
            3, ["B", "A", "E"]),
        "mmk12": (
            {"id": s, "subject": s, "question": s, "answer": s, "image": HFImage()},
            [{"id": f"math_{k}", "subject": subject,
              "question": "If the program flowchart shown in the figure is executed, then the "
                          "value of the output $S$ is ( )\nA. -8\nB. -23\nC. -44\nD. -71",
              "answer": a, "image": _image(k)}
             for k, (subject, a) in enumerate([("math", "C"), ("physics", "A"),
                                               ("biology", "D")])],
            3, ["C", "A", "D"]),
        **{name: (
            {"sample_index": s, "problem_index": s, "problem_version": s, "question": s,
             "image": HFImage(), "answer": s, "question_type": s,
             "metadata": {"split": s, "source": s, "subject": s, "subfield": s},
             "query_wo": s, "query_cot": s, "question_for_eval": s},
            [{"sample_index": str(k + 1), "problem_index": "1", "problem_version": version,
              "question": "" if version == "Vision Only" else
              "As shown in the figure, then the degree of angle AOB is ()\nChoices:\nA:35°\n"
              "B:70°\nC:105°\nD:150°", "image": _image(k), "answer": answer,
              "question_type": kind, "query_wo": "...", "query_cot": "...",
              "question_for_eval": "..."}
             for k, (version, kind, answer) in enumerate([
                 ("Text Dominant", "multi-choice", "B"), ("Vision Only", "multi-choice", "A"),
                 ("Vision Intensive", "free-form", "70"), ("Vision Dominant", "multi-choice", "B"),
                 ("Text Lite", "multi-choice", "D")])],
            kept, answers) for name, kept, answers in (
                ("mathverse", 4, ["B", "A", "B", "D"]), ("mathverse_v", 2, ["A", "B"]))},
        "logicvista": (
            {"question": s, "answer": s, "reasoning": s, "image": HFImage(), "skill": s,
             "broad_capability": s, "specific_capability": s, "imagesource": s,
             "sourcelink": s, "liscenced": s, "id": s},
            [{"question": "How many triangles will be in the 6th shape? Select answers from A-D."
                          " \n A) 10 B) 12 C) 14 D) 16", "answer": a, "reasoning": "...",
              "image": _image(k), "skill": "inductive", "broad_capability": "...",
              "specific_capability": "...", "imagesource": "...", "sourcelink": "...",
              "liscenced": "yes", "id": str(k)} for k, a in enumerate(["C", "A, C", "3"])],
            3, ["C", "A, C", "3"]),
        "clevr_count": (
            {"images": Sequence(HFImage()), "problem": s, "answer": s},
            [{"images": [_image(k)], "problem": "<image>How many items are there in the image?",
              "answer": str(a)} for k, a in enumerate([3, 10, 6])],
            3, ["3", "10", "6"]),
        "mmmu_pro": (
            {"id": s, "image": HFImage(), "options": s, "answer": s, "subject": s},
            [{"id": f"test_Chemistry_{k}", "image": _image(k),
              "options": "['1.2 mol', '2.4 mol', '3.6 mol', '4.8 mol']", "answer": a,
              "subject": "Chemistry"} for k, a in enumerate("BJA")],
            3, ["B", "J", "A"]),
    }


def write(name: str, folder: str, rows=None) -> str:
    """``<folder>/<name>.parquet`` in the benchmark's schema (optionally other rows)."""
    from datasets import Dataset, Features

    spec, default_rows, _, _ = schemas()[name]
    rows = default_rows if rows is None else rows
    columns = {c: [r.get(c) for r in rows] for c in spec}
    path = os.path.join(folder, f"{name}.parquet")
    Dataset.from_dict(columns, features=Features(spec)).to_parquet(path)
    return path


def png_of(side: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", side, "white").save(buffer, format="PNG")
    return buffer.getvalue()


def bad_rows_file(folder: str, form: str, with_paths: bool, column: str = "images") -> str:
    """A counting-task parquet file written by HF ``datasets`` with an image column of
    ``Image()`` (``form`` "single") or ``Sequence(Image())`` ("sequence"), as HF-hosted image
    datasets are stored: 6 good rows, then a corrupt image, an image below the processor's
    28 px side, an empty problem and a missing answer."""
    from datasets import Dataset, Features, Sequence, Value
    from datasets import Image as HFImage

    from megatron_papo.data import counting_rows

    def cell(data, i):
        value = {"bytes": data, "path": f"img{i}.png" if with_paths else None}
        return [value] if form == "sequence" else value
    rows = counting_rows(10, seed=4)
    images = [r["image"] for r in rows[:6]] + [b"\x89PNG but not really", png_of((20, 64)),
                                               rows[8]["image"], rows[9]["image"]]
    problems = [r["problem"] for r in rows[:8]] + [" ", rows[9]["problem"]]
    answers = [r["answer"] for r in rows[:9]] + [None]
    feature = Sequence(HFImage()) if form == "sequence" else HFImage()
    table = Dataset.from_dict(
        {column: [cell(d, i) for i, d in enumerate(images)], "problem": problems,
         "answer": answers},
        features=Features({column: feature, "problem": Value("string"),
                           "answer": Value("string")}))
    path = os.path.join(folder, f"{form}{'_paths' if with_paths else ''}.parquet")
    table.to_parquet(path)
    return path
