"""The HTML report: overlays where the structures are (every plane, anisotropic spacing, any orientation), the
points it shows, uncertainty from saved probabilities, the pages and their files, and the commands."""
from __future__ import annotations

import html as html_module
import json
import re
from pathlib import Path

import numpy as np
import pytest

from voxseg.cli import main
from voxseg.data.io import Geometry, read_image, write_image
from voxseg.errors import ConfigError, InputError
from voxseg.infer.casefiles import save_probabilities
from voxseg.report.build import ReportSources, write_report
from voxseg.report.casefigures import CaseVolumes, plane_layers, points_of_interest
from voxseg.report.overlay import FALSE_NEGATIVE, FALSE_POSITIVE, canonical, label_colour, outline
from voxseg.report.uncertainty import case_uncertainty, entropy_map

SHAPE = (20, 40, 60)  # (z, y, x)
SPACING = (3.0, 1.0, 0.5)
BOX = (slice(5, 10), slice(10, 20), slice(20, 40))  # 15 x 10 x 10 mm


def _box_case(value: int = 2) -> CaseVolumes:
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[BOX] = value
    image = np.random.default_rng(0).normal(100.0, 10.0, SHAPE).astype(np.float32)
    return CaseVolumes(labels.copy(), labels, image, None, SPACING)


def _drawn_box(layer: np.ndarray) -> tuple[int, int, int, int]:
    rows, columns = np.nonzero(layer[..., 3])
    return rows.min(), rows.max(), columns.min(), columns.max()


def _expected(picture: tuple[int, int], voxels: tuple[int, int], row_span: tuple[int, int],
              column_span: tuple[int, int]) -> tuple[float, float, float, float]:
    """Pixel rows/columns (first, last) covering voxel rows/columns [start, stop) of a plane of `voxels`."""
    row_scale, column_scale = picture[0] / voxels[0], picture[1] / voxels[1]
    return (row_span[0] * row_scale, row_span[1] * row_scale - 1, column_span[0] * column_scale,
            column_span[1] * column_scale - 1)


@pytest.mark.parametrize("plane, voxels, extent, row_span, column_span", [
    # axial: rows y (front at the top), columns x; coronal and sagittal: rows z with the head at the top
    ("axial", (40, 60), (40.0, 30.0), (10, 20), (20, 40)),
    ("coronal", (20, 60), (60.0, 30.0), (20 - 10, 20 - 5), (20, 40)),
    ("sagittal", (20, 40), (60.0, 40.0), (20 - 10, 20 - 5), (10, 20)),
])
def test_the_outline_is_drawn_where_the_box_is_on_every_plane(plane, voxels, extent, row_span, column_span):
    case = _box_case()
    point = points_of_interest(case)["structure"]
    assert all(s.start <= p < s.stop for p, s in zip(point, BOX))  # the planes cut through the box
    layers = plane_layers(case, plane, point[("axial", "coronal", "sagittal").index(plane)])
    picture = layers["image"].shape[:2]
    # square pixels: the picture has the plane's aspect in millimetres, not in voxels
    assert picture[0] / picture[1] == pytest.approx(extent[0] / extent[1], rel=0.03)
    assert max(picture) == 256
    first_row, last_row, first_column, last_column = _drawn_box(layers["reference"])
    expected = _expected(picture, voxels, row_span, column_span)
    assert abs(first_row - expected[0]) <= 1 and abs(last_row - expected[1]) <= 1
    assert abs(first_column - expected[2]) <= 1 and abs(last_column - expected[3]) <= 1
    reference = layers["reference"]
    centre = (int(sum(expected[:2]) / 2), int(sum(expected[2:]) / 2))
    assert reference[centre][3] == 0  # an outline: the inside is not painted
    drawn = reference[reference[..., 3] > 0][:, :3]
    assert np.all(drawn == label_colour(2))
    assert np.count_nonzero(layers["prediction"][..., 3]) > np.count_nonzero(reference[..., 3])  # filled


def test_a_volume_stored_the_other_way_round_is_shown_the_same():
    case = _box_case()
    flipped_affine = Geometry.from_spacing(SPACING).affine.copy()
    flipped_affine[:3, 2] *= -1  # array axis 2 now runs right-to-left... from the far end
    flipped_affine[:3, 3] = Geometry.from_spacing(SPACING).affine[:3, 2] * (SHAPE[2] - 1)
    stored = case.reference[:, :, ::-1]
    turned, spacing = canonical(stored, Geometry(flipped_affine))
    assert spacing == SPACING
    np.testing.assert_array_equal(turned, case.reference)
    permuted = Geometry.from_spacing(SPACING).affine[:, [2, 0, 1, 3]]  # array axes (x, z, y)
    turned, spacing = canonical(np.transpose(case.reference, (2, 0, 1)), Geometry(permuted))
    assert spacing == SPACING
    np.testing.assert_array_equal(turned, case.reference)


def test_the_error_point_is_in_the_largest_error_and_errors_have_their_colours():
    case = _box_case(value=1)
    case.prediction[1:4, 30:36, 5:15] = 1  # a false positive blob away from the box
    case.prediction[5:10, 10:11, 20:40] = 0  # a thinner false negative slab (100 voxels against 180)
    points = points_of_interest(case)
    assert 1 <= points["error"][0] < 4 and 30 <= points["error"][1] < 36 and 5 <= points["error"][2] < 15
    errors = plane_layers(case, "axial", points["error"][0])["errors"]
    colours = {tuple(c) for c in errors[errors[..., 3] > 0][:, :3]}
    assert colours == {FALSE_POSITIVE}
    errors = plane_layers(case, "axial", 7)["errors"]
    assert {tuple(c) for c in errors[errors[..., 3] > 0][:, :3]} == {FALSE_NEGATIVE}


def test_outline_width_and_edges():
    labels = np.zeros((10, 10), dtype=np.int16)
    labels[2:8, 2:8] = 3
    assert np.count_nonzero(outline(labels)) == 6 * 4 - 4
    assert np.count_nonzero(outline(labels, width=2)) == 36 - 4
    labels[:, :] = 1  # a region filling the picture is outlined at the picture's edge
    assert np.count_nonzero(outline(labels)) == 36


def test_label_colours_are_stable_distinct_and_not_the_error_colours():
    colours = [label_colour(v) for v in range(1, 120)]
    assert colours == [label_colour(v) for v in range(1, 120)]
    assert len(set(colours[:16])) == 16
    assert FALSE_POSITIVE not in colours and FALSE_NEGATIVE not in colours


def test_entropy_of_saved_probabilities(tmp_path: Path):
    shape = (4, 5, 6)
    sure = np.zeros((3, *shape), dtype=np.float32)
    sure[1] = 1.0
    save_probabilities(tmp_path / "sure.npz", sure, ["background", "a", "b"])
    np.testing.assert_allclose(entropy_map(tmp_path / "sure.npz"), 0.0, atol=1e-3)
    even = np.full((3, *shape), 1 / 3, dtype=np.float32)
    save_probabilities(tmp_path / "even.npz", even, ["background", "a", "b"])
    np.testing.assert_allclose(entropy_map(tmp_path / "even.npz"), 1.0, atol=2e-3)
    regions = np.full((2, *shape), 0.5, dtype=np.float32)  # sigmoid channels: a coin toss each
    regions[1] = 1.0
    save_probabilities(tmp_path / "regions.npz", regions, ["whole", "core"])
    np.testing.assert_allclose(entropy_map(tmp_path / "regions.npz"), 0.5, atol=2e-3)
    entropy = np.zeros(shape, dtype=np.float32)
    entropy[0] = 0.8
    prediction = np.zeros(shape, dtype=np.int16)
    prediction[0, :2] = 1
    assert case_uncertainty(entropy, prediction) == pytest.approx(0.8)
    assert case_uncertainty(entropy, np.zeros(shape)) == pytest.approx(0.8 / 4)


def test_a_truncated_probabilities_file_is_refused(tmp_path: Path):
    save_probabilities(tmp_path / "p.npz", np.full((2, 30, 30, 30), 0.5, dtype=np.float32), ["a", "b"])
    data = (tmp_path / "p.npz").read_bytes()
    (tmp_path / "p.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="p.npz"):
        entropy_map(tmp_path / "p.npz")


DATASET = {"labels": {"background": 0, "liver": 1, "tumour": 2}, "channel_names": {"0": "CT"},
           "file_ending": ".nii.gz"}


def _dataset(root: Path, names: list[str], wrong: dict[str, int]) -> tuple[Path, Path, Path]:
    """images/labels/preds folders of cubes; case `name` has `wrong[name]` slices of liver missing."""
    images, labels, preds = root / "imagesTs", root / "labelsTs", root / "preds"
    for folder in (images, labels, preds):
        folder.mkdir(parents=True)
    geometry = Geometry.from_spacing((2.0, 1.0, 1.0))
    for name in names:
        reference = np.zeros((12, 24, 24), dtype=np.uint8)
        reference[2:10, 4:20, 4:20] = 1
        reference[4:8, 8:14, 8:14] = 2
        prediction = reference.copy()
        prediction[2:2 + wrong[name]] = 0
        write_image(labels / f"{name}.nii.gz", reference, geometry)
        write_image(preds / f"{name}.nii.gz", prediction, geometry)
        write_image(images / f"{name}_0000.nii.gz", (reference * 60.0 - 100.0).astype(np.float32), geometry)
    (root / "dataset.json").write_text(json.dumps(DATASET))
    return images, labels, preds


def _srcs(page: str) -> list[str]:
    return [html_module.unescape(s) for s in re.findall(r'(?:src|href)="([^"#]+)"', page)]


def test_report_pages_order_cases_worst_first_and_every_file_they_name_exists(tmp_path: Path):
    names = ["good", "bad", "a&b <odd>"]
    _, labels, preds = _dataset(tmp_path, names, {"good": 0, "bad": 6, "a&b <odd>": 3})
    out = write_report(ReportSources(preds, labels), tmp_path / "out" / "review.html")
    page = out.read_text()
    rows = re.findall(r"<td class=name><a href=\"[^\"]+\">([^<]*)</a>", page)
    assert [html_module.unescape(r) for r in rows] == ["bad", "a&b <odd>", "good"]  # worst mean Dice first
    assert "<odd>" not in page  # escaped
    from urllib.parse import unquote
    for link in _srcs(page):
        assert (out.parent / unquote(link)).is_file(), link
    case_pages = sorted((out.parent / "review_files" / "cases").glob("*/index.html"))
    assert len(case_pages) == 3
    for case_page in case_pages:
        for link in _srcs(case_page.read_text()):
            assert (case_page.parent / unquote(link)).resolve().is_file(), (case_page, link)
    assert "liver (1)" in page and "false positive" in page
    assert "foreground mean" in page
    bad_folder = next(p for p in case_pages if p.parent.name.endswith("_bad")).parent
    assert (bad_folder / "error_axial_errors.png").is_file()
    # written again, the report replaces the old pictures and leaves no staging folder behind
    write_report(ReportSources(preds, labels), out)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_prediction_only_report_shows_volumes_and_uncertainty(tmp_path: Path):
    images, _, preds = _dataset(tmp_path, ["one", "two"], {"one": 0, "two": 0})
    probabilities = np.zeros((3, 12, 24, 24), dtype=np.float32)
    probabilities[0] = 1.0
    probabilities[:, 2:10, 4:20, 4:20] = np.array([0.2, 0.5, 0.3])[:, None, None, None]
    save_probabilities(preds / "two.npz", probabilities, ["background", "liver", "tumour"])
    out = write_report(ReportSources(preds, images=images, dataset_json=tmp_path / "dataset.json"))
    assert out == preds / "report.html"
    page = out.read_text()
    assert "most uncertain first" in page and "uncertainty.png" in page
    rows = re.findall(r"<td class=name><a href=\"[^\"]+\">([^<]*)</a>", page)
    assert rows == ["two", "one"]
    liver_ml = 8 * 16 * 16 * 2.0 / 1000 - 4 * 6 * 6 * 2.0 / 1000
    assert f"{liver_ml:.2f}" in page
    two = next((preds / "report_files" / "cases").glob("*_two"))
    assert (two / "uncertain_axial_uncertainty.png").is_file()


def test_report_refusals(tmp_path: Path):
    _, labels, preds = _dataset(tmp_path, ["c"], {"c": 0})
    with pytest.raises(ConfigError, match=r"\.html"):
        write_report(ReportSources(preds, labels), tmp_path / "report.pdf")
    (tmp_path / "dataset.json").rename(tmp_path / "kept.json")  # beside the predictions, it would be found
    with pytest.raises(InputError, match="--dataset-json"):
        write_report(ReportSources(preds))
    (tmp_path / "kept.json").rename(tmp_path / "dataset.json")
    with pytest.raises(InputError, match="image folder not found"):
        write_report(ReportSources(preds, labels, images=tmp_path / "nowhere"))
    assert not (preds / "report.html").exists() and not (preds / "report_files").exists()
    write_image(labels / "c.nii.gz", np.zeros((5, 5, 5), dtype=np.uint8), Geometry.from_spacing((1.0, 1.0, 1.0)))
    with pytest.raises(InputError, match="c"):
        write_report(ReportSources(preds, labels))
    assert [p.name for p in preds.iterdir() if p.name.startswith(".")] == []


def test_report_and_evaluate_report_commands(tmp_path: Path, capsys: pytest.CaptureFixture):
    _, labels, preds = _dataset(tmp_path, ["c1", "c2"], {"c1": 1, "c2": 0})
    assert main(["evaluate", str(preds), str(labels), "--report"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {preds / 'report.html'}" in printed and (preds / "report_files").is_dir()
    assert main(["report", str(preds), str(labels), "-o", str(tmp_path / "r.html"), "-j", "2"]) == 0
    assert len(list((tmp_path / "r_files" / "cases").glob("*/thumbnail.png"))) == 2
    # dataset.json says CT: the soft-tissue window (-160..240 HU) puts -100 HU at grey 38, not at black
    from PIL import Image
    picture = np.asarray(Image.open(next((tmp_path / "r_files" / "cases").glob("*/structure_axial_image.png"))))
    assert picture[0, 0, 0] == round(60 / 400 * 255)
    assert main(["report", str(preds), str(labels), "-o", str(tmp_path / "r.txt")]) == 2
    assert ".html" in capsys.readouterr().err
    assert main(["report", str(preds), "--fold", "0"]) == 2
    assert "work directory" in capsys.readouterr().err


def test_predict_report_with_probabilities_ranks_cases_by_uncertainty(tmp_path: Path, capsys):
    from test_predictor import make_workdir, tiny_plan, write_case

    work = make_workdir(tmp_path / "work", tiny_plan(), folds=(0,))
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(3)
    for name in ("p1", "p2"):
        write_case(inputs, name, rng.normal(size=(2, 18, 20, 16)).astype(np.float32),
                   Geometry.from_spacing((1.5, 1.0, 1.0)))
    assert main(["predict", "-m", str(work), "-i", str(inputs), "-o", str(tmp_path / "out"), "--folds", "0",
                 "--save-probabilities", "--report"]) == 0
    assert f"report: {tmp_path / 'out' / 'report.html'}" in capsys.readouterr().out
    page = (tmp_path / "out" / "report.html").read_text()
    scores = [float(v) for v in re.findall(r'<td data-value="([0-9.e-]+)">[0-9.]+</td>', page)[:1]]
    expected = max(case_uncertainty(entropy_map(tmp_path / "out" / f"{n}.npz"),
                                    read_image(tmp_path / "out" / f"{n}.nii.gz")[0]) for n in ("p1", "p2"))
    assert scores == [pytest.approx(expected, abs=1e-9)]  # the first row is the most uncertain case
    assert "uncertainty.png" in page
    for name in ("p1", "p2"):  # the channel-0 image under the overlays, found through the predicted cases
        case = next((tmp_path / "out" / "report_files" / "cases").glob(f"*_{name}"))
        assert (case / "structure_axial_image.png").is_file()


@pytest.mark.slow
def test_a_report_of_500_cases_is_one_light_page(tmp_path: Path):
    names = [f"case_{k:03d}" for k in range(500)]
    _, labels, preds = _dataset(tmp_path, names, {n: k % 7 for k, n in enumerate(names)})
    out = write_report(ReportSources(preds, labels), num_workers=2)
    page = out.read_text()
    assert page.count("loading=lazy") == 500  # thumbnails load as they scroll into view
    assert len(page) < 600_000  # the pictures are files, not inlined
    assert len(list((preds / "report_files" / "cases").iterdir())) == 500
    total = sum(p.stat().st_size for p in (preds / "report_files").rglob("*.png"))
    assert total / 500 < 150_000  # bytes of pictures per case


def test_predict_report_goes_with_nifti_output(tmp_path: Path, capsys):
    from test_predictor import make_workdir, tiny_plan, write_case

    work = make_workdir(tmp_path / "work", tiny_plan(), folds=(0,))
    (tmp_path / "in").mkdir()
    write_case(tmp_path / "in", "p1", np.zeros((2, 8, 8, 8), dtype=np.float32), Geometry.from_spacing((1, 1, 1)))
    assert main(["predict", "-m", str(work), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--folds", "0",
                 "--output-format", "dicom-seg", "--report"]) == 2
    assert "--report draws label maps" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
