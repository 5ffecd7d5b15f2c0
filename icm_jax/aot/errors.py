"""The errors of icm_jax.aot: a bad argument, and a call too big for HBM."""


class AotError(ValueError):
  """A bad argument; the message starts with the argument's name."""


class DoesNotFit(RuntimeError):
  """A compiled call needs more memory per chip than the chip's HBM."""
