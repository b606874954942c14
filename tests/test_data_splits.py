"""Splits, the dataset factories the training loop calls, and the statistics command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detlab.config import Config
from detlab.data import (
    AnnotationError,
    EmptyDatasetError,
    MissingImagesError,
    build_datasets,
    build_loader,
    split_records,
)
from detlab.data.loader import MissingDatasetError
from detlab.data.splits import resolve_split

REPO = Path(__file__).resolve().parents[1]


def test_split_records_ratios_and_seed():
    records = list(range(10))
    parts = split_records(records, [0.4, 0.1, 0.5], seed=0)  # the paper's split
    assert [len(p) for p in parts] == [4, 1, 5]
    assert sorted(sum(parts, [])) == records  # disjoint and complete
    assert parts == split_records(records, [0.4, 0.1, 0.5], seed=0)
    assert parts != split_records(records, [0.4, 0.1, 0.5], seed=1)
    assert [len(p) for p in split_records(list(range(1606)), [0.8, 0.2], seed=0)] == [1285, 321]
    assert [len(p) for p in split_records(records, [0.5, 0.2], seed=0)] == [5, 2]  # the rest unused
    with pytest.raises(ValueError):
        split_records(records, [0.8, 0.4], seed=0)


def tiny_config(root: Path, **dataset) -> Config:
    cfg = Config()
    cfg.dataset.root = str(root)
    cfg.dataset.synthetic.num_images = 10
    cfg.dataset.synthetic.image_width = 96
    cfg.dataset.synthetic.image_height = 64
    cfg.model.input_width, cfg.model.input_height = 80, 48
    for key, value in dataset.items():
        setattr(cfg.dataset, key, value)
    return cfg


def test_build_datasets_synthetic_items(tmp_path):
    train, val = build_datasets(tiny_config(tmp_path))
    assert (len(train), len(val)) == (8, 2)
    assert train.images_dir.parts[-2:] == ("WIDER_train", "images")
    image, target = train[0]
    assert image.shape == (3, 48, 80) and image.dtype == torch.float32
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1] == 4
    assert target["labels"].dtype == torch.int64 and (target["labels"] == 1).all()
    assert target["image_id"] == 0 and target["orig_size"].tolist() == [64, 96]
    torch.testing.assert_close(target["scale"], torch.tensor([96 / 80, 64 / 48]))
    # validation is deterministic and maps back to the records exactly
    a, b = val[1], val[1]
    assert torch.equal(a[0], b[0])
    back = a[1]["boxes"] * torch.tensor([1.2, 4 / 3, 1.2, 4 / 3])
    torch.testing.assert_close(back, torch.from_numpy(val.records[1].boxes), atol=1e-4, rtol=0)


def test_loader_batches_and_repeats(tmp_path):
    train, _ = build_datasets(tiny_config(tmp_path))

    def first_batch():
        torch.manual_seed(0)
        return next(iter(build_loader(train, batch_size=4, shuffle=True, num_workers=0, seed=5)))

    (images1, targets1), (images2, targets2) = first_batch(), first_batch()
    assert images1.shape == (4, 3, 48, 80) and len(targets1) == 4
    assert torch.equal(images1, images2)
    assert [t["image_id"] for t in targets1] == [t["image_id"] for t in targets2]


def test_relative_root_and_subsets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(Path("cache"), max_train_images=3, max_val_images=1)
    cfg.dataset.split.mode = "random"
    cfg.dataset.split.source = "train"
    cfg.dataset.split.ratios = [0.5, 0.5]
    train, val = build_datasets(cfg)
    assert train.images_dir.is_relative_to(tmp_path / "cache")
    assert (len(train), len(val)) == (3, 1)
    # first N of the seeded split: the same records as without the limit
    full = resolve_split(tiny_config(Path("cache"), split=cfg.dataset.split).dataset, train.images_dir.parents[1])
    assert [r.path for r in train.records] == [r.path for r in full.train[:3]]
    assert not {r.path for r in train.records} & {r.path for r in full.val}


def test_missing_images_fail_before_training(tmp_path):
    cfg = tiny_config(tmp_path)
    train, _ = build_datasets(cfg)
    for record in train.records[:2]:
        (train.images_dir / record.path).unlink()
    with pytest.raises(MissingImagesError, match=r"^2 of 10 annotated images are missing"):
        build_datasets(cfg)


def test_synthetic_dataset_has_no_boxes_outside_its_images(tmp_path):
    # The default run must not change: every generated face lies inside its image, nothing is dropped.
    train, val = build_datasets(tiny_config(tmp_path))
    for i in range(len(train)):
        train[i]
    counts = [len(val[i][1]["boxes"]) for i in range(len(val))]  # val is not augmented: all faces kept
    assert counts == [r.num_faces for r in val.records]
    for dataset in (train, val):
        assert dataset.num_boxes_outside == 0 and dataset.num_images_with_boxes_outside == 0
        assert int((dataset._outside >= 0).sum()) == len(dataset)  # every image was checked


@pytest.mark.parametrize("settings", [dict(keep_empty=False, min_face_size=10_000.0), dict(max_train_images=0)])
def test_empty_training_split_is_named(tmp_path, settings):
    cfg = tiny_config(tmp_path, **settings)
    with pytest.raises(EmptyDatasetError, match=r"no training images left in .*WIDER_train.*expected at least one"):
        build_datasets(cfg)
    key = next(iter(settings))
    assert f"{key}={settings[key]}" in str(pytest.raises(EmptyDatasetError, build_datasets, cfg).value)


def widerface_layout(root: Path, annotation: bytes) -> Config:
    """A WIDER-layout folder with ``annotation`` as its val file; the config splits it at random."""
    (root / "wider_face_split").mkdir(parents=True)
    (root / "wider_face_split" / "wider_face_val_bbx_gt.txt").write_bytes(annotation)
    cfg = Config()
    cfg.dataset.name, cfg.dataset.root = "widerface", str(root)
    cfg.dataset.split.mode, cfg.dataset.split.source, cfg.dataset.split.ratios = "random", "val", [0.5, 0.5]
    return cfg


@pytest.mark.parametrize("annotation, expected", [
    (b"", r"wider_face_val_bbx_gt\.txt: no images in the annotation file"),
    (b"\n \n", r"wider_face_val_bbx_gt\.txt: no images in the annotation file"),
    ("0--P/a.jpg\n0\n".encode("utf-16"), r"wider_face_val_bbx_gt\.txt, line 1: .*UTF-16"),
    (b"0--P/a.jpg\n0\n1--Q/caf\xe9.jpg\n0\n", r"wider_face_val_bbx_gt\.txt, line 3: byte 0xE9"),
])
def test_bad_annotation_file_stops_before_training(tmp_path, annotation, expected, capsys):
    from detlab.errors import report_user_errors

    cfg = widerface_layout(tmp_path / "wider", annotation)
    with pytest.raises(AnnotationError, match=expected):
        build_datasets(cfg)
    with pytest.raises(SystemExit) as info, report_user_errors():  # as the entry points report it
        build_datasets(cfg)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "wider_face_val_bbx_gt.txt" in err


def test_missing_widerface_is_one_line_naming_the_folder_and_what_belongs_there(tmp_path):
    root = tmp_path / "data" / "widerface"
    cfg = Config()
    cfg.dataset.name, cfg.dataset.root, cfg.dataset.split.mode = "widerface", str(root), "random"  # as dataset=widerface
    layout = ("; WIDER FACE (http://shuoyang1213.me/WIDERFACE/) in its official layout belongs there: "
              "WIDER_{train,val,test}/images/<event>/<name>.jpg, wider_face_split/wider_face_{train,val}_bbx_gt.txt")
    fix = "set paths.data_dir or DETLAB_DATA (the folder holding widerface/), or dataset.root"
    for step, missing in (("nothing", "no such folder"), ("root", "no wider_face_split/ there"),
                          ("annotations", "no WIDER_val/images there")):
        if step == "root":
            root.mkdir(parents=True)
        if step == "annotations":  # the annotations without the images
            (root / "wider_face_split").mkdir()
            (root / "wider_face_split" / "wider_face_val_bbx_gt.txt").write_text("0--P/a.jpg\n0\n0 0 0 0 0 0 0 0 0 0\n"
                                                                               "0--P/b.jpg\n0\n0 0 0 0 0 0 0 0 0 0\n")
        with pytest.raises(MissingDatasetError) as info:
            build_datasets(cfg)
        message = str(info.value)
        assert message.startswith(f"dataset.root={root}: {missing}{layout}") and message.endswith(fix), message
        assert "\n" not in message


@pytest.mark.slow
def test_train_py_without_wider_data_says_where_it_looked(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "dataset=widerface", f"paths.data_dir={tmp_path}",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"dataset.root={tmp_path / 'widerface'}: no such folder;" in lines[0]
    assert "DETLAB_DATA" in lines[0]


def test_official_split_without_train_file_names_the_fix(tmp_path):
    # A WIDER folder with the val annotations and images but no train annotation file.
    (tmp_path / "wider_face_split").mkdir()
    (tmp_path / "wider_face_split" / "wider_face_val_bbx_gt.txt").write_text(
        "0--Parade/a.jpg\n1\n1 1 4 4 0 0 0 0 0 0\n")
    image = tmp_path / "WIDER_val" / "images" / "0--Parade" / "a.jpg"
    image.parent.mkdir(parents=True)
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    cfg = Config()
    cfg.dataset.name, cfg.dataset.root, cfg.dataset.split.mode = "widerface", str(tmp_path), "official"
    with pytest.raises(FileNotFoundError, match="wider_face_train_bbx_gt.txt.*split.mode=random"):
        build_datasets(cfg)


def test_real_widerface_random_split(widerface_root):
    cfg = Config()
    cfg.dataset.name, cfg.dataset.root = "widerface", str(widerface_root)
    cfg.dataset.split.mode, cfg.dataset.split.source, cfg.dataset.split.ratios = "random", "val", [0.4, 0.1, 0.5]
    cfg.dataset.keep_empty = True
    split = resolve_split(cfg.dataset, widerface_root)
    assert (len(split.train), len(split.val), len(split.test)) == (642, 161, 803)  # of 1606
    train, val = build_datasets(cfg)
    assert len(train) == 642 and train.images_dir == val.images_dir


@pytest.mark.slow
def test_dataset_stats_command(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "dataset_stats.py"), "dataset=synthetic",
         f"dataset.root={tmp_path / 'cache'}", "dataset.synthetic.num_images=10",
         "dataset.synthetic.image_width=96", "dataset.synthetic.image_height=64", f"+out_dir={out}",
         f"hydra.run.dir={tmp_path / 'hydra'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    stats = json.loads((out / "stats.json").read_text())
    train, val = build_datasets(tiny_config(tmp_path / "cache"))
    assert stats["images"] == 10
    assert stats["faces"] == sum(r.num_faces for r in train.records + val.records)
    assert stats["splits"]["val"]["images"] == 2
    assert (out / "face_sizes.png").stat().st_size > 0
    assert "faces/image mean" in result.stdout


def test_test_split_loads_for_prediction(tmp_path):
    import cv2
    import numpy as np

    from detlab.data import build_predict_dataset

    names = ["0--Parade/a.jpg", "1--Handshaking/b.jpg"]
    for name in names:
        path = tmp_path / "WIDER_test" / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.zeros((30, 40, 3), np.uint8))
    (tmp_path / "wider_face_split").mkdir()
    (tmp_path / "wider_face_split" / "wider_face_test_filelist.txt").write_text("\n".join(names) + "\n")
    cfg = Config()
    cfg.dataset.name, cfg.dataset.root = "widerface", str(tmp_path)
    dataset = build_predict_dataset(cfg, "test")
    assert [r.path for r in dataset.records] == names
    image, target = dataset[1]
    assert image.shape == (3, 256, 320) and target["boxes"].shape == (0, 4)
    torch.testing.assert_close(target["scale"], torch.tensor([40 / 320, 30 / 256]))


def test_worker_init_turns_opencv_threading_off_not_down_to_one(monkeypatch):
    """Regression: cv2.setNumThreads(1) in a DataLoader worker forked while the parent's OpenCV
    thread pool is busy deadlocks (seen in scripts/bench_loader.py: 5 of 8 forks hung with it, 0 of 8
    with setNumThreads(0)). The worker init must ask for 0."""
    from detlab.data.loader import seed_worker

    asked: list[int] = []
    monkeypatch.setattr(cv2, "setNumThreads", asked.append)
    seed_worker(0)
    assert asked == [0]
