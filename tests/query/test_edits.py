"""The edit language: applying edits to hand-made curricula, parsing them by id or index."""

import numpy as np
import pytest

from simfluence.query import Edit, apply_edits, parse_edit
from simfluence.runs import PAD


def test_apply_edits_by_hand():
    curriculum = np.array([[0, 1], [2, PAD], [3, 0]], dtype=np.int32)
    assert apply_edits(curriculum, [Edit("drop", 0)]).tolist() == [[PAD, 1], [2, PAD], [3, PAD]]
    assert apply_edits(curriculum, [Edit("insert", 5, (2,))]).tolist() == [[0, 1], [2, 5], [3, 0]]
    widened = apply_edits(curriculum, [Edit("insert", 5, (1,))])
    assert widened.tolist() == [[0, 1, 5], [2, PAD, PAD], [3, 0, PAD]]
    assert apply_edits(curriculum, [Edit("duplicate", 0)]).tolist() == [[0, 1, 0], [2, PAD, PAD], [3, 0, 0]]
    assert apply_edits(curriculum, [Edit("swap", steps=(1, 3))]).tolist() == [[3, 0], [2, PAD], [0, 1]]
    assert apply_edits(curriculum, [Edit("move", steps=(1, 3))]).tolist() == [[2, PAD], [3, 0], [0, 1]]
    shuffled = apply_edits(curriculum, [Edit("shuffle", seed=4)])
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, curriculum.tolist()))
    with pytest.raises(ValueError, match="outside the curriculum's steps 1..3"):
        apply_edits(curriculum, [Edit("insert", 1, (4,))])
    with pytest.raises(ValueError, match="example 0 is not in the curriculum"):
        apply_edits(curriculum, [Edit("drop", 0), Edit("duplicate", 0)])


def test_parse_edit_by_id_or_index():
    ids = np.array([f"train-{i}" for i in range(10)])
    assert parse_edit("drop:train-7", ids) == Edit("drop", 7)
    assert parse_edit("insert:3@12", ids) == Edit("insert", 3, (12,))
    assert parse_edit("shuffle:5", ids) == Edit("shuffle", seed=5)
    assert parse_edit("move:2,9", ids) == Edit("move", steps=(2, 9))
    for text, message in (("drop:nope", "unknown training id 'nope'"), ("insert:train-1", "insert:ID@STEP"),
                          ("flip:3", "KIND:ARGUMENT"), ("swap:1", "swap:STEP,STEP"), ("shuffle:x", "seed")):
        with pytest.raises(ValueError, match=message):
            parse_edit(text, ids)
