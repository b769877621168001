"""Inference: the one path from image bytes to answer rows, and predictions over a split.

Why one package: Serve, the pyfunc model, ``jobs.predict``, ``jobs.evaluate`` and training's
validation all answer with the same steps, so a number a person reads in one of them is the
number every other gives for the same image. Before, four copies disagreed (the pyfunc model
skipped alignment and the JPEG draft decode). The steps, one module each:

* ``inputs``     bytes -> tensor: alignment as trained, JPEG draft decode, eval preprocessing
* ``predictor``  :class:`RoutedPredictor`: the routed model as one module with named outputs
                 (image + flip, both heads, the routing rule with its fitted parameters);
                 the graph ``jobs.export`` writes
* ``backends``   :class:`TorchBackend` and :class:`OnnxBackend` run it on a batch
* ``answers``    named outputs -> answer rows (age, head, both heads' ages and KLs, a 90%
                 interval, distribution on request, gender/race, error), the Parquet schema
* ``path``       :class:`ImagePredictor`: all of it, bytes in, rows out
* ``sources``    what ``jobs.predict`` reads: image folders, tar archives, shards, s3://
* ``collect``    decoded shard batches -> every head's and rule's predictions (evaluation,
                 validation) and their metrics

``ageray.prediction`` (above this package: it resolves MLflow URIs) holds batch prediction's
Ray Data batch function and Parquet writer; ``ageray.export`` writes the ONNX / TorchScript
graph of :class:`RoutedPredictor`.
"""

from .answers import (
    HEADS,
    INTERVAL_LEVEL,
    ROW_FIELDS,
    answer_rows,
    arrow_schema,
    error_row,
    quantile_ages,
    rows_to_table,
)
from .backends import BACKENDS, OnnxBackend, TorchBackend, autocast
from .collect import collect_predictions, merge_predictions, predict_split, prediction_metrics
from .inputs import InputSpec, Prepared, make_aligner, prepare_image
from .path import ImagePredictor, describe_error, make_backend
from .predictor import RoutedPredictor

__all__ = [
    "BACKENDS",
    "HEADS",
    "INTERVAL_LEVEL",
    "ROW_FIELDS",
    "ImagePredictor",
    "InputSpec",
    "OnnxBackend",
    "Prepared",
    "RoutedPredictor",
    "TorchBackend",
    "answer_rows",
    "arrow_schema",
    "autocast",
    "collect_predictions",
    "describe_error",
    "error_row",
    "make_aligner",
    "make_backend",
    "merge_predictions",
    "predict_split",
    "prediction_metrics",
    "prepare_image",
    "quantile_ages",
    "rows_to_table",
]
