"""The study machinery behind `diffsim.study`: the grid's cells and their key (`cells`,
`fingerprint`), running them (`run`, with `cellstore`'s locks and atomic folders and
`cellmeter`'s record of the machine's load), tuning (`tuning`), reading them back (`load`),
and the tables (`report`, `ratios`, `reproduction`)."""
