"""The ``ageray`` console command: ``ageray <verb> [options]`` runs ``python -m jobs.<verb>``.

Why a dispatcher and not a copy of each job: the jobs live in ``jobs/`` at the project root
(so ``ray job submit --working-dir .`` ships them), and this command must behave exactly like
the documented ``python -m jobs.<verb>`` form. It runs from the project root that holds this
package (an editable install or a source checkout).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

VERBS = {
    "make-shards": "jobs.make_shards",
    "pretrain": "jobs.pretrain",
    "train": "jobs.train",
    "evaluate": "jobs.evaluate",
    "predict": "jobs.predict",
    "export": "jobs.export",
    "demo": "jobs.demo",
    "tune": "tuning.search",
}


def project_root() -> Path:
    """The checkout that holds jobs/ (platform/ageray/cli.py -> ../../)."""
    return Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: ageray <verb> [options]   (each verb has --help)\n\nverbs:")
        for verb, module in VERBS.items():
            print(f"  {verb:12s} python -m {module}")
        return 0
    verb, rest = argv[0], argv[1:]
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


if __name__ == "__main__":
    raise SystemExit(main())
