"""``python -m eopd`` == ``eopd`` (used by ``torchrun -m eopd train ...``)."""

from eopd.cli import main

raise SystemExit(main())
