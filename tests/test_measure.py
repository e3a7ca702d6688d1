"""The throughput callback: exact token counts from hand-made ``training_step`` outputs, warm-up
batches left out, the CUDA path (events and device-side counts read in bulk, never a device sync per
step) driven by a fake event on CPU, the contention rule on hand-made inputs, and the contention fields
of a real short CPU fit of the tiny model, in the run's record."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from ftbench.bench import measure
from ftbench.bench.measure import (LOAD_MARGIN, RUNQUEUE_WAIT_MAX, UTILISATION_MIN, Throughput, contention,
                                   other_gpu_processes)


class FakeClock:
    """``perf_counter`` and ``process_time`` that move only when the test says."""

    def __init__(self):
        self.wall = 100.0
        self.cpu = 10.0

    def perf_counter(self) -> float:
        return self.wall

    def process_time(self) -> float:
        return self.cpu

    def advance(self, wall: float, cpu: float) -> None:
        self.wall += wall
        self.cpu += cpu


def drive(tp: Throughput, module, steps: list[tuple[float, dict]], clock: FakeClock | None = None, gpu=None,
          cpu_share: float = 1.0) -> None:
    """Run the callback's hooks over ``steps`` = [(seconds, outputs)] as Lightning would."""
    trainer = SimpleNamespace()
    tp.on_train_start(trainer, module)
    for i, (dt, outputs) in enumerate(steps):
        tp.on_train_batch_start(trainer, module, None, i)
        if clock is not None:
            clock.advance(dt, dt * cpu_share)
        if gpu is not None:
            gpu.run(dt)
        tp.on_train_batch_end(trainer, module, outputs, None, i)
    tp.on_train_end(trainer, module)


def outputs(trained, padded, real, tensors=True):
    t = torch.tensor if tensors else (lambda v: v)
    return {"loss": torch.tensor(1.0), "trained_tokens": t(trained), "padded_tokens": padded, "real_tokens": t(real)}


CPU = SimpleNamespace(device=torch.device("cpu"))


# ---------------------------------------------------------------------------------- counts and warm-up
def test_tokens_counted_exactly_and_warmup_left_out(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(measure, "time", clock)
    # two slow warm-up batches with many tokens, then three timed ones
    steps = [(5.0, outputs(1000, 4000, 3000)), (5.0, outputs(1000, 4000, 3000)),
             (0.5, outputs(10, 64, 48)), (0.25, outputs(20, 64, 56, tensors=False)), (0.25, outputs(30, 128, 96))]
    tp = Throughput(warmup_steps=2)
    drive(tp, CPU, steps, clock)
    s = tp.summary()
    assert s["warmup_batches"] == 2 and s["timed_batches"] == 3
    assert s["timed_seconds"] == pytest.approx(1.0) and tp.step_times == pytest.approx([0.5, 0.25, 0.25])
    assert s["trained_tokens"] == 2060  # every batch
    assert s["trained_tokens_per_s"] == pytest.approx(60 / 1.0)  # timed batches only
    assert s["padded_tokens_per_s"] == pytest.approx(256 / 1.0)
    assert s["padding_fraction"] == pytest.approx(1 - 200 / 256)
    assert s["step_time_mean_s"] == pytest.approx(1 / 3) and s["step_time_median_s"] == pytest.approx(0.25)
    assert s["timing"] == "perf_counter" and s["host_seconds"] == pytest.approx(1.0)
    assert s["cpu_seconds"] == pytest.approx(1.0)
    assert s["cpu_utilisation"] == pytest.approx(1.0 / tp.threads)


def test_no_timed_batch_gives_no_rate():
    tp = Throughput(warmup_steps=5)
    drive(tp, CPU, [(0.0, outputs(3, 8, 8))] * 2)
    s = tp.summary()
    assert s["timed_batches"] == 0 and s["trained_tokens"] == 6
    assert s["trained_tokens_per_s"] is None and s["cpu_utilisation"] is None and s["padding_fraction"] is None


def test_outputs_that_are_not_a_dict_count_nothing():
    tp = Throughput(warmup_steps=0)
    drive(tp, CPU, [(0.0, None), (0.0, torch.tensor(2.0)), (0.0, outputs(7, 16, 9))])
    s = tp.summary()
    assert s["timed_batches"] == 3 and s["trained_tokens"] == 7


def test_cpu_utilisation_counts_the_threads(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(measure, "time", clock)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    tp = Throughput(warmup_steps=0)
    drive(tp, CPU, [(1.0, outputs(1, 1, 1))] * 4, clock, cpu_share=2.0)  # 2 CPU-seconds a second on 4 threads
    assert tp.summary()["cpu_utilisation"] == pytest.approx(0.5) and tp.summary()["torch_threads"] == 4


# ---------------------------------------------------------------------------------- the CUDA path
class FakeGPU:
    """A device timeline that runs ``lag`` seconds behind the host: events recorded less than ``lag``
    ago have not completed, as on a real launch queue."""

    def __init__(self, lag: float):
        self.clock = 0.0
        self.lag = lag
        self.done = -1.0
        self.events: list[FakeEvent] = []

    def run(self, seconds: float) -> None:
        self.clock += seconds
        self.done = self.clock - self.lag

    def event(self) -> "FakeEvent":
        ev = FakeEvent(self)
        self.events.append(ev)
        return ev


class FakeEvent:
    def __init__(self, gpu: FakeGPU):
        self.gpu, self.t, self.syncs, self.reads = gpu, None, 0, 0

    def record(self, stream=None) -> None:
        self.t = self.gpu.clock

    def query(self) -> bool:
        return self.t is not None and self.t <= self.gpu.done

    def synchronize(self) -> None:  # waits for the device up to this event
        self.syncs += 1
        self.gpu.done = max(self.gpu.done, self.t)

    def elapsed_time(self, end: "FakeEvent") -> float:
        if not (self.query() and end.query()):  # CUDA refuses to time an event still in flight
            raise RuntimeError("event not completed")
        self.reads += 1
        return (end.t - self.t) * 1000.0


def test_cuda_path_reads_events_and_counts_in_bulk(monkeypatch):
    gpu = FakeGPU(lag=0.15)
    monkeypatch.setattr(measure, "_cuda", lambda module: True)
    monkeypatch.setattr(Throughput, "_new_event", staticmethod(gpu.event))
    monkeypatch.setattr(measure, "_gpu_other_processes", lambda device: 0)

    def no_sync(*a, **k):
        raise AssertionError("the throughput callback synchronised the device")

    monkeypatch.setattr(torch.cuda, "synchronize", no_sync)
    module = SimpleNamespace(device=torch.device("cuda", 0))
    times = [0.3, 0.3, 0.1, 0.2, 0.1, 0.2, 0.1, 0.2, 0.1, 0.2]
    steps = [(dt, outputs(i + 1, 64, 40 + i)) for i, dt in enumerate(times)]
    tp = Throughput(warmup_steps=2, read_every=4)
    trainer = SimpleNamespace()
    tp.on_train_start(trainer, module)
    for i, (dt, out) in enumerate(steps):
        tp.on_train_batch_start(trainer, module, None, i)
        gpu.run(dt)
        tp.on_train_batch_end(trainer, module, out, None, i)
        # the counts stay device tensors (no host read per step); the events are read every 4 batches,
        # and only those already completed (never waiting on the device)
        assert isinstance(tp._timed["trained_tokens"], (int, torch.Tensor))
        if i >= 2:
            assert isinstance(tp._timed["trained_tokens"], torch.Tensor)
        assert all(ev.syncs == 0 for ev in gpu.events)
        if i == 3:  # first read: batch 2 is done, batch 3 still in flight
            assert tp.step_times == pytest.approx([0.1])
    assert len(gpu.events) == 2 * 8  # start and end of the 8 timed batches, none for warm-up
    tp.on_train_end(trainer, module)
    assert tp.step_times == pytest.approx(times[2:])
    assert sum(ev.syncs for ev in gpu.events) == 1  # once, at the end, on the last event in flight
    assert all(ev.reads <= 1 for ev in gpu.events)
    s = tp.summary()
    assert s["timing"] == "cuda events" and s["timed_batches"] == 8
    assert s["timed_seconds"] == pytest.approx(1.2)
    assert s["trained_tokens"] == sum(range(1, 11))
    assert s["trained_tokens_per_s"] == pytest.approx(sum(range(3, 11)) / 1.2)
    assert s["padding_fraction"] == pytest.approx(1 - sum(40 + i for i in range(2, 10)) / (64 * 8))
    assert s["gpu_other_processes"] == 0


def test_cuda_run_beside_another_gpu_process_is_contended(monkeypatch):
    gpu = FakeGPU(lag=0.0)
    monkeypatch.setattr(measure, "_cuda", lambda module: True)
    monkeypatch.setattr(Throughput, "_new_event", staticmethod(gpu.event))
    monkeypatch.setattr(measure, "_gpu_other_processes", lambda device: 1)
    monkeypatch.setattr(measure, "_load_average", lambda: 0.0)
    tp = Throughput(warmup_steps=0)
    drive(tp, SimpleNamespace(device=torch.device("cuda", 0)), [(0.1, outputs(1, 2, 2))] * 3, gpu=gpu)
    s = tp.summary()
    assert s["gpu_other_processes"] == 1 and s["contended"]
    assert any("other process" in r for r in s["contended_reasons"])


@pytest.mark.parametrize("listing, expected", [
    ("GPU:0\nno processes are running", 0),
    ("GPU:0\nprocess        111 uses     1200.000 MB GPU memory", 0),  # this process alone
    ("GPU:0\nprocess        111 uses     1200.000 MB GPU memory\nprocess        222 uses 500.000 MB GPU memory", 1),
    ("GPU:0\nprocess     900001 uses     1200.000 MB GPU memory", 0),  # a container: host PIDs; one is this process
    ("GPU:0\nprocess     900001 uses 1.000 MB GPU memory\nprocess     900002 uses 1.000 MB GPU memory", 1),
    ("pynvml module not found, please install nvidia-ml-py", None),
    ("cuda driver can't be loaded, is cuda enabled?", None),
])
def test_other_gpu_processes(listing, expected):
    assert other_gpu_processes(listing, pid=111) == expected


# ---------------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("device, kw, expected", [
    # CPU: the process got its threads' CPU time, nothing else waiting
    ("cpu", dict(cpu_utilisation=0.97, load_average=1.1, usable_cpus=2, runqueue_wait_fraction=0.01), []),
    # at the edges: the run's own 2 threads on 2 CPUs plus housekeeping
    ("cpu", dict(cpu_utilisation=UTILISATION_MIN, load_average=2 + LOAD_MARGIN, usable_cpus=2,
                 runqueue_wait_fraction=RUNQUEUE_WAIT_MAX), []),
    ("cpu", dict(cpu_utilisation=0.79, load_average=1.0, usable_cpus=2), ["CPU utilisation"]),
    ("cpu", dict(cpu_utilisation=0.95, load_average=2.01 + LOAD_MARGIN, usable_cpus=2), ["load average"]),
    ("cpu", dict(cpu_utilisation=0.95, load_average=1.0, usable_cpus=2, runqueue_wait_fraction=RUNQUEUE_WAIT_MAX + 0.01),
     ["waited for a CPU"]),
    ("cpu", dict(cpu_utilisation=0.4, load_average=5.0, usable_cpus=2, runqueue_wait_fraction=0.6),
     ["load average", "waited for a CPU", "CPU utilisation"]),
    # nothing could be read: nothing to say
    ("cpu", dict(cpu_utilisation=None, load_average=None, usable_cpus=None), []),
    # CUDA: the host thread's CPU share is not a sign (it waits for the device)
    ("cuda", dict(cpu_utilisation=0.1, load_average=3.0, usable_cpus=16, gpu_other_processes=0), []),
    ("cuda", dict(cpu_utilisation=0.1, load_average=3.0, usable_cpus=16, gpu_other_processes=None), []),
    ("cuda", dict(cpu_utilisation=1.0, load_average=3.0, usable_cpus=16, gpu_other_processes=2), ["other process"]),
    ("cuda", dict(cpu_utilisation=1.0, load_average=17.0, usable_cpus=16), ["load average"]),
    ("cuda", dict(cpu_utilisation=1.0, load_average=4.0, usable_cpus=16, runqueue_wait_fraction=0.3), ["waited"]),
])
def test_contention_rule(device, kw, expected):
    reasons = contention(device, **kw)
    assert len(reasons) == len(expected)
    for reason, word in zip(reasons, expected):
        assert word in reason


# ---------------------------------------------------------------------------------- a real fit
def test_contention_fields_of_a_short_cpu_fit(tiny_model_dir, tmp_path):
    from helpers import cpu_trainer, instruction_data
    from test_sft import make_method

    from ftbench.bench.record import RunRecorder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: its ideal CPU share is exactly one CPU
    try:
        method = make_method("lora", tiny_model_dir)
        tp = Throughput(warmup_steps=2)
        rec = RunRecorder(tmp_path / "run.json", {"run_id": "run", "subcommand": "fit", "seed": 0, "config": {}})
        cpu_trainer(5, [tp, rec]).fit(method, datamodule=instruction_data(method.backbone))
        rec.finish()
    finally:
        torch.set_num_threads(threads)
    record = json.loads((tmp_path / "run.json").read_text())
    t = record["train_info"]["throughput"]
    assert t["warmup_batches"] == 2 and t["timed_batches"] == 3 and t["timing"] == "perf_counter"
    assert t["torch_threads"] == 1 and t["cpu_count"] == os.cpu_count()
    assert 1 <= t["usable_cpus"] <= os.cpu_count()
    assert t["host_seconds"] == pytest.approx(t["timed_seconds"])  # on CPU the host window is the step
    assert 0 < t["cpu_seconds"] and 0 < t["cpu_utilisation"] <= 1.1  # one thread: at most one CPU's time
    for key in ("load_average_start", "load_average_end"):
        assert isinstance(t[key], float) and t[key] >= 0
    if t["runqueue_wait_fraction"] is not None:  # Linux (/proc/thread-self/schedstat)
        assert 0 <= t["runqueue_wait_fraction"] <= 1
        assert t["cpu_utilisation"] + t["runqueue_wait_fraction"] <= 1.15  # one thread: on a CPU or waiting
    assert t["gpu_other_processes"] is None
    # the verdict is the documented rule applied to the recorded figures
    reasons = contention("cpu", cpu_utilisation=t["cpu_utilisation"], usable_cpus=t["usable_cpus"],
                         load_average=max(t["load_average_start"], t["load_average_end"]),
                         runqueue_wait_fraction=t["runqueue_wait_fraction"])
    assert t["contended"] is bool(reasons) and t["contended_reasons"] == reasons
