"""detlab.wider_eval: the official WIDER FACE protocol on a tiny hand-made ground truth, the
submission layout, the CLI, and agreement with the official evaluation's port on real data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from detlab.errors import UserError
from detlab.wider_eval import (
    MissingPredictionsError,
    PredictionFileError,
    evaluate_wider,
    load_predictions,
    load_wider_ground_truth,
    main,
    normalise_scores,
    overlaps_plus_one,
    save_predictions,
)

from oracles import wider_reference  # tests/oracles: the port of the official evaluation

# Hand-made case (faces and predictions x y w h):
#   0--A/a1: F0 [10,10,20,20] kept everywhere; F1 [100,100,10,10] kept in hard only; F2 [200,200,4,4] never kept
#   0--A/a2: no faces
#   1--B/b1: one face [50,50,30,30], kept in medium and hard
HAND_GT = {
    "0--A": {
        "a1": ([[10, 10, 20, 20], [100, 100, 10, 10], [200, 200, 4, 4]],
               {"easy": [1], "medium": [1], "hard": [1, 2]}),
        "a2": ([], {}),
    },
    "1--B": {"b1": ([[50, 50, 30, 30]], {"medium": [1], "hard": [1]})},
}
# Raw scores 0.5 .. 0.95 -> normalised (s - 0.5) / 0.45 (the port's min starts at 1, max at 0).
HAND_PRED = {
    "0--A/a1": np.array([
        [200, 200, 4, 4, 0.7],  # on F2 (never kept): neither TP nor FP; written out of score order
        [10, 10, 20, 20, 0.9],  # TP on F0
        [10, 10, 20, 20, 0.8],  # duplicate on F0: a proposal, no recall
        [100, 100, 10, 10, 0.6],  # F1: TP in hard, ignored in easy/medium
    ]),
    "0--A/a2": np.array([[0, 0, 10, 10, 0.95]]),  # image without faces: skipped by the protocol
    "1--B/b1": np.array([[500, 500, 10, 10, 0.5]]),  # FP (normalised score 0: counted at threshold 0)
}
# easy: 1 face, recalled at precision 1 -> 1.0
# medium: 2 faces; recall 1/2 at precision 1 -> 0.5
# hard: 3 faces; points (1/3, 1), (1/3, 1/2), (2/3, 2/3), (2/3, 1/2) -> 1/3 + 1/3 * 2/3 = 5/9
HAND_AP = {"easy": 1.0, "medium": 0.5, "hard": 5 / 9}


@pytest.fixture
def hand_gt(tmp_path, write_wider_gt):
    return load_wider_ground_truth(write_wider_gt(tmp_path / "gt", HAND_GT))


def test_load_ground_truth_layout(hand_gt):
    assert hand_gt.keys == ["0--A/a1", "0--A/a2", "1--B/b1"]
    assert hand_gt.events == ["0--A", "1--B"]
    assert hand_gt.boxes[0].shape == (3, 4) and hand_gt.boxes[1].shape == (0, 4)
    assert hand_gt.keep["hard"][0].tolist() == [1, 2] and hand_gt.keep["easy"][2].tolist() == []


def test_load_ground_truth_reports_missing_files(tmp_path, write_wider_gt):
    with pytest.raises(FileNotFoundError, match="wider_hard_val.mat"):
        folder = write_wider_gt(tmp_path / "gt", HAND_GT)
        (folder / "wider_hard_val.mat").unlink()
        load_wider_ground_truth(folder)


def test_hand_computed_easy_medium_hard(hand_gt):
    aps = evaluate_wider(HAND_PRED, hand_gt)
    for setting, expected in HAND_AP.items():
        assert aps[setting] == pytest.approx(expected, abs=1e-12), setting


def test_hand_case_agrees_with_the_official_port(tmp_path, write_wider_gt, hand_gt):
    folder = write_wider_gt(tmp_path / "gt2", HAND_GT)
    # The port expects scores sorted per image (as the official read_pred.m sorts): give it sorted.
    port_pred: dict[str, dict[str, np.ndarray]] = {}
    for key, array in HAND_PRED.items():
        event, name = key.split("/")
        port_pred.setdefault(event, {})[name] = array[np.argsort(-array[:, 4], kind="stable")].copy()
    with np.errstate(invalid="ignore", divide="ignore"):  # the port divides 0 by 0 (NaN precision)
        ref = wider_reference.reference_evaluation(port_pred, wider_reference.get_gt_boxes(str(folder)))
    ours = evaluate_wider(HAND_PRED, hand_gt)
    for setting in HAND_AP:
        assert ours[setting] == pytest.approx(ref[setting], abs=1e-12)


def test_subset_counts_only_its_faces(hand_gt):
    # Only a1: hard has 2 faces; points (1/2, 1), (1/2, 1/2), (1, 2/3) -> 1/2 + 1/2 * 2/3 = 5/6.
    aps = evaluate_wider(HAND_PRED, hand_gt, images=["0--A/a1.jpg"])
    assert aps["hard"] == pytest.approx(5 / 6)
    assert aps["medium"] == pytest.approx(1.0)
    with pytest.raises(KeyError, match="not in the WIDER FACE val"):
        evaluate_wider(HAND_PRED, hand_gt, images=["9--X/nope"])


def test_missing_predictions_count_faces_as_missed(hand_gt):
    preds = {"0--A/a1": HAND_PRED["0--A/a1"]}
    aps = evaluate_wider(preds, hand_gt)  # b1 has no prediction file: its face is a miss
    assert aps["medium"] == pytest.approx(0.5)
    assert evaluate_wider({}, hand_gt) == {"easy": 0.0, "medium": 0.0, "hard": 0.0}


def test_ignored_face_only_image(tmp_path, write_wider_gt):
    # One face, never kept in easy: a prediction on it is neither TP nor FP; easy has no faces -> 0.
    gt = load_wider_ground_truth(write_wider_gt(tmp_path / "g", {"0--A": {"x": ([[0, 0, 10, 10]], {"hard": [1]})}}))
    aps = evaluate_wider({"0--A/x": np.array([[0, 0, 10, 10, 0.9], [50, 50, 5, 5, 0.1]])}, gt)
    assert aps["easy"] == 0.0
    assert aps["hard"] == pytest.approx(1.0)


def test_plus_one_pixel_iou():
    gt = np.array([[0.0, 0.0, 9.0, 9.0]])  # inclusive: 10 x 10 pixels
    pred = np.array([[0.0, 0.0, 4.0, 9.0], [20.0, 20.0, 30.0, 30.0]])  # 5 x 10 pixels inside; far away
    overlaps = overlaps_plus_one(pred, gt)
    assert overlaps[0, 0] == 0.5  # without the +1 it would be 36 / 81
    assert overlaps[1, 0] == 0.0


def test_score_normalisation_rules():
    out = normalise_scores({"a/b": np.array([[0, 0, 1, 1, 2.0], [0, 0, 1, 1, 5.0]]), "a/c": np.zeros((0, 5))})
    assert out["a/b"][:, 4].tolist() == [0.25, 1.0]  # min starts at 1: (s - 1) / (5 - 1)
    out = normalise_scores({"a/b": np.array([[0, 0, 1, 1, 0.2], [0, 0, 1, 1, 0.6]])})
    assert out["a/b"][:, 4] == pytest.approx([0.0, 1.0])
    out = normalise_scores({"a/b": np.array([[0, 0, 1, 1, 1.0]])})  # empty range
    assert out["a/b"][:, 4].tolist() == [1.0]


def test_sorting_per_image_makes_file_order_irrelevant(hand_gt):
    shuffled = {k: v[::-1].copy() for k, v in HAND_PRED.items()}
    assert evaluate_wider(shuffled, hand_gt) == evaluate_wider(HAND_PRED, hand_gt)


def test_save_and_load_round_trip(tmp_path, hand_gt):
    preds = dict(HAND_PRED)
    preds["1--B/empty"] = np.zeros((0, 5))
    save_predictions(preds, tmp_path / "sub")
    lines = (tmp_path / "sub" / "0--A" / "a1.txt").read_text().splitlines()
    assert lines[0] == "a1" and lines[1] == "4"
    assert [float(v) for v in lines[2].split()] == [10, 10, 20, 20, 0.9]  # sorted by score
    assert (tmp_path / "sub" / "1--B" / "empty.txt").read_text().splitlines() == ["empty", "0"]
    loaded = load_predictions(tmp_path / "sub")
    assert set(loaded) == set(preds)
    for key, array in preds.items():
        expected = array[np.argsort(-array[:, 4], kind="stable")] if len(array) else array
        np.testing.assert_array_equal(loaded[key], expected)
    assert evaluate_wider(loaded, hand_gt, images=list(HAND_PRED)) == evaluate_wider(HAND_PRED, hand_gt)
    assert not list((tmp_path / "sub").rglob("*.tmp"))


def test_load_reports_bad_files(tmp_path):
    bad = tmp_path / "sub" / "0--A"
    bad.mkdir(parents=True)
    (bad / "a1.txt").write_text("a1\n2\n1 2 3 4 0.5\n")
    with pytest.raises(ValueError, match=r"a1.txt:2: count line says 2 boxes, file has 1"):
        load_predictions(tmp_path / "sub")
    (bad / "a1.txt").write_text("a1\n1\n1 2 3 0.5\n")
    with pytest.raises(ValueError, match=r"a1.txt:3: expected 'x y w h score'"):
        load_predictions(tmp_path / "sub")


@pytest.mark.parametrize("bad, what", [
    ("1 2 3 4 nan", "score=nan is not a finite number"),
    ("1 2 3 4 inf", "score=inf is not a finite number"),
    ("1 2 3 4 -Infinity", "score=-inf is not a finite number"),
    ("1 2 3 4 1e999", "score=inf is not a finite number"),  # overflows to inf
    ("nan 2 3 4 0.5", "x=nan is not a finite number"),
    ("1 2 inf 4 0.5", "w=inf is not a finite number"),
    ("1 2 -3 4 0.5", "negative box size w=-3 h=4"),
    ("1 2 3 -0.5 0.5", "negative box size w=3 h=-0.5"),
])
def test_load_rejects_non_finite_and_negative_boxes(tmp_path, hand_gt, bad, what):
    save_predictions(HAND_PRED, tmp_path / "sub")
    path = tmp_path / "sub" / "1--B" / "b1.txt"
    # a blank line before the bad box: the line number is the file's, not the box's index
    path.write_text("b1\n2\n500 500 10 10 0.5\n\n" + bad + "\n")
    with pytest.raises(PredictionFileError) as info:
        load_predictions(tmp_path / "sub")
    message = str(info.value)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    assert message.startswith(f"{path}:5: {what}") and "expected finite 'x y w h score'" in message
    assert info.value.line == 5 and info.value.path == str(path)
    # the same file without the bad line scores the known answer
    path.write_text("b1\n1\n500 500 10 10 0.5\n")
    aps = evaluate_wider(load_predictions(tmp_path / "sub"), hand_gt)
    for setting, expected in HAND_AP.items():
        assert aps[setting] == pytest.approx(expected, abs=1e-12)


def test_zero_size_boxes_are_accepted(tmp_path):
    # x y w h with w = 0 spans one pixel in the protocol's +1 convention: valid, only negative sizes are not.
    (tmp_path / "sub" / "0--A").mkdir(parents=True)
    (tmp_path / "sub" / "0--A" / "a1.txt").write_text("a1\n1\n10 10 0 0 0.5\n")
    assert load_predictions(tmp_path / "sub")["0--A/a1"].tolist() == [[10, 10, 0, 0, 0.5]]


@pytest.mark.parametrize("second, first_line", [("zzz.txt", "a1"), ("copy.txt", "0--A/a1.jpg"),
                                                ("a1_v2.txt", "some/where/a1.jpg")])
def test_load_rejects_two_files_for_one_image(tmp_path, hand_gt, second, first_line):
    save_predictions(HAND_PRED, tmp_path / "sub")
    first = tmp_path / "sub" / "0--A" / "a1.txt"
    extra = tmp_path / "sub" / "0--A" / second
    extra.write_text(first.read_text().replace("a1\n", first_line + "\n", 1))  # same boxes, even
    with pytest.raises(PredictionFileError) as info:
        load_predictions(tmp_path / "sub")
    message = str(info.value)
    assert str(first) in message and str(extra) in message and "names image '0--A/a1'" in message
    assert "expected one prediction file per image" in message
    extra.unlink()
    assert evaluate_wider(load_predictions(tmp_path / "sub"), hand_gt) == pytest.approx(HAND_AP)


def test_same_name_in_two_events_is_no_duplicate(tmp_path):
    save_predictions({"0--A/x": np.array([[1, 1, 2, 2, 0.5]]), "1--B/x": np.array([[3, 3, 2, 2, 0.7]])},
                     tmp_path / "sub")
    assert set(load_predictions(tmp_path / "sub")) == {"0--A/x", "1--B/x"}


@pytest.mark.parametrize("content, line, what", [
    (b"a1\n-1\n", 2, "expected the number of boxes (an integer >= 0)"),
    (b"\n0\n", 1, "empty name line"),
    (b"a1\n1\n1 2 3 4 0.\xe9\n", 3, "byte 0xE9 is not valid UTF-8"),
    (b"a1\n", 0, "expected a name line and a count line, found 1 line(s)"),
])
def test_load_names_file_and_line_of_other_problems(tmp_path, content, line, what):
    (tmp_path / "sub" / "0--A").mkdir(parents=True)
    path = tmp_path / "sub" / "0--A" / "a1.txt"
    path.write_bytes(content)
    with pytest.raises(PredictionFileError) as info:
        load_predictions(tmp_path / "sub")
    assert info.value.line == line and str(info.value).startswith(f"{path}{f':{line}' if line else ''}: {what}")


def test_utf8_byte_order_mark_is_tolerated(tmp_path):
    (tmp_path / "sub" / "0--A").mkdir(parents=True)
    (tmp_path / "sub" / "0--A" / "a1.txt").write_bytes(b"\xef\xbb\xbfa1\r\n1\r\n1 2 3 4 0.5\r\n")
    assert load_predictions(tmp_path / "sub")["0--A/a1"].tolist() == [[1, 2, 3, 4, 0.5]]


def test_missing_prediction_folder_is_a_user_error(tmp_path):
    with pytest.raises(MissingPredictionsError, match="prediction folder not found") as info:
        load_predictions(tmp_path / "nowhere")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, UserError)


def test_cli_reports_bad_prediction_files_in_one_line(tmp_path, write_wider_gt, capsys, monkeypatch):
    monkeypatch.delenv("DETLAB_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    gt_dir = write_wider_gt(tmp_path / "gt", HAND_GT)
    save_predictions(HAND_PRED, tmp_path / "sub")
    path = tmp_path / "sub" / "0--A" / "a2.txt"
    path.write_text("a2\n1\n0 0 10 10 nan\n")
    assert main([str(tmp_path / "sub"), "--gt", str(gt_dir)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"error: {path}:3: score=nan is not a finite number in '0 0 10 10 nan'; "
                                         f"expected finite 'x y w h score' with w >= 0 and h >= 0"]
    path.write_text("a1\n0\n")  # a second file for a1
    assert main([str(tmp_path / "sub"), "--gt", str(gt_dir)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "a1.txt" in err[0] and "a2.txt" in err[0]
    path.unlink()
    (tmp_path / "sub" / "9--Z").mkdir()
    save_predictions({"9--Z/q": np.zeros((0, 5))}, tmp_path / "sub")
    assert main([str(tmp_path / "sub"), "--gt", str(gt_dir)]) == 2  # an image outside the ground truth
    assert capsys.readouterr().err.splitlines() == ["error: 1 prediction file(s) name images outside the val "
                                                    "ground truth, e.g. '9--Z/q'"]
    monkeypatch.setenv("DETLAB_DEBUG", "1")  # the traceback instead, as for the other entry points
    (tmp_path / "sub" / "9--Z" / "q.txt").write_text("q\n1\n0 0 1 1 inf\n")
    with pytest.raises(PredictionFileError):
        main([str(tmp_path / "sub"), "--gt", str(gt_dir)])


def test_cli_scores_a_saved_folder(tmp_path, write_wider_gt, capsys):
    gt_dir = write_wider_gt(tmp_path / "gt", HAND_GT)
    save_predictions(HAND_PRED, tmp_path / "sub")
    assert main([str(tmp_path / "sub"), "--gt", str(gt_dir), "--images", "all"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    for setting, expected in HAND_AP.items():
        assert result["wider"][setting] == pytest.approx(expected)
    assert main([str(tmp_path / "nowhere"), "--gt", str(gt_dir)]) == 2


# ----------------------------------------------------------------------------- real data


def test_agrees_with_official_port_on_real_val_images(widerface_root, tmp_path):
    """A fixed prediction set on 150 real val images: AP equal to the port of the official evaluation."""
    gt_dir = widerface_root / "eval_tools" / "ground_truth"
    if not gt_dir.is_dir():
        pytest.skip(f"no {gt_dir}")
    gt = load_wider_ground_truth(gt_dir)
    images = wider_reference.local_val_images(widerface_root)[::10][:150] or gt.keys[::20]
    predictions = wider_reference.synthetic_predictions(gt, images, seed=1)
    save_predictions(predictions, tmp_path / "sub")
    ours = evaluate_wider(load_predictions(tmp_path / "sub"), gt, images=images)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = wider_reference.reference_evaluation(wider_reference.get_preds(str(tmp_path / "sub")), wider_reference.get_gt_boxes(str(gt_dir)),
                                         subset=set(images))
    for setting in ("easy", "medium", "hard"):
        assert abs(ours[setting] - ref[setting]) <= 1e-6, (setting, ours[setting], ref[setting])
        assert 0.05 < ours[setting] < 1.0  # a non-trivial case
