"""Tests for agent.data: real-image multi-image QA generation, scoring and export/load."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from agent.data import images, io, render, scene, tasks
from agent.data.__main__ import main as cli_main
from agent.data.scoring import exact_match, normalize_answer
from agent.data.tasks import FAMILIES, TaskConfig, generate, generate_one


def pixels(sample: tasks.Sample) -> list[np.ndarray]:
    return [np.asarray(im) for im in sample.images]


def same_pixels(a: tasks.Sample, b: tasks.Sample) -> bool:
    return len(a.images) == len(b.images) and all(
        np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b))
    )


def only(family: str, n: int = 10, split: str = "train", **kwargs) -> list[tasks.Sample]:
    return generate(split, n, seed=7, config=TaskConfig(families=(family,), **kwargs))


def target_objects(sample: tasks.Sample, k: int) -> list[dict]:
    """Objects in image k (1-based) matching the sample's target colour and shape."""
    want = sample.meta["target"]
    return [
        o
        for o in sample.meta["objects"][k - 1]
        if o["kind"] == "shape" and o["colour"] == want["colour"] and o["shape"] == want["shape"]
    ]


# Determinism and splits


def test_same_seed_gives_identical_samples_and_index_independent_of_n():
    a = generate("train", 6, seed=3)
    b = generate("train", 6, seed=3)
    longer = generate("train", 11, seed=3)
    for x, y, z in zip(a, b, longer):
        assert same_pixels(x, y) and same_pixels(x, z)
        assert (x.question, x.answer, x.target_bbox, x.meta) == (
            z.question,
            z.answer,
            z.target_bbox,
            z.meta,
        )
    one = generate_one("train", 4, seed=3)
    assert same_pixels(one, a[4]) and one.id == "train-3-000004"
    other = generate("train", 6, seed=4)
    assert not all(same_pixels(x, y) for x, y in zip(a, other))


def test_families_rotate_by_index():
    samples = generate("test", 10, seed=0)
    assert [s.family for s in samples] == list(FAMILIES) * 2
    assert [s.id for s in samples[:2]] == ["test-0-000000", "test-0-000001"]


def test_train_and_test_backgrounds_are_disjoint_and_used_per_split():
    train, test = set(images.TRAIN_BACKGROUNDS), set(images.TEST_BACKGROUNDS)
    assert not train & test
    assert train | test == set(images.BACKGROUND_FILES)
    assert len(test) == 5
    for split, allowed in (("train", train), ("test", test)):
        used = {b for s in generate(split, 10, seed=1) for b in s.meta["backgrounds"]}
        assert used <= allowed


def test_backgrounds_load_as_rgb_from_packages():
    for name in images.BACKGROUND_FILES:
        image = images.load_background(name)
        assert image.mode == "RGB"
        assert 128 <= min(image.size) <= images.BACKGROUND_MAX_SHORT_SIDE


def test_mnist_split_sizes_and_disjoint():
    train, test = images.load_mnist("train"), images.load_mnist("test")
    assert sorted(train) == sorted(test) == list(range(10))
    for digit in range(10):
        assert train[digit].shape == (400, 28, 28) and test[digit].shape == (100, 28, 28)
        assert train[digit].dtype == np.uint8 and train[digit].max() == 255
        train_rows = {row.tobytes() for row in train[digit]}
        assert not any(row.tobytes() in train_rows for row in test[digit])


def test_missing_package_file_error_names_the_file():
    with pytest.raises(FileNotFoundError, match="no_such_photo.png"):
        images.package_file("skimage", "data/no_such_photo.png")


# Every family: shapes, sizes, valid answers


@pytest.mark.parametrize("family", tasks.ALL_FAMILIES)
def test_family_images_and_answers_are_valid(family):
    for s in only(family, n=8, split="test"):
        lo = 3 if family == "odd" else 2
        assert lo <= len(s.images) <= 4
        assert all(im.mode == "RGB" and im.size == (224, 224) for im in s.images)
        assert s.family == family and s.answer_type == tasks.ANSWER_TYPES[family]
        assert normalize_answer(s.answer, s.answer_type) == s.answer
        assert "image 1:" not in s.question.lower()
        json.dumps(s.meta)
        if s.answer_type == "index":
            assert 1 <= int(s.answer) <= len(s.images) and s.target_image == int(s.answer)
        if s.target_bbox is not None:
            x1, y1, x2, y2 = s.target_bbox
            assert 0 <= x1 < x2 <= 224 and 0 <= y1 < y2 <= 224
            assert max(x2 - x1, y2 - y1) <= 48  # small target: a zoom helps


def test_find_target_is_only_in_target_image_and_changes_pixels():
    for s in only("find"):
        t = s.target_image
        assert len(target_objects(s, t)) == 1
        assert target_objects(s, t)[0]["bbox"] == list(s.target_bbox)
        assert all(not target_objects(s, k) for k in range(1, len(s.images) + 1) if k != t)
        plain = images.render_background(
            s.meta["backgrounds"][t - 1], tuple(s.meta["windows"][t - 1]), (224, 224)
        )
        before = np.asarray(plain.crop(s.target_bbox), dtype=float)
        after = np.asarray(s.images[t - 1].crop(s.target_bbox), dtype=float)
        assert np.abs(after - before).mean() > 5.0


def test_count_answer_equals_images_holding_the_target():
    answers = set()
    for s in only("count", n=16):
        holders = [k for k in range(1, len(s.images) + 1) if target_objects(s, k)]
        assert s.answer == str(len(holders)) and s.meta["holders"] == holders
        assert s.target_image == (holders[0] if holders else None)
        answers.add(s.answer)
    assert len(answers) >= 3  # counts vary, including 0 or all


def test_read_target_image_holds_the_answer_digit():
    for s in only("read"):
        assert s.question == f"What digit is written in image {s.target_image}?"
        digits = [o for o in s.meta["objects"][s.target_image - 1] if o["kind"] == "digit"]
        assert len(digits) == 1 and str(digits[0]["digit"]) == s.answer
        assert digits[0]["bbox"] == list(s.target_bbox)


def test_compare_winner_is_unique():
    variants = set()
    for s in only("compare", n=16):
        variants.add(s.meta["variant"])
        per_image = [target_objects(s, k) for k in range(1, len(s.images) + 1)]
        if s.meta["variant"] == "largest":
            sizes = [objs[0]["size"] for objs in per_image]
            assert all(len(objs) == 1 for objs in per_image)
            winner = sizes[int(s.answer) - 1]
            assert all(
                size * 1.2 <= winner for k, size in enumerate(sizes, 1) if k != int(s.answer)
            )
        else:
            counts = [len(objs) for objs in per_image]
            assert counts == s.meta["counts"]
            assert counts.count(max(counts)) == 1 and counts.index(max(counts)) == int(s.answer) - 1
    assert variants == {"largest", "most"}


def test_odd_image_differs_only_inside_target_bbox():
    for s in only("odd"):
        odd = int(s.answer) - 1
        arrays = pixels(s)
        normal = [a for k, a in enumerate(arrays) if k != odd]
        assert all(np.array_equal(normal[0], a) for a in normal[1:])
        diff = np.any(arrays[odd] != normal[0], axis=-1)
        x1, y1, x2, y2 = s.target_bbox
        assert diff[y1:y2, x1:x2].any()
        diff[y1:y2, x1:x2] = False
        assert not diff.any()
        assert len(set(s.meta["backgrounds"])) == 1


def test_custom_config_sizes_and_difficulty():
    config = TaskConfig(n_images=(3, 3), image_size=(160, 128), target_size=(10, 24))
    for s in generate("train", 5, seed=0, config=config):
        assert len(s.images) == 3 and all(im.size == (160, 128) for im in s.images)

    def mean_size(difficulty: float) -> float:
        config = TaskConfig(families=("find",), difficulty=difficulty)
        sizes = [
            o["size"]
            for s in generate("train", 10, seed=0, config=config)
            for im in s.meta["objects"]
            for o in im
        ]
        return float(np.mean(sizes))

    assert mean_size(0.0) >= 34 > mean_size(1.0)  # big half of (20, 48) vs small half


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"families": ("find", "nope")}, "families"),
        ({"families": ()}, "families"),
        ({"n_images": (1, 4)}, "n_images"),
        ({"n_images": (4, 2)}, "n_images"),
        ({"n_images": (2, 2)}, "n_images"),  # odd needs 3
        ({"image_size": (32, 224)}, "image_size"),
        ({"target_size": (30, 20)}, "target_size"),
        ({"target_size": (8, 100)}, "target_size"),
        ({"difficulty": 1.5}, "difficulty"),
    ],
)
def test_task_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TaskConfig(**kwargs)


def test_two_images_allowed_without_odd():
    config = TaskConfig(families=("find", "count"), n_images=(2, 2))
    assert all(len(s.images) == 2 for s in generate("train", 4, config=config))


def test_generate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        generate_one("val", 0)
    with pytest.raises(ValueError, match="index"):
        generate_one("train", -1)
    with pytest.raises(ValueError, match="n must be"):
        generate("train", -2)


# Scoring


@pytest.mark.parametrize(
    ("text", "answer_type", "expected"),
    [
        ("Image 3", "index", "3"),
        ("image 2", "index", "2"),
        ("2", "index", "2"),
        ("The second image.", "index", "2"),
        ("3rd", "index", "3"),
        ("image 0", "index", None),
        ("image 2 or image 3", "index", None),
        ("three", "int", "3"),
        ("Zero", "int", "0"),
        ("There are 2 images.", "int", "2"),
        (" 7. ", "digit", "7"),
        ("12", "digit", None),
        ("3.5", "int", None),
        ("banana", "int", None),
        ("", "index", None),
        (None, "int", None),
        ("  Yes! ", "word", "yes"),
        ("?!", "word", None),
    ],
)
def test_normalize_answer_pinned_cases(text, answer_type, expected):
    assert normalize_answer(text, answer_type) == expected


def test_normalize_answer_rejects_unknown_type():
    with pytest.raises(ValueError, match="answer_type"):
        normalize_answer("3", "colour")


def test_exact_match_with_sample_and_string():
    s = generate_one("test", 0)  # find: index answer
    assert exact_match(f"Image {s.answer}", s) == 1.0
    assert exact_match(str(int(s.answer) % len(s.images) + 1), s) == 0.0
    assert exact_match(None, s) == 0.0
    assert exact_match("two", "2", "int") == 1.0
    assert exact_match("2", "3", "int") == 0.0
    with pytest.raises(ValueError, match="answer_type"):
        exact_match("2", "2")
    with pytest.raises(ValueError, match="contradicts"):
        exact_match("2", s, "digit")


# Export / load


@pytest.fixture(scope="module")
def small_split():
    return generate("test", 10, seed=2)


def test_export_load_round_trip(tmp_path, small_split):
    folder = io.export_split(small_split, tmp_path / "split")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split"]  # no temp folders left
    loaded = io.load_split(folder)
    assert len(loaded) == len(small_split)
    for a, b in zip(small_split, loaded):
        assert (a.id, a.split, a.family, a.question, a.answer, a.answer_type) == (
            b.id,
            b.split,
            b.family,
            b.question,
            b.answer,
            b.answer_type,
        )
        assert (a.target_image, a.target_bbox, a.meta) == (b.target_image, b.target_bbox, b.meta)
        assert all(im.mode == "RGB" for im in b.images) and same_pixels(a, b)
    io.export_split(small_split[:3], folder)  # replaces the old export atomically
    assert [s.id for s in io.load_split(folder)] == [s.id for s in small_split[:3]]
    assert len(list((folder / "images").iterdir())) == sum(len(s.images) for s in small_split[:3])


def test_interrupted_export_leaves_nothing(tmp_path, small_split, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(io.pq, "write_table", boom)
    with pytest.raises(KeyboardInterrupt):
        io.export_split(small_split[:2], tmp_path / "split")
    assert list(tmp_path.iterdir()) == []


def test_load_errors_name_file_and_field(tmp_path, small_split):
    folder = io.export_split(small_split[:2], tmp_path / "split")
    png = folder / "images" / f"{small_split[0].id}_1.png"
    png.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=rf"{png.name}.*field 'images'"):
        io.load_split(folder)
    png.unlink()
    with pytest.raises(FileNotFoundError, match=png.name):
        io.load_split(folder)

    table = pq.read_table(folder / "samples.parquet")
    pq.write_table(table.drop_columns(["answer"]), folder / "samples.parquet")
    with pytest.raises(ValueError, match=r"samples\.parquet.*'answer'"):
        io.load_split(folder)
    (folder / "samples.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="samples.parquet"):
        io.load_split(folder)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        io.load_split(tmp_path / "nowhere")


def test_cli_exports_and_prints_family_counts(tmp_path, capsys):
    cli_main(out=tmp_path / "cli", split="test", n=5, seed=0)
    printed = capsys.readouterr().out
    assert "wrote 5 test samples" in printed
    assert all(f"{family}" in printed for family in FAMILIES)
    assert len(io.load_split(tmp_path / "cli")) == 5


def test_shape_patch_rejects_unknown_shape():
    with pytest.raises(ValueError, match="shape"):
        render.shape_patch("hexagon", 20, (255, 0, 0), False)


def test_pasted_objects_never_overlap_within_an_image():
    config = TaskConfig(n_images=(2, 6), image_size=(96, 96), target_size=(8, 24))
    checked = 0
    for s in generate("train", 40, seed=5, config=config):
        for objs in s.meta["objects"]:
            boxes = [tuple(o["bbox"]) for o in objs]
            for i, a in enumerate(boxes):
                assert all(not render.overlaps(a, b) for b in boxes[i + 1 :])
                checked += 1
    assert checked > 40


def test_copy_patch_gives_up_on_a_flat_image():
    rng = np.random.default_rng(0)
    sc = scene.Scene(rng, "train", 3, (128, 128), (16, 32), 0.5, same=True)
    sc.images[1] = Image.new("RGB", (128, 128), (90, 90, 90))
    assert sc.copy_patch(1) is None and sc.objects[1] == []
    assert np.asarray(sc.images[1]).std() == 0.0  # left untouched


def test_digit_patch_alpha_is_the_mnist_stroke():
    stroke = np.zeros((28, 28), np.uint8)
    stroke[4:24, 12:16] = 255  # a "1": 20 rows x 4 columns of ink
    patch = render.digit_patch(stroke, 40, (255, 0, 0))
    assert patch.mode == "RGBA" and patch.size == (40 // 3, 40)  # width floor height // 3
    alpha = np.asarray(patch.getchannel("A"))
    assert alpha.max() == 255 and np.asarray(patch)[..., 0].min() == 255
    with pytest.raises(ValueError, match="no ink"):
        render.digit_patch(np.zeros((28, 28), np.uint8), 20, (255, 0, 0))


@pytest.mark.parametrize("family", tasks.ZOOM_FAMILIES)
def test_zoom_family_objects_are_small_and_deterministic(family):
    samples = only(family, n=24, split="test")
    again = only(family, n=24, split="test")
    lo, hi = TaskConfig().small_size
    for s, t in zip(samples, again):
        assert same_pixels(s, t) and s.question == t.question and s.answer == t.answer
        assert s.answer_type == tasks.ANSWER_TYPES[family]
        assert 2 <= len(s.images) <= 4
        for objs in s.meta["objects"]:
            assert objs, "every image holds at least one small object"
            assert all(lo <= o["size"] <= hi for o in objs)
        x1, y1, x2, y2 = s.target_bbox
        assert max(x2 - x1, y2 - y1) <= hi


def test_shape_in_answer_is_the_only_object_of_its_colour_in_the_named_image():
    for s in only("shape_in", n=30):
        colour, k = s.meta["target"]["colour"], s.target_image
        assert s.question == f"What shape is the {colour} object in image {k}?"
        objs = [o for o in s.meta["objects"][k - 1] if o["colour"] == colour]
        assert len(objs) == 1 and objs[0]["shape"] == s.answer
        assert list(s.target_bbox) == objs[0]["bbox"]


def test_find_small_needs_the_shape_not_the_colour():
    for s in only("find_small", n=30):
        colour, shape = s.meta["target"]["colour"], s.meta["target"]["shape"]
        holders = [
            k + 1
            for k, objs in enumerate(s.meta["objects"])
            if any(o["colour"] == colour and o["shape"] == shape for o in objs)
        ]
        assert holders == [int(s.answer)] == [s.target_image]
        # every image holds an object of the asked colour: colour alone cannot decide
        assert all(any(o["colour"] == colour for o in objs) for objs in s.meta["objects"])


def test_small_size_is_validated():
    with pytest.raises(ValueError, match="small_size"):
        TaskConfig(small_size=(4, 10))
