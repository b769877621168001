"""Inference: the one path from image bytes to answer rows, and predictions over a split.

Why one package: Serve, the pyfunc model, ``jobs.predict``, ``jobs.evaluate`` and training's
validation all answer with the same steps, so a number a person reads in one of them is the
number every other gives for the same image. Before, four copies disagreed (the pyfunc model
skipped alignment and the JPEG draft decode). The steps, one module each:

* ``loading``    :func:`load_predictor`: ANY model reference (folder, ``s3://``, ``runs:/``,
                 ``models:/name@alias``) -> the one predictor; the only place models load
* ``scratch``    the per-process temporary folder downloads and exports live in
* ``inputs``     bytes -> tensor: alignment as trained, JPEG draft decode, eval preprocessing
* ``graph``      :class:`RoutedGraph`: the routed model as one module with named outputs
                 (image + flip, both heads, the routing rule with its fitted parameters);
                 the graph ``jobs.export`` writes
* ``export``     that graph written as ONNX / TorchScript, with op and parity checks
* ``backends``   :class:`TorchBackend` and :class:`OnnxBackend` run it on a batch
* ``answers``    named outputs -> answer rows (age, head, both heads' ages and KLs, a 90%
                 interval, distribution on request, gender/race, error), the Parquet schema
* ``predictor``  :class:`ImagePredictor`: all of it, bytes in, rows out
* ``sources``    what ``jobs.predict`` reads: image folders, tar archives, shards, s3://
* ``batch``      ``jobs.predict``'s Ray Data batch function and Parquet writer
* ``collect``    decoded shard batches -> every head's and rule's predictions (evaluation,
                 validation) and their metrics
"""

from .answers import (
    HEADS,
    INTERVAL_LEVEL,
    ROW_FIELDS,
    ImageAnswer,
    answer_json,
    answer_rows,
    arrow_schema,
    error_row,
    face_json,
    flat_json,
    image_json,
    no_face_row,
    quantile_ages,
    rows_to_table,
)
from .backends import BACKENDS, OnnxBackend, TorchBackend, autocast
from .collect import collect_predictions, merge_predictions, predict_split, prediction_metrics
from .graph import RoutedGraph
from .inputs import (
    FACE_MODES,
    InputSpec,
    Prepared,
    PreparedImage,
    make_aligner,
    make_face_aligner,
    prepare_faces,
    prepare_image,
)
from .loading import (
    EXPORT_FILES,
    MODEL_FILES,
    ModelFiles,
    fetch_model_files,
    load_predictor,
    resolve_backend,
    resolve_model_dir,
    with_export,
)
from .predictor import ImagePredictor, describe_error

__all__ = [
    "BACKENDS",
    "EXPORT_FILES",
    "FACE_MODES",
    "HEADS",
    "INTERVAL_LEVEL",
    "MODEL_FILES",
    "ROW_FIELDS",
    "ImageAnswer",
    "ImagePredictor",
    "InputSpec",
    "ModelFiles",
    "OnnxBackend",
    "Prepared",
    "PreparedImage",
    "RoutedGraph",
    "TorchBackend",
    "answer_json",
    "answer_rows",
    "arrow_schema",
    "autocast",
    "collect_predictions",
    "describe_error",
    "error_row",
    "face_json",
    "fetch_model_files",
    "flat_json",
    "image_json",
    "load_predictor",
    "make_aligner",
    "make_face_aligner",
    "merge_predictions",
    "no_face_row",
    "predict_split",
    "prediction_metrics",
    "prepare_faces",
    "prepare_image",
    "quantile_ages",
    "resolve_backend",
    "resolve_model_dir",
    "rows_to_table",
    "with_export",
]


def _load_registered_before_the_one_loader(cls: type, source: object, **kwargs: object):
    """``ImagePredictor.load(folder)``, kept only for saved artifacts: a model registered
    before the one loader carries its own copy of the pyfunc wrapper (MLflow runs the code
    logged with the model), which calls it. New code calls :func:`load_predictor`."""
    return load_predictor(source, **kwargs)  # type: ignore[arg-type]


ImagePredictor.load = classmethod(_load_registered_before_the_one_loader)  # type: ignore[attr-defined]
