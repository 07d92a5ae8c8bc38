"""Results behind `diffsim.results`: a `Run` and its round trip to a folder of data
(`run`, `files`; no pickle, nothing executed on load), the JSON record of what ran
(`record`: `run.config`, the flattened hyperparameters a study's key reads), picking one
configuration or seed out of a batch of runs (`select`), and provenance: the commit,
versions and machine a result came from (`provenance`)."""
