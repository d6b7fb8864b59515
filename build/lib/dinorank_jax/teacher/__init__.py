"""The one-off teacher export (PyTorch): the only torch code in the project."""
