"""Data sources: spec parsing, relook-schema tables (JSONL, Parquet, save_to_disk, exported
folder), the DeepEyes / verl adapter, benchmark folders, user loaders, errors naming file, row
and field, and the deterministic mixing stream."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from agent.data.sources import (
    DataStream,
    GeneratorSource,
    ItemSource,
    check_sources,
    eval_rows,
    open_source,
    open_stream,
    parse_spec,
)
from agent.data.tasks import Sample, generate_one
from tests.agent import benchmark_fixtures as fx

SIZES = [(40, 32), (48, 36), (56, 40), (64, 44)]


def png(size, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def relook_rows(folder: Path, n: int = 4) -> list[dict]:
    """``n`` rows of relook's schema; images written under ``folder/img`` (paths relative)."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rel = f"img/{i}.png"
        (folder / rel).write_bytes(png(SIZES[i % len(SIZES)], (10 * i, 90, 200)))
        rows.append(
            {"id": f"q{i}", "images": [rel], "question": f"How many dots in {i}?",
             "answer": str(i), "answer_type": "int", "family": "dots"}
        )  # fmt: skip
    return rows


def write_jsonl(folder: Path, n: int = 4, drop: str | None = None) -> Path:
    path = folder / "train.jsonl"
    rows = relook_rows(folder, n)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps({k: v for k, v in row.items() if k != drop}) + "\n")
    return path


def deepeyes_rows(n: int = 4) -> list[dict]:
    """Rows as verl's ``recipe/deepeyes/deepeyes47k_preprocess.py`` writes them."""
    return [
        {
            "data_source": "deepeyes_vstar",
            "prompt": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"<image>\nWhat colour is object {i}?"},
            ],
            "images": [{"bytes": png(SIZES[i % len(SIZES)]), "path": None}],
            "ability": "perception",
            "reward_model": {"ground_truth": "red", "style": "model"},
            "extra_info": {"split": "train", "index": i, "answer": "red"},
        }
        for i in range(n)
    ]


def write_deepeyes(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "deepeyes.parquet"
    pq.write_table(pa.Table.from_pylist(deepeyes_rows(n)), path)
    return path


def test_parse_spec_grammar(tmp_path):
    assert parse_spec("generator").format == "generator"
    assert parse_spec("generator:0.3").weight == 0.3
    spec = parse_spec("vstar:/data/v:0.25")
    assert (spec.format, spec.path, spec.weight, spec.weighted) == ("vstar", "/data/v", 0.25, True)
    assert parse_spec("a.jsonl").format == "jsonl" and not parse_spec("a.jsonl").weighted
    assert parse_spec("b.parquet:2").weight == 2.0
    assert parse_spec("my.pkg:load:x/y").format == "my.pkg:load"
    assert parse_spec("jsonl:/odd:dir/a.txt").path == "/odd:dir/a.txt"
    with pytest.raises(ValueError, match="positive"):
        parse_spec("a.jsonl:0")
    with pytest.raises(ValueError, match="no path"):
        parse_spec("vstar:")
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        parse_spec(str(tmp_path / "nothing-here"))


def test_jsonl_rows_become_samples_with_lazy_images(tmp_path):
    source = open_source(str(write_jsonl(tmp_path)))
    assert source.size == 4
    (tmp_path / "img" / "3.png").unlink()  # only drawn rows are decoded
    s = source.sample(1)
    assert isinstance(s, Sample)
    assert (s.id, s.question, s.answer, s.answer_type, s.family) == (
        "q1", "How many dots in 1?", "1", "int", "dots"
    )  # fmt: skip
    assert s.images[0].size == SIZES[1] and s.images[0].mode == "RGB"
    with pytest.raises(FileNotFoundError, match=r"train\.jsonl row 3 field 'images'"):
        source.sample(3)


def test_parquet_options_boxes_and_bytes(tmp_path):
    rows = [
        {"images": [png((30, 30)), png((31, 30))], "question": "Which is red?", "answer": "B",
         "options": ["the first", "the second"], "target_image": 2, "target_bbox": [1, 2, 9, 9],
         "meta": json.dumps({"k": 1})}
    ]  # fmt: skip
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    s = open_source(str(path)).sample(0)
    assert s.question == "Which is red?\n(A) the first\n(B) the second"
    assert (s.answer, s.answer_type, s.target_image, s.target_bbox) == (
        "B",
        "word",
        2,
        (1, 2, 9, 9),
    )
    assert [im.size for im in s.images] == [(30, 30), (31, 30)]
    assert s.meta["k"] == 1 and s.meta["choices"] == ["the first", "the second"]


def test_exported_folder_and_save_to_disk_read_the_same_samples(tmp_path):
    from datasets import Dataset, List
    from datasets import Image as HFImage

    from agent.data.io import export_split
    from agent.data.tasks import generate

    samples = generate("test", 3, seed=0)
    folder = export_split(samples, tmp_path / "export")
    got = open_source(str(folder))
    assert got.size == 3
    first = got.sample(0)
    assert (first.id, first.answer, first.family) == (
        samples[0].id,
        samples[0].answer,
        samples[0].family,
    )
    assert first.images[0].tobytes() == samples[0].images[0].tobytes()
    rows = relook_rows(tmp_path / "disk-src", 2)
    ds = Dataset.from_list(
        [{**r, "images": [str(tmp_path / "disk-src" / p) for p in r["images"]]} for r in rows]
    ).cast_column("images", List(HFImage()))
    ds.save_to_disk(str(tmp_path / "disk"))
    disk = open_source(str(tmp_path / "disk"))
    assert disk.sample(1).images[0].size == SIZES[1] and disk.sample(1).answer == "1"


def test_deepeyes_parquet_adapter(tmp_path):
    path = write_deepeyes(tmp_path)
    for spec in (str(path), f"deepeyes:{path}"):
        s = open_source(spec).sample(2)
        assert (s.id, s.question, s.answer, s.family) == (
            "2", "What colour is object 2?", "red", "deepeyes_vstar"
        )  # fmt: skip
        assert s.images[0].size == SIZES[2]
    with pytest.raises(ValueError, match="not a DeepEyes"):
        open_source(f"deepeyes:{_relook_parquet(tmp_path)}")


def _relook_parquet(tmp_path: Path) -> Path:
    path = tmp_path / "relook.parquet"
    pq.write_table(pa.Table.from_pylist([{"images": [png((20, 20))], "question": "q",
                                          "answer": "a"}]), path)  # fmt: skip
    return path


def test_benchmark_folder_is_a_source(tmp_path):
    root = fx.vstar(tmp_path / "vstar")
    source = open_source(f"vstar:{root}")
    assert isinstance(source, ItemSource) and source.size > 0
    s = source.sample(0)
    assert s.split == "vstar" and s.answer in "ABCD" and s.images[0].mode == "RGB"


def test_user_loader_module_function(tmp_path):
    source = open_source("tests.agent.test_sources:user_loader:anything")
    assert source.size == 2 and source.sample(1).id == "test-5-000001"


def user_loader(path: str) -> list[Sample]:
    """A ``module:function`` loader for the test above."""
    return [generate_one("test", i, 5) for i in range(2)]


@pytest.mark.parametrize("problem", ["missing file", "missing column", "undecodable image"])
def test_bad_input_names_file_row_and_field(tmp_path, problem):
    if problem == "missing file":
        spec, match = str(tmp_path / "gone.jsonl"), "gone.jsonl not found"
    elif problem == "missing column":
        spec, match = str(write_jsonl(tmp_path, drop="answer")), r"missing column\(s\) \['answer'\]"
    else:
        spec = str(write_jsonl(tmp_path))
        (tmp_path / "img" / "0.png").write_bytes(b"not a png at all")
        match = r"train\.jsonl row 0 field 'images' image 0"
    with pytest.raises((FileNotFoundError, ValueError), match=match):
        check_sources([spec])


def test_eval_sources_take_no_weight_and_rows_are_lazy(tmp_path):
    spec = str(write_jsonl(tmp_path))
    with pytest.raises(ValueError, match="no weight"):
        check_sources([f"{spec}:0.5"], weights_allowed=False)
    gen = GeneratorSource(lambda k: generate_one("test", k, 1), size=3)
    rows = eval_rows([spec, "generator"], gen)
    assert len(rows) == 7
    assert [s.id for s in rows[3:5]] == ["q3", "test-1-000000"] and rows[-1].id == "test-1-000002"


def test_stream_is_a_deterministic_shuffled_mixture(tmp_path):
    spec = str(write_jsonl(tmp_path))
    gen = GeneratorSource(lambda k: generate_one("train", k, 0))
    alone = open_stream([], 0, gen)  # the default: sample k is generate_one(.., k, ..)
    assert [alone.locate(k) for k in range(5)] == [(0, k) for k in range(5)]
    one = open_stream([spec], 3, gen)
    epochs = [sorted(one.locate(k)[1] for k in range(e * 4, e * 4 + 4)) for e in range(3)]
    assert epochs == [[0, 1, 2, 3]] * 3  # each epoch is a permutation of the rows
    assert [one.locate(k) for k in range(12)] != [(0, k % 4) for k in range(12)]  # shuffled
    mixed = open_stream([f"{spec}:3", "generator:1"], 3, gen)
    picks = [mixed.locate(k) for k in range(4000)]
    share = Counter(s for s, _ in picks)[0] / len(picks)
    assert abs(share - 0.75) < 0.03
    fresh = open_stream([f"{spec}:3", "generator:1"], 3, gen)
    assert [fresh.locate(k) for k in (3999, 17, 1500)] == [picks[3999], picks[17], picks[1500]]
    gen_rows = [p for s, p in picks if s == 1]
    assert gen_rows == list(range(len(gen_rows)))  # the generator reads its rows in order
    assert isinstance(mixed, DataStream) and mixed.sample(5).images
