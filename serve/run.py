"""``python -m serve.run serve.app:app model_uri=... [--port 8000]``: THE way to run the
service on one machine; it drains on SIGINT/SIGTERM (``ageray.serving.lifecycle``)."""

import sys

from ageray.serving.lifecycle import main

if __name__ == "__main__":
    sys.exit(main())
