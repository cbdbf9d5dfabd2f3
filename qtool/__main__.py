"""``python -m qtool``: the same as the ``qtool`` command (torchrun runs ``-m qtool train ...`` on every rank)."""
from qtool.cli import main

if __name__ == "__main__":
    main()
