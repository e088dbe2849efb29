"""vdm: diffusion models in JAX/Flax (DDPM, improved DDPM, DDIM, NCSN, VDM).

The math lives in pure modules (`schedules`, `diffusion`, `losses`,
`samplers`); see docs/design.md for the conventions they follow.
"""
