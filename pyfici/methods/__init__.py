"""Training methods built on pyfici's ops: AutoLR, rolling-back, FICGAN."""
