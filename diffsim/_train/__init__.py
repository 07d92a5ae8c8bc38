"""The training engine behind `diffsim.train`: the budget plan (`plan`), the checks of the
inputs and of the strategy contract (`contract`), the compiled program and its cache
(`program`), the host loop (`loop`), sweep grids (`sweep`), the log and progress bar
(`log`) and checkpoints (`checkpoint`)."""
