"""`python -m asrops.cli ...` is `asrops ...` (how `asrops serve` starts its side processes)."""

from asrops.cli.main import app

app()
