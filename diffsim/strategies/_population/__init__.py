"""The population family: what ES and GuidedES share.

`population` (`AbstractPopulationStrategy`: members scored on episodes, evosax glue),
`algorithms` (the evosax algorithms by name), `estimates` (guided search directions),
`modes` (GuidedES's `Blend` and `Subspace`) and `windows` (GuidedES's gradient windows,
`APGWindow` and `SHACWindow`)."""
