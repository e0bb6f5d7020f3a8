"""The shared machinery of the loss suites: the error model (tolerance.py), the parity check and the loss
specification it takes (parity.py), and the tests every loss passes (tester.py)."""
