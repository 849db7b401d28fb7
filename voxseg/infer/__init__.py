"""Inference: sliding window (tiles x mirrors x folds), the Predictor, postprocessing, ONNX export, archives.

Modules: `sliding_window` (blending), `predictor` (Predictor, find_input_cases), `postprocess` (regions ->
labels, largest component), `export` (ONNX), `archive` (folds, checkpoints, model zip files). Import from them
directly; nothing is imported here so `voxseg.infer.archive` stays light.
"""
