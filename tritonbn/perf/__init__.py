"""The perf suite: ``tritonbn bench`` (time tritonbn, torch eager and torch.compile
against the device's copy bandwidth) and ``tritonbn report`` (Markdown + PNG from
the JSON results).

``shapes`` (the shape sets), ``model`` (the byte model), ``schema`` (the results
format) import nothing heavy; ``bench`` imports tritonbn's kernels and ``report``
imports matplotlib, each on first use.
"""
