"""The one label check: what an age, gender, race and identity must be to enter a shard or
a batch, and the reason a value that fails is counted under.

Why one module: labels enter in three places. Importers parse them from file names and csv
cells, the shard writer receives records from any code (an importer, the synthetic
generator, a user's script), and the stream reads label JSON from shards that may have been
written by hand or by an older version. With a rule in each place, a shard could carry an
age the importers reject (150, NaN, "26") and bias every metric or turn the loss into NaN
far from its cause. All three call the functions here; a value that fails raises
:class:`LabelError`, whose ``reason`` is the skip reason they count (importer report,
manifest ``skipped``, the stream's ``loader.skipped`` and so the ``train_skipped_*`` /
``val_skipped_*`` metrics and the evaluation report).

The rules (docs/design.md): an age is years, a finite number in ``[AGE_MIN, AGE_MAX]`` =
``[0, 120]`` (UTKFace reaches 116; the model's classes 0..100 clip above 100, the metrics
use the true value); ``age_std`` the same; gender 0 male / 1 female; race UTKFace's 0 white,
1 black, 2 asian, 3 indian, 4 other; identity (in a shard) a non-negative integer. Every
label may be absent (None) except the age where the caller requires one.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

__all__ = [
    "AGE_MAX",
    "AGE_MIN",
    "GENDERS",
    "LABEL_SKIP_REASONS",
    "RACES",
    "LabelError",
    "check_age",
    "check_gender",
    "check_identity",
    "check_labels",
    "check_race",
    "parse_age",
    "parse_gender",
    "parse_race",
]

AGE_MIN, AGE_MAX = 0.0, 120.0
GENDERS = ("male", "female")  # UTKFace convention: 0 male, 1 female
RACES = ("white", "black", "asian", "indian", "other")  # UTKFace convention

LABEL_SKIP_REASONS = (
    "missing_age",  # no age where one is required (a stream of an age split)
    "bad_age",  # an age that is not a finite number
    "age_out_of_range",  # an age outside [AGE_MIN, AGE_MAX]
    "bad_age_std",  # an age_std that is not a finite number
    "age_std_out_of_range",  # an age_std outside [AGE_MIN, AGE_MAX]
    "bad_gender",  # a gender code other than 0 / 1
    "bad_race",  # a race code outside 0..4
    "bad_identity",  # an identity that is not a non-negative integer (shards)
)


class LabelError(ValueError):
    """A label value that fails its check; ``reason`` is the skip reason to count."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _number(value: Any, field: str) -> float:
    """``value`` (any real number: int, float, numpy scalar) as a finite float, or
    :class:`LabelError` ``bad_<field>``. Strings and booleans are not numbers here (JSON
    ``"26"`` or ``true`` in a shard is a writer's bug)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise LabelError(f"bad_{field}", f"{value!r} is not a number")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        raise LabelError(f"bad_{field}", "too large") from None
    if not math.isfinite(number):
        raise LabelError(f"bad_{field}", f"{value!r} is not finite")
    return number


def check_age(
    value: Any,
    *,
    field: str = "age",
    age_range: tuple[float, float] = (AGE_MIN, AGE_MAX),
) -> float:
    """A finite age in ``age_range`` (inclusive); :class:`LabelError` ``bad_<field>`` or
    ``<field>_out_of_range``. ``field`` is ``age`` or ``age_std``."""
    number = _number(value, field)
    lo, hi = age_range
    if not lo <= number <= hi:
        raise LabelError(f"{field}_out_of_range", f"{number:g} is outside [{lo:g}, {hi:g}]")
    return number


def _code(value: Any, field: str, count: int) -> int | None:
    if value is None:
        return None
    try:
        number = _number(value, field)
    except LabelError:
        raise LabelError(f"bad_{field}", f"{value!r} is not a {field} code") from None
    if number != int(number) or not 0 <= number < count:
        raise LabelError(f"bad_{field}", f"{value!r} is not in 0..{count - 1}")
    return int(number)


def check_gender(value: Any) -> int | None:
    """0 male / 1 female (an integral number), None when absent; else ``bad_gender``."""
    return _code(value, "gender", len(GENDERS))


def check_race(value: Any) -> int | None:
    """UTKFace's race code 0..4, None when absent; else ``bad_race``."""
    return _code(value, "race", len(RACES))


def check_identity(value: Any) -> int | None:
    """A shard's identity class (a non-negative integer), None when absent; else
    ``bad_identity``."""
    if value is None:
        return None
    try:
        number = _number(value, "identity")
    except LabelError:
        raise LabelError("bad_identity", f"{value!r} is not an identity class") from None
    if number != int(number) or number < 0:
        raise LabelError("bad_identity", f"{value!r} is not a non-negative integer")
    return int(number)


def check_labels(
    labels: Mapping[str, Any],
    *,
    require_age: bool,
    age_range: tuple[float, float] = (AGE_MIN, AGE_MAX),
    identity: bool = True,
) -> dict[str, Any]:
    """Every label of ``labels`` checked: ``{"age", "age_std", "gender", "race",
    "identity"}`` with None where absent. Raises :class:`LabelError` for the first label
    that fails (``missing_age`` when ``require_age`` and there is none). ``identity=False``
    leaves the identity alone (a record's identity is a name, not a class)."""
    age = labels.get("age")
    if age is None:
        if require_age:
            raise LabelError("missing_age")
    else:
        age = check_age(age, age_range=age_range)
    std = labels.get("age_std")
    return {
        "age": age,
        "age_std": None if std is None else check_age(std, field="age_std", age_range=age_range),
        "gender": check_gender(labels.get("gender")),
        "race": check_race(labels.get("race")),
        "identity": check_identity(labels.get("identity")) if identity else labels.get("identity"),
    }


# --------------------------------------------------------------------------------------
# Text -> label (importers: file names and csv cells)
# --------------------------------------------------------------------------------------

_GENDER_WORDS = {
    "0": 0, "m": 0, "male": 0, "man": 0, "boy": 0,
    "1": 1, "f": 1, "female": 1, "woman": 1, "girl": 1,
}  # fmt: skip
_RACE_WORDS = {
    **{str(i): i for i in range(len(RACES))},
    **{name: i for i, name in enumerate(RACES)},
    "w": 0, "caucasian": 0, "b": 1, "african": 1, "a": 2, "i": 3,
    "h": 4, "hispanic": 4, "latino": 4, "o": 4,
}  # fmt: skip


def parse_age(text: str | float | int, *, field: str = "age") -> float:
    """An age from text (``"26"``, ``"26.5"``) or a number, checked by :func:`check_age`:
    raises :class:`LabelError` ``bad_<field>`` or ``<field>_out_of_range``."""
    if isinstance(text, str):
        try:
            text = float(text)
        except ValueError:
            raise LabelError(f"bad_{field}", f"{text!r} is not a number") from None
    return check_age(text, field=field)


def _int_text(text: str) -> str:
    """``"1.0"`` -> ``"1"`` so that pandas-written csvs (floats for ints) parse too."""
    try:
        f = float(text)
    except ValueError:
        return text
    return str(int(f)) if f.is_integer() else text


def parse_gender(text: str) -> int | None:
    """0 male / 1 female from ints or words (``m``, ``female``...); empty -> None;
    anything else raises :class:`LabelError` ``bad_gender``."""
    return _parse_word(text, _GENDER_WORDS, "gender")


def parse_race(text: str) -> int | None:
    """UTKFace race code from ints 0-4 or words (``white``, ``black``, ``asian``, ``indian``,
    ``other``; Morph letters B/W/A/H/O); empty -> None; else :class:`LabelError`
    ``bad_race``."""
    return _parse_word(text, _RACE_WORDS, "race")


def _parse_word(text: str, words: Mapping[str, int], field: str) -> int | None:
    t = text.strip().lower()
    if not t:
        return None
    code = words.get(_int_text(t))
    if code is None:
        raise LabelError(f"bad_{field}", repr(text))
    return code
