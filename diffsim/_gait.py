"""`diagnostics.gait_stats`: how a policy moves (speed, height, uprightness), read from
where each body's observation keeps them."""

from collections.abc import Mapping

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._episodes import ended_before
from ._types import Env
from .rollout import from_resets, rollout

# Where each Brax body's observation keeps what a gait is judged by (brax 0.14, checked
# against each env's `_get_obs`): `height` is the torso's z (halfcheetah: its root slide
# joint, 0 at the start pose), `velocity` the torso's forward (x) velocity, `pitch` the
# planar bodies' torso angle, `quaternion` ant's torso orientation (w, x, y, z), and
# reacher's `tip_to_target` the vector from fingertip to target.
GAIT_LAYOUT: dict[str, dict[str, int]] = {
    "ant": {"height": 0, "quaternion": 1, "velocity": 13},
    "halfcheetah": {"height": 0, "pitch": 1, "velocity": 8},
    "hopper": {"height": 0, "pitch": 1, "velocity": 5},
    "walker2d": {"height": 0, "pitch": 1, "velocity": 8},
    "reacher": {"tip_to_target": 8},
}
GAIT_FIELDS = (
    "return",
    "episode_length",
    "forward_velocity",
    "torso_height",
    "upright_fraction",
    "final_distance",
)


# How many numbers each layout field spans from its index.
GAIT_SPANS = {"height": 1, "pitch": 1, "velocity": 1, "quaternion": 4, "tip_to_target": 3}


def gait_stats(
    env: Env,
    policy: eqx.Module,
    *,
    key: PRNGKeyArray,
    num_envs: int = 16,
    layout: Mapping[str, int] | None = None,
) -> dict[str, Float[Array, ""]]:
    """How a policy moves, so that no return hides an exploit (flipping over, bouncing,
    ending episodes early): one deterministic episode in each of `num_envs` fresh envs.

    Every statistic is a mean over the envs of that env's first episode (steps after its
    first end are dropped):

    - `return`: the summed reward; `episode_length`: steps until the episode ended
      (termination or the time limit);
    - `forward_velocity`: the torso's mean x velocity (m/s);
    - `torso_height`: the torso's mean z (m; halfcheetah: its root joint, 0 at the start);
    - `upright_fraction`: the fraction of steps with the torso's up axis pointing up (ant:
      from its quaternion; planar bodies: |pitch| < pi/2);
    - `final_distance`: reacher's fingertip-to-target distance at the episode's last step.

    Statistics that do not apply to the env are NaN. Bodies and their observation layout:
    `GAIT_LAYOUT` (`ant`, `halfcheetah`, `hopper`, `walker2d`, `reacher`); any other env
    (your own, or a variant of a body) passes its `layout`.

    **Arguments:** `env` from `diffsim.make_env`; `policy` acting on one observation
    (`policy(obs)`; vmap this function for a leading seed axis); `key` (keyword-only);
    `num_envs`: the episodes averaged; `layout`: where the observation keeps what a gait is
    judged by, `{field: index}` with fields of `GAIT_SPANS` (`quaternion`: w, x, y, z from
    its index; `tip_to_target`: 3 numbers), by default `GAIT_LAYOUT[env.name]`.

    **Returns:** `{name: Float[Array, ""]}` with the keys of `GAIT_FIELDS`.

    **Example:**

    ```python
    env = diffsim.make_env("hopper")
    policy = diffsim.DeterministicPolicy(env.observation_size, env.action_size, key=k1)
    gait = diffsim.diagnostics.gait_stats(env, policy, key=k2)
    float(gait["upright_fraction"])   # 1.0 while the hopper stands
    # your own variant of the ant, whose observation starts with the ant's
    ant_layout = diffsim.diagnostics.GAIT_LAYOUT["ant"]
    gait = diffsim.diagnostics.gait_stats(my_ant, ant_policy, key=k2, layout=ant_layout)
    ```
    """
    if layout is None:
        name = getattr(env, "name", None)
        if name not in GAIT_LAYOUT:
            raise ValueError(
                f"gait_stats knows the bodies {sorted(GAIT_LAYOUT)}, got env {name!r};"
                " pass layout={field: observation index} for another env"
            )
        layout = GAIT_LAYOUT[name]
    if not isinstance(num_envs, int) or num_envs < 1:
        raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
    _check_layout(layout, env.observation_size)
    return _gait_stats(env, policy, key, num_envs, dict(layout))


def _check_layout(layout: Mapping[str, int], observation_size: int) -> None:
    for field, index in layout.items():
        if field not in GAIT_SPANS:
            raise ValueError(f"layout field {field!r} is not one of {sorted(GAIT_SPANS)}")
        span = GAIT_SPANS[field]
        if not isinstance(index, int) or not 0 <= index <= observation_size - span:
            raise ValueError(
                f"layout[{field!r}] must be an int index with {span} number(s) from it inside"
                f" the observation of {observation_size}, got {index!r}"
            )


@eqx.filter_jit  # one compiled program when called eagerly (not one per Brax operation)
def _gait_stats(env: Env, policy, key, num_envs: int, layout: dict) -> dict[str, Array]:
    env_state, act_key = from_resets(env, key, num_envs)
    length = env.episode_length  # pyright: ignore[reportAttributeAccessIssue]
    _, traj = rollout(env, policy, env_state, key=act_key, length=length, deterministic=True)
    obs, done = traj.obs, traj.done  # [T, B, obs], [T, B]
    alive = ended_before(done) == 0  # each env's first episode, up to and including its end
    steps = jnp.sum(alive, 0)  # [B]

    def mean(x: Float[Array, "T B"]) -> Float[Array, ""]:
        return jnp.mean(jnp.sum(jnp.where(alive, x, 0.0), 0) / steps)

    nan = jnp.full((), jnp.nan)
    stats = {
        "return": jnp.mean(jnp.sum(jnp.where(alive, traj.reward, 0.0), 0)),
        "episode_length": jnp.mean(steps.astype(jnp.float32)),
        "forward_velocity": mean(obs[..., layout["velocity"]]) if "velocity" in layout else nan,
        "torso_height": mean(obs[..., layout["height"]]) if "height" in layout else nan,
        "upright_fraction": nan,
        "final_distance": nan,
    }
    if "quaternion" in layout:
        qx, qy = obs[..., layout["quaternion"] + 1], obs[..., layout["quaternion"] + 2]
        stats["upright_fraction"] = mean((1 - 2 * (qx**2 + qy**2) > 0).astype(obs.dtype))
    if "pitch" in layout:
        stats["upright_fraction"] = mean((jnp.cos(obs[..., layout["pitch"]]) > 0).astype(obs.dtype))
    if "tip_to_target" in layout:
        last = jnp.take_along_axis(obs, (steps - 1)[None, :, None], axis=0)[0]  # [B, obs]
        i = layout["tip_to_target"]
        stats["final_distance"] = jnp.mean(jnp.linalg.norm(last[:, i : i + 3], axis=-1))
    return stats
