"""Studies: a grid of environments x strategies, each cell trained over vmapped seeds.

Each finished cell is saved to `<out>/<study>/<env>/<label>/` (see `Run.save`) at once and
atomically; a cell whose folder already holds a finished run of the same computation (its
key: a fingerprint of the traced training program, a protocol version and its settings)
is loaded, not retrained, so an interrupted study resumes where it stopped and loses
nothing finished. A cell may be tuned (`Cell.search`): its search runs on tuning seeds and
only the best configuration is trained on the reported seeds. Cells run one after another,
or one per task on an executor (`concurrent.futures`, Dask, submitit for SLURM, ...), with
a per-cell lock so that no two workers train the same cell.

The machinery lives in `diffsim._study`: the grid and its key (`cells`, `fingerprint`),
running it (`run`, `cellstore`, `cellmeter`), tuning, loading, and the tables (`report`,
`ratios`, `tables`, `reproduction`).
"""

from ._study.cells import Cell as Cell, Submitter as Submitter
from ._study.fingerprint import (
    PROTOCOL_VERSION as PROTOCOL_VERSION,
    program_fingerprint as program_fingerprint,
)
from ._study.load import load_runs as load_runs, load_study as load_study
from ._study.ratios import verdict as verdict
from ._study.report import (
    gradient_health as gradient_health,
    summary as summary,
    untrained_scores as untrained_scores,
)
from ._study.reproduction import reproduction as reproduction
from ._study.run import run_study as run_study
from ._study.tables import (
    format_summary as format_summary,
    provenance_header as provenance_header,
    write_summary as write_summary,
)
from ._study.tuning import log_grid as log_grid
