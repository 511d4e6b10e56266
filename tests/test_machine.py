"""A measured estimator names the machine it fits; used on another one it says so, and the shipped `cpu`
estimator is chosen by machine among the variants profiled on the project's machines."""

import copy
import dataclasses
import json

from hwnas import api
from hwnas.estimator import defaults
from hwnas.estimator.defaults import estimator_for, machine_warnings, shipped_for_this_machine
from hwnas.estimator.estimator import LatencyEstimator
from hwnas.models import build
from hwnas.targets import get_target
from hwnas.targets.machine import Machine

HERE = Machine("Example CPU", ("avx2", "avx512f", "avx512_vnni"), 2, "1.32.0")


def test_differences_name_each_field_and_skip_what_either_side_did_not_record():
    other = Machine("Other CPU", ("avx2", "avx512f", "amx_int8"), 4, "1.31.0")
    assert HERE.differences(other) == ["CPU 'Other CPU', not 'Example CPU'", "instruction sets +amx_int8, -avx512_vnni",
                                       "4 logical CPUs, not 2", "onnxruntime 1.31.0, not 1.32.0"]
    assert HERE.differences(HERE) == []
    unrecorded = Machine("Example CPU", None, None, None)  # an estimator profiled before the ISA was recorded
    assert HERE.differences(unrecorded) == [] and unrecorded.differences(HERE) == []
    assert Machine.from_entry(HERE.to_entry()) == HERE


def test_the_current_machine_reads_its_kernel_instruction_sets():
    here = Machine.current()
    assert here.cpu and here.logical_cpus
    assert here.isa is None or set(here.isa) <= {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                                                 "avx512_fp16", "amx_int8", "amx_bf16"}


def _profiled_on(machine: Machine) -> LatencyEstimator:
    estimator = copy.copy(estimator_for(get_target("cpu")))  # the fitted trees shared, the machine replaced
    estimator.target_config = {**estimator.target_config, "machine": {**machine.to_entry(), "date": "2026-12-06"}}
    return estimator


def test_an_estimator_of_another_machine_warns_in_estimate_and_one_of_this_machine_does_not():
    model = build("mobilenetv2", width=0.5, resolution=96)
    elsewhere = dataclasses.replace(Machine.current(), cpu="Some Other CPU")
    warned = [w for w in api.estimate(model, "cpu", estimator=_profiled_on(elsewhere)).warnings if "another machine" in w]
    assert warned == machine_warnings(_profiled_on(elsewhere))
    assert f"CPU {Machine.current().cpu!r}, not 'Some Other CPU'" in warned[0] and "hwnas profile --target cpu" in warned[0]
    assert not any("another machine" in w for w in api.estimate(model, "cpu", estimator=_profiled_on(Machine.current())).warnings)
    assert machine_warnings(estimator_for(get_target("npu-32x32"))) == []  # simulated: fits every machine


def test_the_shipped_cpu_estimator_is_the_variant_profiled_on_this_machine_else_the_nearest(monkeypatch, tmp_path):
    elsewhere = Machine("Other CPU", ("avx2",), 2, "1.32.0")
    for name, machine in (("cpu", elsewhere), ("cpu@here", HERE), ("cpu@third", dataclasses.replace(HERE, cpu="Third"))):
        (tmp_path / f"{name}.json").write_text(json.dumps({"target_config": {"machine": machine.to_entry()}}))
    monkeypatch.setattr(defaults, "_shipped_path", lambda name: tmp_path / f"{name}.json")
    monkeypatch.setattr(defaults, "shipped_estimators", lambda: ["cpu", "cpu@here", "cpu@third", "npu-32x32"])
    fewer_flags = dataclasses.replace(HERE, isa=("avx2", "avx512f"))  # as a hypervisor that hides some
    cases = ((HERE, "cpu@here"), (elsewhere, "cpu"),
             (fewer_flags, "cpu@here"),  # none fits: the same CPU model is nearest, and then warns
             (dataclasses.replace(fewer_flags, cpu="Third"), "cpu@third"),
             (Machine("Unknown", None, 2, "1.32.0"), "cpu"))  # nothing nearer than another: the default
    for machine, expected in cases:
        monkeypatch.setattr(Machine, "current", classmethod(lambda cls, m=machine: m))
        shipped_for_this_machine.cache_clear()
        assert shipped_for_this_machine("cpu") == expected, machine
    shipped_for_this_machine.cache_clear()


def test_distance_orders_the_cpu_model_before_instruction_sets_before_the_rest():
    assert HERE.distance(HERE) == (0, 0, 0)
    assert HERE.distance(dataclasses.replace(HERE, isa=("avx2",), onnxruntime="1.31.0")) == (0, 2, 1)
    assert HERE.distance(Machine("Other CPU", None, 2, "1.32.0")) == (1, 0, 0)  # unrecorded flags count as equal


def test_each_shipped_cpu_estimator_names_a_machine_of_its_own_and_estimates():
    names = [name for name in defaults.shipped_estimators() if name == "cpu" or name.startswith("cpu@")]
    assert len(names) >= 2  # the AMD EPYC default and at least one variant
    machines = []
    for name in names:
        estimator = LatencyEstimator.load(defaults._shipped_path(name))
        assert defaults._target_config(defaults._shipped_path(name)) == estimator.target_config  # the pick's head read
        machine = Machine.from_entry(estimator.target_config["machine"])
        assert machine.cpu and machine.logical_cpus and machine.onnxruntime
        assert name == "cpu" or machine.isa, f"{name}: a variant must record its instruction sets to be chosen by them"
        machines.append(machine)
        assert estimator.estimate(build("mobilenetv2", width=0.5, resolution=96), None).latency_ms > 0
    # two of them on one machine would make the choice depend on the listing's order
    assert all(a.differences(b) for i, a in enumerate(machines) for b in machines[i + 1:])
