"""Parameter counts (GLAE Table IV's comparison) and the ``python -m ageray.model.params`` table."""

from __future__ import annotations

import pytest
from torch import nn

from ageray.model import count_parameters
from ageray.model.params import glae_parameter_table, main


def test_count_parameters_dedupes_and_skips_training_only() -> None:
    a = nn.Linear(3, 4)
    net = nn.Sequential(a, a, nn.Linear(4, 2))
    assert count_parameters(net) == 16 + 10
    net[2].training_only = True  # type: ignore[assignment]
    assert count_parameters(net, include_local=False) == 16


def test_glae_table_resnet18_depth0() -> None:
    row = glae_parameter_table(["resnet18"], depths=[0])[0]
    assert row["fmap"] == "7x7" and row["fprime"] == "101x7x7"
    assert row["trunk"] == 11_176_512  # ResNet-18 without its fc: the paper's "11M"
    assert row["fr"] == 2 * 101 * 16 * 16 + 101
    assert row["proj"] == 101 * 49 * 512 + 512
    assert row["classifier"] == 512 * 101 + 101
    assert (
        row["total"]
        == row["eval_total"]
        == sum(
            int(row[k])  # type: ignore[call-overload]
            for k in ("trunk", "fr", "proj", "classifier")
        )
    )


def test_params_script_prints_table(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--backbones", "resnet18"])
    text = capsys.readouterr().out
    assert "resnet18" in text and "11M" in text and "13.815M" in text
