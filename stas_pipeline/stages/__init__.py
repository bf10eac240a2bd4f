"""The pipeline stages, one module per command (`stas <stage>`), each with ``main(argv, prog) -> int``."""
