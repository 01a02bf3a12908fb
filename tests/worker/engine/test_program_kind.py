"""The compiled parts' typed key and the selection Engine.compile builds (worker/engine/program_kind.py)."""

from __future__ import annotations

import pytest

from worker.engine.program_kind import Part, Pixels, ProgramKind, Programs, Role


def test_names_are_those_of_the_cache_files_and_compile_times():
    assert str(ProgramKind(Part.begin)) == "begin"
    assert str(ProgramKind(Part.advance, guided=False)) == "advance-free"
    assert str(ProgramKind(Part.finish, output=Pixels.float32, model=Role.refiner)) == "refiner-finish-float32"
    assert str(ProgramKind(Part.begin, guided=False, adapted=True)) == "begin-free-lora"
    assert ProgramKind("finish", output="float32") == ProgramKind(Part.finish, output=Pixels.float32)


@pytest.mark.parametrize(
    "kind",
    [
        {"part": Part.encode, "guided": False},
        {"part": Part.finish, "adapted": True},
        {"part": Part.begin, "output": Pixels.float32},
        {"part": Part.encode, "model": Role.refiner},
        {"part": Part.advance, "model": Role.refiner, "adapted": True},
    ],
)
def test_kinds_that_do_not_exist_are_refused(kind):
    with pytest.raises(ValueError):
        ProgramKind(**kind)


def test_the_served_selection_is_what_a_worker_compiled_before_there_was_one():
    assert [str(k) for k in Programs.SERVED.kinds()] == [
        "noise",
        "begin",
        "advance",
        "begin-free",
        "advance-free",
        "encode",
        "finish-uint8",
    ]
    both = [str(k) for k in Programs.SERVED.kinds(refiner=True, adapters=True)]
    assert both[7:] == [
        "refiner-begin",
        "refiner-advance",
        "refiner-begin-free",
        "refiner-advance-free",
        "refiner-finish-uint8",
        "begin-lora",
        "advance-lora",
        "begin-free-lora",
        "advance-free-lora",
    ]


def test_a_selection_compiles_only_what_it_names():
    parity = Programs.guided | Programs.float32
    assert [str(k) for k in parity.kinds(refiner=True, adapters=True)] == [
        "noise",
        "begin",
        "advance",
        "finish-float32",
    ]
    assert [str(k) for k in (Programs.free | Programs.refiner).kinds(refiner=True)] == [
        "noise",
        "begin-free",
        "advance-free",
        "refiner-begin-free",
        "refiner-advance-free",
    ]
    assert Programs.NONE.kinds(refiner=True, adapters=True) == []


def test_an_engine_serving_ip_adapters_compiles_an_imaged_begin_and_advance_beside_the_plain_ones():
    kinds = [str(k) for k in (Programs.guided | Programs.images | Programs.uint8).kinds(images=True)]
    assert kinds == ["noise", "begin", "advance", "finish-uint8", "begin-image", "advance-image"]
    with_all = [str(k) for k in Programs.SERVED.kinds(adapters=True, controls=True, images=True)]
    assert {"begin-lora-image", "advance-lora-control-image", "advance-free-control-image"} <= set(with_all)
    assert [str(k) for k in Programs.SERVED.kinds()] == [str(k) for k in Programs.SERVED.kinds(images=False)]
    for bad in (
        {"part": Part.finish, "imaged": True},
        {"part": Part.begin, "model": Role.refiner, "imaged": True},
    ):
        with pytest.raises(ValueError, match="IP-Adapters"):
            ProgramKind(**bad)
