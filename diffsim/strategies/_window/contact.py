"""Backward-only contact smoothing ("contacts from distance", straight-through) for Brax's
`spring` pipeline.

Brax's spring pipeline (`brax.spring.collisions.resolve`) applies a contact's impulse only
where `dist < 0` (and the bodies approach, and the impulse is positive): a hard indicator,
whose derivative in `dist` is zero everywhere. So no gradient says "come closer and you
will be pushed", and the gradient jumps where contact begins. `smoothed_contacts(width)`
swaps in `resolve` below, whose only change is that indicator: its forward value is the
same hard `dist < 0`, its backward pass the derivative of `sigmoid(-dist / width)`. The
physics, and every forward value, are Brax's.

Adapted from `brax/spring/collisions.py` (brax 0.14, Apache-2.0); the forward values are
tested bitwise against Brax's own `resolve`.

Other backends: Brax `generalized` masks its contact rows the same way (`jac_contact`:
`x * (c.dist < 0)`) before a projected-gradient solve, and MJX decides which contacts are
active inside its constraint solver; neither is smoothed here.
"""

import contextlib
from collections.abc import Iterator

import jax
from brax import contact, math
from brax.base import Force, Motion, System, Transform
from brax.spring import collisions
from brax.spring.base import State
from jax import numpy as jp
from jax.ops import segment_sum
from jaxtyping import Array, Float

from ..._types import Scalar


@jax.custom_vjp
def penetrating(dist: Float[Array, "..."], width) -> Float[Array, "..."]:
    """`1.0 where dist < 0 else 0.0` in the forward pass; in the backward pass the
    derivative of `sigmoid(-dist / width)`, nonzero within a few `width`s of contact."""
    del width
    return (dist < 0.0).astype(dist.dtype)


def _penetrating_fwd(dist, width):
    return penetrating(dist, width), (dist, width)


def _penetrating_bwd(res, ct):
    """The surrogate's derivative times `ct`, and 0 wherever either is not usable: Brax
    computes an impulse for every contact candidate and masks it, so a candidate far from
    contact (its surrogate's derivative 0) may carry an infinite or NaN impulse, whose
    cotangent `0 * inf` would otherwise turn the whole gradient into NaN."""
    dist, width = res
    soft = jax.nn.sigmoid(-dist / width)
    slope = -soft * (1.0 - soft) / width
    usable = (slope != 0.0) & jp.isfinite(ct) & jp.isfinite(slope)
    return jp.where(usable, ct * slope, 0.0), jp.zeros_like(width)


penetrating.defvjp(_penetrating_fwd, _penetrating_bwd)


def _impulse(sys: System, width, c, link_idx, x_i, xd_i, i_inv, i_mass):
    """Brax's per-contact impulse, with `penetrating` for the hard `dist < 0`."""
    rel_pos = c.pos - x_i.pos
    rel_vel = xd_i.vel + jax.vmap(jp.cross)(xd_i.ang, rel_pos)
    rel_vel *= (link_idx > -1).reshape(-1, 1)
    contact_vel = rel_vel[0] - rel_vel[1]
    normal_vel = jp.dot(-c.frame[0], contact_vel)

    temp = jax.vmap(jp.dot)(i_inv, jp.cross(rel_pos, -c.frame[0]))
    ang = jp.dot(-c.frame[0], jp.sum(jp.cross(temp, rel_pos), axis=0))
    baumgarte_vel = sys.baumgarte_erp / sys.opt.timestep * c.dist
    impulse = (-1.0 * (1.0 + c.elasticity) * normal_vel - baumgarte_vel) / (
        i_mass[0] + i_mass[1] + ang
    )
    impulse_vec = impulse * -c.frame[0]

    vel_d = contact_vel + normal_vel * c.frame[0]
    dir_d = vel_d / (1e-6 + math.safe_norm(vel_d))
    temp = jax.vmap(jp.dot)(i_inv, jp.cross(rel_pos, dir_d))
    ang_d = jp.dot(dir_d, jp.sum(jp.cross(temp, rel_pos), axis=0))
    impulse_d = math.safe_norm(vel_d) / (i_mass[0] + i_mass[1] + ang_d)
    impulse_d = jp.minimum(impulse_d, c.friction[0] * impulse)
    impulse_d_vec = -1.0 * impulse_d * dir_d

    hard_n = (c.dist < 0.0) & (normal_vel < 0) & (impulse > 0.0)
    apply_n = penetrating(c.dist, width) * ((normal_vel < 0) & (impulse > 0.0))
    apply_d = hard_n * (math.safe_norm(vel_d) > 1e-3)

    f = Force.create(vel=impulse_vec * apply_n + impulse_d_vec * apply_d)
    return f, jp.array(hard_n, dtype=jp.float32)


def resolve(sys: System, state: State, width) -> Motion:
    """`brax.spring.collisions.resolve` with the contact indicator `penetrating(dist,
    width)`: the same delta-velocity of each link's centre of mass."""
    c = contact.get(sys, state.x)
    if c is None:
        return Motion.zero((sys.num_links(),))

    link_idx = jp.array(c.link_idx).T
    x_i, xd_i = state.x_i.take(link_idx), state.xd_i.take(link_idx)
    i_inv = state.i_inv.take(link_idx) * (link_idx > -1)
    i_mass = 1 / state.mass.take(link_idx) * (link_idx > -1)
    impulse = jax.vmap(lambda *args: _impulse(sys, width, *args))
    p, is_contact = impulse(c, link_idx, x_i, xd_i, i_inv, i_mass)

    p = jax.tree.map(lambda x: jp.concatenate((x, -x)), p)
    pos = jp.tile(c.pos, (2, 1))
    link_idx = jp.concatenate(c.link_idx)
    xp_i = Transform.create(pos=pos - state.x_i.take(link_idx).pos).vmap().do(p)
    xp_i = jax.tree.map(lambda x: segment_sum(x, link_idx, sys.num_links()), xp_i)

    num_contacts = segment_sum(jp.tile(is_contact, 2), link_idx, sys.num_links())
    # Brax divides by `num_contacts + 1e-8`. A link with no contact gets 0 / 1e-8 = 0
    # forward, but the surrogate's derivative would be multiplied by 1e8 there (a contact
    # coming near, with none acting): divide such links by 1 instead. Bitwise the same
    # forward: links with contacts keep Brax's denominator, the others' impulse is 0.
    count = num_contacts.reshape((-1, 1))
    xp_i = xp_i / jp.where(count > 0, count + 1e-8, 1.0)

    return Motion(
        vel=jax.vmap(lambda x, y: x / y)(xp_i.vel, state.mass),
        ang=jax.vmap(lambda x, y: x @ y)(state.i_inv, xp_i.ang),
    )


@contextlib.contextmanager
def smoothed_contacts(width: Scalar) -> Iterator[None]:
    """While tracing inside it, Brax's spring pipeline resolves contacts with `resolve` of
    this `width` (it calls `collisions.resolve` through the module; tracing is
    single-threaded). Outside it, Brax's own."""
    original = collisions.resolve
    collisions.resolve = lambda sys, state: resolve(sys, state, width)  # pyright: ignore[reportAttributeAccessIssue]
    try:
        yield
    finally:
        collisions.resolve = original
