"""`kvrelay profile`'s load levels: every --max-concurrency is honoured, none silently capped."""

from __future__ import annotations

import argparse

import pytest
from kvrelay_worker.profile import add_arguments, concurrency_levels


@pytest.mark.parametrize(
    ("highest", "levels"),
    [
        (1, [1]),
        (2, [1, 2]),
        (6, [1, 2, 4, 6]),
        (64, [1, 2, 4, 8, 16, 32, 64]),
        (200, [1, 2, 4, 8, 16, 32, 64, 128, 200]),
    ],
)
def test_levels_double_up_to_the_highest_asked(highest: int, levels: list[int]) -> None:
    assert concurrency_levels(highest) == levels


def test_a_max_concurrency_below_one_is_refused_by_the_cli() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(
            ["--url", "http://x/v1", "--ttft-slo", "1", "--itl-slo", "0.1", "--max-concurrency", "0"]
        )
