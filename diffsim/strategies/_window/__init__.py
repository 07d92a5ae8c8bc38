"""The first-order family: what APG, SHAC, AHAC, SAPO and GuidedES's gradient share.

`window` (the differentiable window, its settings and the losses' re-exports), `strategy`
(`AbstractWindowStrategy`: clipped Adam on a window's gradient), `gradient` (the window's
gradient, per env where asked, with per-step cotangent norms), `losses` (APG's and SHAC's),
`env` (float64 and rematerialised envs, the backend checks), `valve` (the per-step
gradient valve) and `contact` (backward-only contact smoothing), `stiffness` (AHAC's cut),
`critic` and `ensemble` (the critics)."""
