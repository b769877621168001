"""The model registry's side of ageray: what a registered model is and how it moves.

* ``aliases``       where an alias points, moving it (``previous-<alias>`` kept), the record
* ``promotion``     when a candidate replaces the champion: the rule and its comparison
* ``pyfunc_model``  the MLflow pyfunc wrapper, logged as code (nothing unpickled on load);
                    imports MLflow at module level, so nothing imports it: the Tracker logs
                    its file

Why a package: ``jobs.promote``, Serve's alias following and the registration step all ask
the registry the same questions; their rules live together, above tracking and evaluation.
"""

from .aliases import alias_version, log_comparison, move_alias, parse_model_uri

__all__ = ["alias_version", "log_comparison", "move_alias", "parse_model_uri"]
