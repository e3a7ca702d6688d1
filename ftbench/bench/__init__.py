"""Measurement (memory, throughput, time) and the one-record-per-run writer."""

from ftbench.bench.measure import PeakMemory, Throughput
from ftbench.bench.record import RunRecorder

__all__ = ["PeakMemory", "Throughput", "RunRecorder"]
