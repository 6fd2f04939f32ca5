"""Training that diverges stops with Detectron2's `FloatingPointError` naming the iteration and
the losses, for every method family (a learning rate of 1e6 blows the weights up in one or two
iterations). TSD used to stop with an AssertionError from `Box2BoxTransform` instead."""
import re

import pytest

from projects.engine import argument_parser, main

from .test_resume import FAMILIES, _args


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_divergence_stops_with_floating_point_error(family, tmp_path):
    config, opts = FAMILIES[family]
    argv = _args(config, opts, tmp_path) + [
        "SOLVER.BASE_LR", "1e6", "SOLVER.WARMUP_ITERS", "0", "SOLVER.MAX_ITER", "6"]
    with pytest.raises(FloatingPointError) as info:
        main(argument_parser().parse_args(argv))
    message = str(info.value)
    iteration = re.search(r"iteration=(\d+)", message)
    assert iteration and 0 < int(iteration.group(1)) < 6, message
    assert re.search(r"'loss_\w+': [^,]*(nan|e\+\d\d)", message), message  # the blown-up loss
