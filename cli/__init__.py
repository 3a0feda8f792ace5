"""Entry points, the top of the house: the `asrops` command (one module per command group) and
the wiring of processes (what `asrops serve` starts, the drift monitor handing verdicts to the
retrain trigger). Everything below is imported from here; nothing imports this package."""
