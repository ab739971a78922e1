"""Shared test setup. jdiff's math is tested in float32, the dtype users train in; the
references the tests compare against are float64 NumPy, so x64 stays off for JAX."""

import jax

jax.config.update("jax_enable_x64", False)
