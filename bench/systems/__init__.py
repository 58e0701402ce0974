"""One module per system under test, each runnable as `python -m bench.systems.<name>`.

`_common.py` holds the command line, the READY/GO protocol with the runner, the timing and the
feeder; each module's docstring lists the settings used to make that system's defaults equal.
"""
