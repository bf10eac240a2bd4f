"""Dataset conversion stages; each module runs as ``python -m data_prep.<stage>``."""
