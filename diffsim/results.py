"""`Run`: the result of `train` / `train_seeds` / `train_sweep`, and its round trip to a
folder (`Run.save`, `load_run`); and `provenance`: the commit, versions and machine a
result came from. The machinery lives in `diffsim._results`."""

from ._results.provenance import (
    OUTPUTS as OUTPUTS,
    PACKAGES as PACKAGES,
    DirtyTreeError as DirtyTreeError,
    machine as machine,
    provenance as provenance,
    require_clean as require_clean,
    versions as versions,
)
from ._results.record import hyperparameters as hyperparameters, run_config as run_config
from ._results.run import Run as Run, load_run as load_run
from ._results.select import select_run as select_run
