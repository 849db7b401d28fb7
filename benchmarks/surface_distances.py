"""Surface distances of a many-class CT case: voxseg's k-d tree search against a distance transform of the masks'
bounding box (what voxseg did before, and what most evaluation code does), the same values checked.

    python benchmarks/surface_distances.py PRED.nii.gz REF.nii.gz [--classes 8] [--repeats 3]

For each of the `--classes` largest label values of REF (the ones that cost most), both ways are timed `--repeats`
times, alternating, and the median of each is printed with the ratio; the distances must agree to 1e-9 mm.
A JSON line with every figure ends the output.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from scipy import ndimage

from voxseg.data.io import read_image
from voxseg.evaluate.metrics import _union_bbox, surface, surface_distances


def distance_transform_way(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, ...]:
    """The simple path: surfaces and two distance transforms of the union bounding box."""
    box = _union_bbox(pred, ref)
    pred_surface, ref_surface = surface(pred[box]), surface(ref[box])
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[ref_surface]
    return to_ref, to_pred


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pred")
    parser.add_argument("ref")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pred, geometry = read_image(args.pred)
    ref, _ = read_image(args.ref)
    spacing = geometry.spacing
    counts = np.bincount(ref.reshape(-1).astype(np.intp))
    values = [int(v) for v in np.argsort(counts[1:])[::-1][: args.classes] + 1]
    rows = []
    for value in values:
        pred_mask, ref_mask = pred == value, ref == value
        if not pred_mask.any():
            continue
        times: dict[str, list[float]] = {"kdtree": [], "edt": []}
        for _ in range(args.repeats):
            for name, way in (("kdtree", surface_distances), ("edt", distance_transform_way)):
                start = time.perf_counter()
                result = way(pred_mask, ref_mask, spacing)
                times[name].append(time.perf_counter() - start)
                if name == "kdtree":
                    fast = result
                else:
                    for a, b in zip(fast, result):
                        np.testing.assert_allclose(a, b, atol=1e-9)
        box = _union_bbox(pred_mask, ref_mask)
        row = {"label": value, "box_voxels": int(np.prod([s.stop - s.start for s in box])),
               "surface_voxels": int(fast[0].size + fast[1].size),
               "kdtree_s": statistics.median(times["kdtree"]), "edt_s": statistics.median(times["edt"])}
        rows.append(row)
        print(f"label {value:3d}: box {row['box_voxels'] / 1e6:6.1f} M voxels, surfaces {row['surface_voxels']:8d}: "
              f"k-d tree {row['kdtree_s']:6.2f} s, distance transform {row['edt_s']:6.2f} s "
              f"({row['edt_s'] / row['kdtree_s']:.1f}x)")
    total_fast, total_edt = sum(r["kdtree_s"] for r in rows), sum(r["edt_s"] for r in rows)
    print(f"{len(rows)} classes: k-d tree {total_fast:.1f} s, distance transform {total_edt:.1f} s "
          f"({total_edt / total_fast:.1f}x); values equal to 1e-9 mm")
    print(json.dumps({"rows": rows, "kdtree_s": total_fast, "edt_s": total_edt}))


if __name__ == "__main__":
    main()
