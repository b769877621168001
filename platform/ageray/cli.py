"""The ``ageray`` console command: ``ageray <verb> [options]`` runs ``python -m jobs.<verb>``,
and ``ageray predict PHOTO...`` answers photos here, without a server.

Why a dispatcher and not a copy of each job: the jobs live in ``jobs/`` at the project root
(so ``ray job submit --working-dir .`` ships them), and this command must behave exactly like
the documented ``python -m jobs.<verb>`` form. It runs from the project root that holds this
package (an editable install or a source checkout).

``ageray predict`` has two forms, told apart by the job's own options: with ``--input`` or
``--output`` it is batch prediction (``python -m jobs.predict``, Ray Data, a Parquet file);
otherwise every argument that is not an option is a photo, and the answers come from this
process through the one inference path (the same loader, detector, crop and forward as
Serve), printed as a table per photo with one line per face, or as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

VERBS = {
    "make-shards": "jobs.make_shards",
    "pretrain": "jobs.pretrain",
    "train": "jobs.train",
    "evaluate": "jobs.evaluate",
    "predict": "jobs.predict",
    "export": "jobs.export",
    "promote": "jobs.promote",
    "crossval": "jobs.crossval",
    "demo": "jobs.demo",
    "tune": "tuning.search",
}
MODEL_URI_ENV = "AGERAY_MODEL_URI"
JOB_OPTIONS = ("--input", "--output")


def project_root() -> Path:
    """The checkout that holds jobs/ (platform/ageray/cli.py -> ../../)."""
    return Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: ageray <verb> [options]   (each verb has --help)\n\nverbs:")
        for verb, module in VERBS.items():
            print(f"  {verb:12s} python -m {module}")
        print(f"  {'predict':12s} PHOTO... [--model URI] [--json] [--faces all|largest]: here")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb == "predict" and not is_job_form(rest):
        return predict_photos(rest)
    module = VERBS.get(verb) or VERBS.get(verb.replace("_", "-"))
    if module is None:
        print(f"ageray: unknown verb {verb!r}; choose one of {', '.join(VERBS)}", file=sys.stderr)
        return 2
    root = project_root()
    if not (root / "jobs").is_dir():
        print(
            f"ageray: no jobs/ folder next to {root}; install the project editable "
            "(pip install -e .) from a checkout, or run python -m jobs.<verb> there",
            file=sys.stderr,
        )
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(root), str(root / "platform"), env.get("PYTHONPATH", "")) if p
    )
    return subprocess.call([sys.executable, "-m", module, *rest], cwd=os.getcwd(), env=env)


def is_job_form(args: list[str]) -> bool:
    """``ageray predict --input ... --output x.parquet`` is the batch job; anything else
    (photos as arguments) is answered here."""
    return any(a in JOB_OPTIONS or a.startswith(tuple(o + "=" for o in JOB_OPTIONS)) for a in args)


# --------------------------------------------------------------------------- ageray predict
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ageray predict",
        description="Estimate the age of every face in each PHOTO, here, without a server "
        "(the one inference path Serve runs). Batch prediction into Parquet is the other "
        "form: ageray predict --model URI --input FOLDER|TAR|s3://... --output OUT.parquet",
    )
    p.add_argument("photos", nargs="+", metavar="PHOTO", help="image files (JPEG, PNG, ...)")
    p.add_argument(
        "--model",
        default=os.environ.get(MODEL_URI_ENV),
        help=f"model folder or MLflow URI (models:/name@alias); default ${MODEL_URI_ENV}",
    )
    p.add_argument("--json", action="store_true", help="print the answers' JSON (Serve's shape)")
    p.add_argument(
        "--faces",
        choices=["all", "largest"],
        default="all",
        help="all: an answer per face (default); largest: one answer per photo, as for chips",
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"])
    p.add_argument("--distribution", action="store_true", help="add the age distribution")
    return p


def predict_photos(argv: list[str]) -> int:
    """``ageray predict PHOTO...``: 0 when every photo was read (a photo without a face is
    an answer too), 1 when a file could not be read or decoded (named on stderr), 2 on a
    usage error."""
    args = _parser().parse_args(argv)
    if not args.model:
        print(
            f"ageray predict: no model: pass --model models:/<name>@<alias> (or a model "
            f"folder), or set {MODEL_URI_ENV}",
            file=sys.stderr,
        )
        return 2
    images, errors = read_photos(args.photos)
    if all(e is not None for e in errors):
        for photo, e in zip(args.photos, errors):
            print(f"ageray predict: cannot read {photo!r}: {e}", file=sys.stderr)
        return 1
    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    try:
        path = load_path(args.model, device=args.device, backend=args.backend)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"ageray predict: cannot load model {args.model!r}: {exc}", file=sys.stderr)
        return 2
    answers = path.predict_images(
        images,
        keys=list(args.photos),
        errors=errors,
        faces=args.faces,
        distribution=args.distribution,
    )
    failed = 0
    docs = []
    for photo, answer in zip(args.photos, answers):
        if answer.error is not None:
            failed += 1
            print(f"ageray predict: cannot read {photo!r}: {answer.error}", file=sys.stderr)
            continue
        if args.json:
            doc = answer.to_json(distribution=args.distribution)
            docs.append({"key": photo, **doc, "model": model_ref(path, args.model)})
        else:
            print(render_table(photo, answer))
    if args.json and docs:
        print(json.dumps(docs[0] if len(args.photos) == 1 else {"predictions": docs}, indent=2))
    return 1 if failed else 0


def read_photos(photos: list[str]) -> tuple[list[bytes | None], list[str | None]]:
    """Each file's bytes, or why it could not be read (named for the message)."""
    images: list[bytes | None] = []
    errors: list[str | None] = []
    for photo in photos:
        try:
            data = Path(photo).read_bytes()
        except OSError as exc:
            images.append(None)
            errors.append(str(exc.strerror or exc))
            continue
        images.append(data)
        errors.append(None if data else "the file is empty (0 bytes)")
    return images, errors


def load_path(uri: str, *, device: str = "cpu", backend: str = "torch") -> Any:
    """The one inference path for a model folder or an MLflow URI (the loader Serve and
    the jobs use)."""
    from ageray.inference import load_predictor

    return load_predictor(uri, device=device, backend=backend)


def model_ref(path: Any, uri: str) -> dict[str, Any]:
    """The model reference Serve's answers carry: registry name, version, alias, URI."""
    reg = getattr(path, "registry", None) or {}
    return {
        "name": reg.get("name"),
        "version": reg.get("version"),
        "alias": reg.get("alias"),
        "uri": uri,
    }


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def render_table(photo: str, answer: Any) -> str:
    """A photo's answer for a person: a header line, then one line per face (index, box,
    age, the 90% interval, the head that answered, the detector's score)."""
    rows = [r for r in answer.rows if r.get("error") is None]
    size = f"{answer.width}x{answer.height}" if answer.width else "?"
    if not rows:
        why = answer.reason or "no face found"
        return f"{photo} ({size}): {why if why.startswith('no face') else 'no face found: ' + why}"
    head = f"{photo} ({size}): {len(rows)} face{'s' if len(rows) != 1 else ''}"
    lines = [head, f"  {'face':>4}  {'box (x0, y0, x1, y1)':<24} {'age':>5}  {'90%':>11}  head"]
    for r in rows:
        box = r.get("face_box")
        where = "whole image" if box is None else ", ".join(f"{v:.0f}" for v in box)
        interval = f"{_fmt(r.get('age_low'))}-{_fmt(r.get('age_high'))}"
        score = r.get("face_score")
        extra = f"  score {score:.3f}" if score is not None else ""
        index = r.get("face_index")
        lines.append(
            f"  {'-' if index is None else index:>4}  {where:<24} {_fmt(r['age']):>5}  "
            f"{interval:>11}  {r['head']}{extra}"
        )
        if r.get("quality"):
            lines.append(f"        note: {r['quality']}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
