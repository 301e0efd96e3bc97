"""What tests and benchmarks share: scratch repositories, lab fleets, built releases, injected faults.

Not part of the edgeops package; the benchmarks import it, never the tests.
"""
